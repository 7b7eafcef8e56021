// llama-doubter: two-pass generation with a Doubter sidecar.
//
// Pass 1 runs the prompt with injection off and reads each read layer's `l_out-<il>` through cb_eval, the
// encoder turns the pooled features into cognitive tokens, the KV cache is cleared, and pass 2 runs the prompt
// with the cross-attention injected. The logits at the prompt's last position give the Doubter's decision
// confidence (log-odds of not starting the refusal, as PyTorch's `decision_log_odds`), or, for a sidecar with the
// `head` confidence, the head reads it from the cognitive tokens before pass 2. A sidecar that reads the answer
// (read_position 'answer') has pass 1 draft the base's own greedy answer first and reads the read layers at its
// last token (the `attentive` encoder also at every token, with each step's log-probability, entropy and top-k
// log-probabilities), as PyTorch's `DoubterModel.draft`. Then either pass 2 decodes
// its own text greedily (AGC gain and dynamic refresh as the sidecar says), or, with --threshold, the reply is the
// base's own greedy answer (decoded in pass 1, injection off) when the confidence reaches the threshold and the
// refusal text otherwise. --no-doubter runs plain greedy generation from the same binary, for speed comparisons.
// --jsonl keeps the model loaded and answers one JSON request per stdin line with one JSON line on stdout.

#include "llama.h"
#include "llama-doubter.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <clocale>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using json = nlohmann::ordered_json;

struct request {
    std::string prompt;
    int  n_predict  = 64;
    bool ignore_eos = false;
    double threshold = NAN; // NaN: pass 2 writes its own text
    std::vector<std::string> stop;
    std::string dump_dir;
};

struct params {
    std::string model;
    std::string sidecar;
    request     req;
    int  n_threads  = (int) std::min(4u, std::max(1u, std::thread::hardware_concurrency()));
    int  n_ctx      = 0; // --jsonl: context size (default min(4096, the model's training context))
    bool doubter    = true;
    bool prefix_reuse = true; // pass 2 starts at the first inject layer from pass 1's states
    bool json_out   = false;
    bool jsonl      = false;
    bool verbose    = false;
};

static void usage(const char * argv0) {
    fprintf(stderr,
        "usage: %s -m base.gguf (--sidecar doubter.gguf | --no-doubter) (-p PROMPT | --jsonl) [options]\n"
        "  -f FILE          read the prompt from FILE (for prompts longer than a command line allows)\n"
        "  -n N             tokens to generate (default 64)\n"
        "  -t N             threads (default min(4, cores))\n"
        "  --stop S         end the text before the stop string S (repeatable)\n"
        "  --threshold X    answer with the base's own answer when the confidence is >= X in [0, 1], else decline\n"
        "  --ignore-eos     keep generating after end-of-generation tokens\n"
        "  --json           print one JSON object instead of text and a timing line\n"
        "  --jsonl          keep the model loaded; read one JSON request per stdin line ({\"prompt\": ..., and\n"
        "                   optionally \"n_predict\", \"stop\", \"threshold\", \"ignore_eos\", \"id\"}), write one JSON line\n"
        "                   each, after a first line {\"ready\": true, ...} once the model is loaded\n"
        "  -c N             --jsonl: context size (default min(4096, the model's))\n"
        "  --dump-dir DIR   write pass-1/pass-2 activations, features and cognitive tokens as .npy files\n"
        "  --no-prefix-reuse  pass 2 recomputes the layers below the first inject layer (for comparisons)\n"
        "  -v               show llama.cpp's log\n", argv0);
}

// a positive integer argument, or exit naming the option and the value
static int positive_int(const std::string & option, const char * value) {
    char * end = nullptr;
    errno = 0;
    const long v = strtol(value, &end, 10);
    if (errno != 0 || end == value || *end != '\0' || v < 1 || v > 1000000000L) {
        fprintf(stderr, "error: %s expects a positive integer, got '%s'\n", option.c_str(), value);
        exit(2);
    }
    return (int) v;
}

static double probability(const std::string & option, const char * value) {
    char * end = nullptr;
    errno = 0;
    const double v = strtod(value, &end);
    if (errno != 0 || end == value || *end != '\0' || !(v >= 0.0 && v <= 1.0)) {
        fprintf(stderr, "error: %s expects a number in [0, 1], got '%s'\n", option.c_str(), value);
        exit(2);
    }
    return v;
}

static std::string read_file(const char * path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        fprintf(stderr, "error: cannot read the prompt file '%s'\n", path);
        exit(2);
    }
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

static bool parse_args(int argc, char ** argv, params & p) {
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        auto next = [&]() -> const char * {
            if (i + 1 >= argc) {
                fprintf(stderr, "error: %s needs a value\n", a.c_str());
                exit(2);
            }
            return argv[++i];
        };
        if      (a == "-m")             { p.model          = next(); }
        else if (a == "--sidecar")      { p.sidecar        = next(); }
        else if (a == "-p")             { p.req.prompt     = next(); }
        else if (a == "-f")             { p.req.prompt     = read_file(next()); }
        else if (a == "-n")             { p.req.n_predict  = positive_int(a, next()); }
        else if (a == "-t")             { p.n_threads      = positive_int(a, next()); }
        else if (a == "-c")             { p.n_ctx          = positive_int(a, next()); }
        else if (a == "--stop")         { p.req.stop.push_back(next()); }
        else if (a == "--threshold")    { p.req.threshold  = probability(a, next()); }
        else if (a == "--dump-dir")     { p.req.dump_dir   = next(); }
        else if (a == "--no-doubter")   { p.doubter        = false; }
        else if (a == "--no-prefix-reuse") { p.prefix_reuse = false; }
        else if (a == "--ignore-eos")   { p.req.ignore_eos = true; }
        else if (a == "--json")         { p.json_out       = true; }
        else if (a == "--jsonl")        { p.jsonl          = true; }
        else if (a == "-v")             { p.verbose        = true; }
        else if (a == "-h" || a == "--help") { usage(argv[0]); exit(0); }
        else {
            fprintf(stderr, "error: unknown argument '%s'\n", a.c_str());
            return false;
        }
    }
    const char * missing = p.model.empty() ? "-m" : !p.jsonl && p.req.prompt.empty() ? "-p or -f (a non-empty prompt) or --jsonl" :
                           p.doubter && p.sidecar.empty() ? "--sidecar (or --no-doubter)" : nullptr;
    if (missing) {
        fprintf(stderr, "error: missing %s\n", missing);
        return false;
    }
    if (std::any_of(p.req.stop.begin(), p.req.stop.end(), [](const std::string & s) { return s.empty(); })) {
        fprintf(stderr, "error: --stop needs a non-empty string\n");
        return false;
    }
    if (!p.doubter && !std::isnan(p.req.threshold)) {
        fprintf(stderr, "error: --threshold needs the Doubter (not --no-doubter)\n");
        return false;
    }
    return true;
}

// activations read through cb_eval: rows of `l_out-<il>` (and `doubter-<il>`) per layer, appended per ubatch
struct capture {
    bool active = false;
    std::set<int> l_out; // layers whose l_out to read
    std::set<int> delta; // layers whose Doubter delta to read
    std::map<std::string, std::vector<float>> data;
    int64_t n_embd = 0;

    void start() { active = !l_out.empty() || !delta.empty(); data.clear(); }

    static int layer_of(const char * name, const char * prefix) {
        const size_t n = strlen(prefix);
        if (strncmp(name, prefix, n) != 0 || name[n] == '\0') {
            return -1;
        }
        char * end = nullptr;
        const long il = strtol(name + n, &end, 10);
        return *end == '\0' ? (int) il : -1;
    }

    bool wants(const char * name) const {
        const int il_out   = layer_of(name, "l_out-");
        const int il_delta = layer_of(name, "doubter-");
        return (il_out >= 0 && l_out.count(il_out)) || (il_delta >= 0 && delta.count(il_delta));
    }

    const std::vector<float> & rows(const std::string & name) const {
        static const std::vector<float> none;
        const auto it = data.find(name);
        return it == data.end() ? none : it->second;
    }
};

static bool cb_eval(ggml_tensor * t, bool ask, void * user_data) {
    auto * cap = (capture *) user_data;
    if (!cap->active || !cap->wants(t->name)) {
        return !ask; // ask: not needed; otherwise: keep computing
    }
    if (ask) {
        return true;
    }
    if (t->type != GGML_TYPE_F32 || t->ne[0] != cap->n_embd || !ggml_is_contiguous(t)) {
        fprintf(stderr, "error: unexpected layout of '%s'\n", t->name);
        return false;
    }
    auto & dst = cap->data[t->name];
    const size_t n = dst.size();
    dst.resize(n + ggml_nelements(t));
    ggml_backend_tensor_get(t, dst.data() + n, 0, ggml_nbytes(t));
    return true;
}

static bool write_npy(const std::string & path, const std::vector<float> & v, int64_t cols) {
    FILE * f = fopen(path.c_str(), "wb");
    if (!f) {
        return false;
    }
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" +
        std::to_string((int64_t) v.size()/cols) + ", " + std::to_string(cols) + "), }";
    header += std::string(63 - (10 + header.size()) % 64, ' ') + "\n";
    const uint16_t len = (uint16_t) header.size();
    fwrite("\x93NUMPY\x01\x00", 1, 8, f);
    fwrite(&len, 2, 1, f);
    fwrite(header.data(), 1, header.size(), f);
    fwrite(v.data(), sizeof(float), v.size(), f);
    return fclose(f) == 0;
}

static std::string trim(const std::string & s) {
    const size_t b = s.find_first_not_of(" \t\n\r");
    const size_t e = s.find_last_not_of(" \t\n\r");
    return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

static void log_cb(ggml_log_level level, const char * text, void * user_data) {
    const bool verbose = *(const bool *) user_data;
    if (verbose || level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

// fill the batch with tokens at consecutive positions from pos_0; outputs for all or only the last one
static void batch_set(llama_batch_ext * batch, const llama_token * tokens, int32_t n, llama_pos pos_0, bool all_outputs) {
    llama_batch_ext_clear(batch);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, tokens[i]);
        const llama_pos pos = pos_0 + i;
        llama_batch_ext_set_pos(batch, idx, &pos);
        if (all_outputs || i == n - 1) {
            llama_batch_ext_set_output_logits(batch, idx, true);
        }
    }
}

static std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text, bool special) {
    const int n = -llama_tokenize(vocab, text.c_str(), text.size(), NULL, 0, special, special);
    std::vector<llama_token> tokens(std::max(n, 0));
    if (n <= 0 || llama_tokenize(vocab, text.c_str(), text.size(), tokens.data(), tokens.size(), special, special) < 0) {
        throw std::runtime_error("failed to tokenize the text");
    }
    return tokens;
}

static double elapsed_ms(int64_t t0, int64_t t1) { return (t1 - t0)/1000.0; }

// one loaded model (and Doubter) with one context, answering requests in turn
struct engine {
    llama_model           * model;
    llama_adapter_doubter * adapter;
    const llama_vocab     * vocab;
    int64_t n_embd;
    int     n_layer;
    int     n_ctx;
    int     n_threads;
    capture cap;
    llama_context   * ctx   = nullptr;
    llama_sampler   * smpl  = nullptr;
    llama_batch_ext * batch = nullptr;

    // Doubter settings
    int n_read = 0, n_feat = 0, n_tok = 0, refresh_interval = 0;
    float refresh_threshold = 0.0f;
    bool refresh = false;
    llama_doubter_pooling pooling = LLAMA_DOUBTER_POOLING_LAST;
    std::vector<int> read_layers, inject_layers;
    std::string refusal;
    bool decision = false; // the sidecar's confidence is the decision (which this tool computes), not the ratio
    bool head = false;     // the sidecar's confidence is its head's (computed from the encoder alone, before pass 2)
    bool reads_answer = false; // pass 1 reads the base's own draft answer, not the prompt
    int  n_signals = 0;        // signals per answer token the encoder reads (0: it reads the answer's last token only)
    int  max_draft = 0;        // the draft length the Doubter was trained with (answer reading without a threshold)
    bool prefix_reuse = true;  // pass 2 starts at the first inject layer from pass 1's states (see llama_doubter_set_prefix)

    const char * confidence_kind() const { return head ? "head" : decision ? "decision" : "ratio"; }

    engine(llama_model * model, llama_adapter_doubter * adapter, int n_ctx, int n_threads)
        : model(model), adapter(adapter), vocab(llama_model_get_vocab(model)), n_embd(llama_model_n_embd(model)),
          n_layer(llama_model_n_layer(model)), n_ctx(n_ctx), n_threads(n_threads) {
        cap.n_embd = n_embd;
        llama_context_params cparams = llama_context_default_params();
        cparams.n_ctx           = n_ctx;
        cparams.n_batch         = n_ctx;
        cparams.n_threads       = n_threads;
        cparams.n_threads_batch = n_threads;
        cparams.no_perf         = false;
        if (adapter) {
            cparams.cb_eval           = cb_eval;
            cparams.cb_eval_user_data = &cap;
        }
        ctx = llama_init_from_model(model, cparams);
        if (!ctx) {
            throw std::runtime_error("failed to create the llama_context");
        }
        if (adapter && llama_set_doubter(ctx, adapter) != 0) {
            throw std::runtime_error("failed to attach the Doubter adapter");
        }
        smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
        llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
        batch = llama_batch_ext_init(ctx);
        if (adapter) {
            n_read  = llama_doubter_adapter_n_read(adapter);
            n_feat  = llama_doubter_adapter_n_feat(adapter);
            n_tok   = llama_doubter_adapter_n_tokens(adapter);
            pooling = llama_doubter_adapter_pooling(adapter);
            refresh = llama_doubter_adapter_refresh(adapter, &refresh_interval, &refresh_threshold);
            refusal = llama_doubter_adapter_refusal_text(adapter);
            decision = llama_doubter_adapter_confidence(adapter) == LLAMA_DOUBTER_CONFIDENCE_DECISION;
            head     = llama_doubter_adapter_confidence(adapter) == LLAMA_DOUBTER_CONFIDENCE_HEAD;
            reads_answer = llama_doubter_adapter_read_position(adapter) == LLAMA_DOUBTER_READ_ANSWER;
            n_signals    = llama_doubter_adapter_n_signals(adapter);
            max_draft    = llama_doubter_adapter_max_draft_tokens(adapter);
            for (int i = 0; i < n_read; i++) {
                read_layers.push_back(llama_doubter_adapter_read_layer(adapter, i));
            }
            for (int i = 0; i < llama_doubter_adapter_n_inject(adapter); i++) {
                inject_layers.push_back(llama_doubter_adapter_inject_layer(adapter, i));
            }
        }
    }

    ~engine() {
        llama_batch_ext_free(batch);
        llama_sampler_free(smpl);
        llama_free(ctx);
    }

    void decode(const llama_token * tokens, int n, llama_pos pos_0, bool all_outputs, const char * what) {
        batch_set(batch, tokens, n, pos_0, all_outputs);
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch) != 0) {
            throw std::runtime_error(std::string(what) + " failed");
        }
    }

    // The refusal's first token after the prompt, as PyTorch's `first_target_token` writes it: the refusal follows
    // the prompt after a space unless the prompt ends in whitespace.
    llama_token refusal_token(const std::string & prompt) const {
        const bool spaced = !prompt.empty() && isspace((unsigned char) prompt.back());
        return tokenize(vocab, spaced ? refusal : " " + refusal, false).front();
    }

    // log-odds of answering at the current last-position logits: log(1 - p) - log p, p = P(refusal's first token)
    double decision_log_odds(llama_token token) const {
        const float * logits = llama_get_logits_ith(ctx, -1);
        const int n_vocab = llama_vocab_n_tokens(vocab);
        double max = logits[0];
        for (int i = 1; i < n_vocab; i++) {
            max = std::max(max, (double) logits[i]);
        }
        double sum = 0.0;
        for (int i = 0; i < n_vocab; i++) {
            sum += std::exp(logits[i] - max);
        }
        const double refuse = std::min(logits[token] - max - std::log(sum), -1e-7); // log p
        return std::log(-std::expm1(refuse)) - refuse;
    }

    // The signals of choosing `id` at the current last-position logits, as PyTorch's `token_signals`: its
    // log-probability, the entropy, and the top-k log-probabilities (k = n_signals - 2)
    void token_signals(llama_token id, std::vector<float> & out) const {
        const float * logits = llama_get_logits_ith(ctx, -1);
        const int n_vocab = llama_vocab_n_tokens(vocab);
        const double max = *std::max_element(logits, logits + n_vocab);
        double sum = 0.0, weighted = 0.0; // sum of e_i = exp(l_i - max), and of e_i (l_i - max)
        for (int i = 0; i < n_vocab; i++) {
            const double shifted = logits[i] - max;
            const double e = std::exp(shifted);
            sum += e;
            weighted += e*shifted;
        }
        const double lse = max + std::log(sum);
        const double entropy = std::log(sum) - weighted/sum; // -sum p_i log p_i
        std::vector<float> top(n_signals - 2);
        std::partial_sort_copy(logits, logits + n_vocab, top.begin(), top.end(), std::greater<float>());
        out.push_back((float) (logits[id] - lse));
        out.push_back((float) entropy);
        for (const float t : top) {
            out.push_back((float) (t - lse));
        }
    }

    // Greedy decoding from the current logits at position n_pos until n_predict tokens, an end-of-generation token
    // or a stop string (a token whose text holds a stop string is not kept; a stop string across tokens cuts the
    // text before it). `before` and `after` run around every forward; `signals`, when given, receives each kept
    // token's `token_signals`. Returns the number of forward passes.
    int greedy(const request & r, int n_predict, int n_pos, std::vector<llama_token> & kept, std::string & text,
               const std::function<void()> & before, const std::function<void()> & after,
               std::vector<float> * signals = nullptr) {
        int n_forward = 0;
        while (true) {
            const llama_token id = llama_sampler_sample(smpl, ctx, -1);
            if (!r.ignore_eos && llama_vocab_is_eog(vocab, id)) {
                break;
            }
            char buf[256];
            const int n = llama_token_to_piece(vocab, id, buf, sizeof(buf), 0, false);
            const std::string piece = n > 0 ? std::string(buf, n) : std::string();
            if (std::any_of(r.stop.begin(), r.stop.end(), [&](const std::string & s) { return piece.find(s) != std::string::npos; })) {
                break;
            }
            kept.push_back(id);
            if (signals) {
                token_signals(id, *signals);
            }
            text += piece;
            bool stopped = false;
            for (const auto & s : r.stop) {
                const size_t at = text.find(s);
                if (at != std::string::npos) {
                    text.resize(at);
                    stopped = true;
                }
            }
            if (stopped || (int) kept.size() >= n_predict) {
                break;
            }
            before();
            decode(&id, 1, n_pos++, false, "decoding");
            n_forward++;
            after();
        }
        return n_forward;
    }

    json run(const request & r) {
        if (r.prompt.empty()) {
            throw std::runtime_error("the prompt is empty");
        }
        if (r.n_predict < 1) {
            throw std::runtime_error("n_predict must be a positive integer");
        }
        if (!std::isnan(r.threshold)) {
            if (!adapter) {
                throw std::runtime_error("a threshold needs the Doubter");
            }
            if (!decision && !head) {
                throw std::runtime_error("the sidecar's Doubter was trained with the 'ratio' confidence, which this tool "
                                         "does not compute; a threshold needs a 'decision' or 'head' sidecar");
            }
            if (!(r.threshold >= 0.0 && r.threshold <= 1.0)) {
                throw std::runtime_error("threshold must be a number in [0, 1]");
            }
        }
        const std::vector<llama_token> prompt = tokenize(vocab, r.prompt, true);
        const int n_prompt = (int) prompt.size();
        const int n_draft_max = reads_answer && std::isnan(r.threshold) ? max_draft : 0; // the reading's own draft
        if (n_prompt + std::max(r.n_predict, n_draft_max) > n_ctx) {
            throw std::runtime_error("the prompt has " + std::to_string(n_prompt) + " tokens and n_predict asks for " +
                                     std::to_string(r.n_predict) + " more, but the context is " + std::to_string(n_ctx) + " tokens");
        }
        const bool dump = !r.dump_dir.empty();
        const bool thresholded = !std::isnan(r.threshold);
        const bool drafting = thresholded || reads_answer; // pass 1 drafts the base's own answer
        llama_memory_clear(llama_get_memory(ctx), true);
        if (adapter && llama_doubter_set_inject(ctx, false) != 0) {
            throw std::runtime_error("failed to switch the injection off");
        }

        double t_pass1_ms = 0.0, t_draft_ms = 0.0, t_encode_ms = 0.0;
        int n_refresh = 0;
        std::vector<float> feats, tokens, running_sum;
        double running_count = 0.0;
        std::vector<llama_token> draft;
        std::string draft_text;
        json confidence = nullptr, log_odds = nullptr, refusal_tok = nullptr;
        const bool need_mean = pooling != LLAMA_DOUBTER_POOLING_LAST;

        auto newest_row = [&](int il) -> const float * {
            const auto & v = cap.rows("l_out-" + std::to_string(il));
            return v.size() >= (size_t) n_embd ? v.data() + v.size() - n_embd : nullptr;
        };

        // pass 2 (or the only pass): a thresholded head confidence decides before it and runs none
        const bool pass2 = !(head && thresholded);
        // prefix reuse: the layer below the first inject layer gives pass 2 its input (-1: none)
        const int prefix_layer = adapter && pass2 && prefix_reuse && !inject_layers.empty()
            ? *std::min_element(inject_layers.begin(), inject_layers.end()) - 1 : -1;
        std::vector<float> prefix;
        if (adapter) {
            // pass 1: injection off, read the read layers (all rows: the mean needs every prompt position, and
            // the last layer keeps only output rows, so every position is an output when it is mean-pooled)
            const bool all_out = need_mean && std::find(read_layers.begin(), read_layers.end(), n_layer - 1) != read_layers.end();
            cap.l_out.clear();
            cap.delta.clear();
            cap.l_out.insert(read_layers.begin(), read_layers.end());
            if (dump) {
                cap.l_out.insert(inject_layers.begin(), inject_layers.end());
            }
            if (prefix_layer >= 0) {
                cap.l_out.insert(prefix_layer);
            }
            cap.start();
            const int64_t t0 = ggml_time_us();
            decode(prompt.data(), n_prompt, 0, all_out, "pass 1");
            if (prefix_layer >= 0) {
                const auto & v = cap.rows("l_out-" + std::to_string(prefix_layer));
                if (v.size() < (size_t) n_prompt*n_embd) {
                    throw std::runtime_error("pass 1 read " + std::to_string(v.size()/n_embd) + " rows of layer " + std::to_string(prefix_layer));
                }
                prefix.assign(v.begin(), v.begin() + (size_t) n_prompt*n_embd);
                if (!dump && std::find(read_layers.begin(), read_layers.end(), prefix_layer) == read_layers.end()) {
                    cap.l_out.erase(prefix_layer); // the draft has no use for it
                }
            }
            cap.active = reads_answer; // answer reading: the read layers are read on through the draft
            const int64_t t1 = ggml_time_us();
            std::vector<size_t> prompt_rows; // rows each read layer gave for the prompt (1 for the final layer)
            for (int il : read_layers) {
                prompt_rows.push_back(cap.rows("l_out-" + std::to_string(il)).size()/n_embd);
            }

            feats.assign((size_t) n_read*n_feat, 0.0f);
            for (int r_i = 0; r_i < n_read; r_i++) {
                const auto & v = cap.rows("l_out-" + std::to_string(read_layers[r_i]));
                const int64_t n_rows = (int64_t) v.size()/n_embd;
                if (n_rows < 1 || (need_mean && n_rows != n_prompt)) {
                    throw std::runtime_error("pass 1 read " + std::to_string(n_rows) + " rows of layer " + std::to_string(read_layers[r_i]));
                }
                float * dst = feats.data() + (size_t) r_i*n_feat;
                if (pooling != LLAMA_DOUBTER_POOLING_MEAN) {
                    std::copy(v.end() - n_embd, v.end(), dst);
                }
                if (need_mean) {
                    float * mean = pooling == LLAMA_DOUBTER_POOLING_MEAN ? dst : dst + n_embd;
                    for (int64_t j = 0; j < n_embd; j++) {
                        double s = 0.0;
                        for (int64_t i = 0; i < n_rows; i++) {
                            s += v[i*n_embd + j];
                        }
                        mean[j] = (float) (s/n_rows);
                    }
                }
            }
            std::vector<float> states, signals; // answer reading: (n_answer, n_read, n_embd) and (n_answer, n_signals)
            if (drafting) { // the base's own answer, continuing pass 1 with the injection off
                const int n_draft = thresholded ? r.n_predict : max_draft;
                greedy(r, n_draft, n_prompt, draft, draft_text, [] {}, [] {}, reads_answer && n_signals > 0 ? &signals : nullptr);
            }
            if (reads_answer) {
                // a token's states are read when it is consumed: consume the last kept one if the draft stopped
                // at its length (as PyTorch's draft decodes one step past it)
                const size_t n_consumed = cap.rows("l_out-" + std::to_string(read_layers[0])).size()/n_embd - prompt_rows[0];
                if (n_consumed < draft.size()) {
                    decode(&draft.back(), 1, n_prompt + (int) draft.size() - 1, false, "reading the draft");
                }
                cap.active = false;
                const size_t n_answer = draft.size();
                if (n_signals > 0) {
                    states.assign(n_answer*n_read*n_embd, 0.0f);
                }
                for (int r_i = 0; r_i < n_read && n_answer > 0; r_i++) {
                    const auto & v = cap.rows("l_out-" + std::to_string(read_layers[r_i]));
                    if (v.size()/n_embd != prompt_rows[r_i] + n_answer) {
                        throw std::runtime_error("the draft read " + std::to_string(v.size()/n_embd - prompt_rows[r_i]) + " rows of layer " +
                                                 std::to_string(read_layers[r_i]) + " for " + std::to_string(n_answer) + " answer tokens");
                    }
                    const float * answer = v.data() + prompt_rows[r_i]*n_embd; // the answer's rows of this layer
                    const float * last = answer + (n_answer - 1)*n_embd;
                    std::copy(last, last + n_embd, feats.data() + (size_t) r_i*n_feat);
                    for (size_t l = 0; l < n_answer && n_signals > 0; l++) {
                        std::copy(answer + l*n_embd, answer + (l + 1)*n_embd, states.data() + (l*n_read + r_i)*n_embd);
                    }
                }
            }
            if (dump) {
                for (const auto & [name, v] : cap.data) {
                    write_npy(r.dump_dir + "/pass1_" + name + ".npy", v, n_embd);
                }
                write_npy(r.dump_dir + "/features.npy", feats, n_feat);
                if (n_signals > 0) {
                    write_npy(r.dump_dir + "/answer_states.npy", states, n_embd);
                    write_npy(r.dump_dir + "/token_signals.npy", signals, n_signals);
                }
            }
            const int64_t t2 = ggml_time_us();

            tokens.assign((size_t) n_tok*n_embd, 0.0f);
            const int rc = reads_answer
                ? llama_doubter_encode_answer(ctx, feats.data(), feats.size(), states.empty() ? nullptr : states.data(),
                                              signals.empty() ? nullptr : signals.data(), (int32_t) draft.size(), tokens.data())
                : llama_doubter_encode(ctx, feats.data(), feats.size(), tokens.data());
            if (rc != 0) {
                throw std::runtime_error("the Doubter encoder failed");
            }
            if (head) { // the head's confidence needs the encoder only
                float lo = 0.0f;
                if (llama_doubter_adapter_head_log_odds(adapter, tokens.data(), tokens.size(), &lo, n_threads) != 0) {
                    throw std::runtime_error("the Doubter's confidence head failed");
                }
                log_odds   = lo;
                confidence = 1.0/(1.0 + std::exp(-(double) lo));
            }
            const int64_t t3 = ggml_time_us();
            t_pass1_ms  = elapsed_ms(t0, t1);
            t_draft_ms  = elapsed_ms(t1, t2);
            t_encode_ms = elapsed_ms(t2, t3);
            if (dump) {
                write_npy(r.dump_dir + "/cognitive_tokens.npy", tokens, n_embd);
            }

            // a sliding-window cache may have handed prompt cells to the draft: then no prefix reuse
            const int n_swa = llama_model_n_swa(model);
            if (n_swa > 0 && !draft.empty() && n_prompt + (int) draft.size() + 1 > n_swa) {
                prefix.clear();
            }
            // keep the data: with a prefix, pass 2 re-decodes the prompt into the same cells and leaves the layers
            // below the first inject layer as pass 1 wrote them
            llama_memory_clear(llama_get_memory(ctx), prefix.empty());
            if (llama_doubter_set_inject(ctx, true) != 0) {
                throw std::runtime_error("failed to switch the injection on");
            }
            cap.l_out.clear();
            if (refresh && need_mean) { // the mean of dynamic refresh runs on over the generated tokens
                running_sum.assign((size_t) n_read*n_embd, 0.0f);
                const int off = pooling == LLAMA_DOUBTER_POOLING_MEAN ? 0 : (int) n_embd;
                for (int r_i = 0; r_i < n_read; r_i++) {
                    for (int64_t j = 0; j < n_embd; j++) {
                        running_sum[r_i*n_embd + j] = feats[(size_t) r_i*n_feat + off + j]*n_prompt;
                    }
                }
                running_count = n_prompt;
            }
        }

        // after each pass-2 forward: the live features and re-encoding on drift, as PyTorch's `_decode_controls`
        // (the prompt forward only counts as a step)
        int step = 0;
        auto after_forward = [&](bool decode_step) {
            step++;
            if (!refresh || !decode_step) {
                return;
            }
            std::vector<float> current((size_t) n_read*n_feat);
            for (int r_i = 0; r_i < n_read; r_i++) {
                const float * last = newest_row(read_layers[r_i]);
                if (!last) {
                    throw std::runtime_error("no live state of layer " + std::to_string(read_layers[r_i]));
                }
                float * dst = current.data() + (size_t) r_i*n_feat;
                if (pooling != LLAMA_DOUBTER_POOLING_MEAN) {
                    std::copy(last, last + n_embd, dst);
                }
                if (pooling != LLAMA_DOUBTER_POOLING_LAST) {
                    float * mean = pooling == LLAMA_DOUBTER_POOLING_MEAN ? dst : dst + n_embd;
                    for (int64_t j = 0; j < n_embd; j++) {
                        running_sum[r_i*n_embd + j] += last[j];
                        mean[j] = (float) (running_sum[r_i*n_embd + j]/(running_count + 1.0));
                    }
                }
            }
            running_count += 1.0;
            if (step % refresh_interval != 0) {
                return;
            }
            double sim = 0.0;
            for (int r_i = 0; r_i < n_read; r_i++) {
                double dot = 0.0, na = 0.0, nb = 0.0;
                for (int j = 0; j < n_feat; j++) {
                    const double a = current[(size_t) r_i*n_feat + j], b = feats[(size_t) r_i*n_feat + j];
                    dot += a*b; na += a*a; nb += b*b;
                }
                sim += dot/std::max(std::sqrt(na)*std::sqrt(nb), 1e-8);
            }
            if (sim/n_read < refresh_threshold) {
                if (llama_doubter_encode(ctx, current.data(), current.size(), nullptr) != 0) {
                    throw std::runtime_error("the Doubter encoder failed on refresh");
                }
                n_refresh++;
            }
        };

        // pass 2 (or the only pass): the prompt, then greedy decoding unless the threshold decides
        const int64_t t_p0 = ggml_time_us();
        if (adapter && pass2) {
            llama_doubter_set_alpha(ctx, llama_doubter_adapter_agc_alpha(adapter, step));
            if (dump) { // the pass-2 prompt also gives each inject layer's output and cross-attention delta
                cap.l_out.insert(inject_layers.begin(), inject_layers.end());
                cap.delta.insert(inject_layers.begin(), inject_layers.end());
            }
            cap.start();
        }
        if (!prefix.empty() && llama_doubter_set_prefix(ctx, prefix.data(), prefix.size()) != 0) {
            throw std::runtime_error("failed to set the Doubter prefix");
        }
        if (pass2) {
            decode(prompt.data(), n_prompt, 0, false, "prompt processing");
        }
        if (!prefix.empty() && llama_doubter_set_prefix(ctx, nullptr, 0) != 0) {
            throw std::runtime_error("failed to clear the Doubter prefix");
        }
        if (adapter && decision) {
            const llama_token token = refusal_token(r.prompt);
            const double lo = decision_log_odds(token);
            log_odds    = lo;
            confidence  = 1.0/(1.0 + std::exp(-lo));
            refusal_tok = token;
        }
        if (adapter && pass2) {
            if (dump) {
                for (const auto & [name, v] : cap.data) {
                    write_npy(r.dump_dir + "/pass2_" + name + ".npy", v, n_embd);
                }
            }
            after_forward(false);
            cap.delta.clear();
            cap.l_out.clear();
            if (refresh) {
                cap.l_out.insert(read_layers.begin(), read_layers.end());
            }
        }
        const int64_t t_p1 = ggml_time_us();

        std::vector<llama_token> generated;
        std::string text;
        int n_decode = 0;
        json action = nullptr;
        if (thresholded) {
            const bool answer = confidence.get<double>() >= r.threshold;
            action    = answer ? "answered" : "declined";
            generated = answer ? draft : std::vector<llama_token>();
            text      = answer ? draft_text : refusal;
        } else {
            n_decode = greedy(r, r.n_predict, n_prompt, generated, text,
                [&] { if (adapter) { llama_doubter_set_alpha(ctx, llama_doubter_adapter_agc_alpha(adapter, step)); cap.start(); } },
                [&] { if (adapter) { after_forward(true); } });
        }
        const int64_t t_p2 = ggml_time_us();

        const double t_pass2_prompt_ms = elapsed_ms(t_p0, t_p1);
        const double t_decode_ms = elapsed_ms(t_p1, t_p2);
        json declined = nullptr;
        if (adapter) {
            const std::string refusal_trimmed = trim(refusal);
            declined = thresholded ? action == "declined" : trim(text).compare(0, refusal_trimmed.size(), refusal_trimmed) == 0;
            if (!thresholded) {
                action = declined.get<bool>() ? "declined" : "answered";
            }
        }
        json out;
        out["mode"]          = adapter ? "doubter" : "plain";
        out["text"]          = text;
        out["declined"]      = declined;
        out["action"]        = action;
        out["confidence"]    = confidence; // null without the Doubter or with a ratio-trained one
        out["confidence_kind"] = adapter ? json(confidence_kind()) : json(nullptr);
        out["log_odds"]      = log_odds;
        out["threshold"]     = thresholded ? json(r.threshold) : json(nullptr);
        out["refusal_token"] = refusal_tok;
        out["draft"]         = drafting ? json(draft_text) : json(nullptr);
        out["draft_tokens"]  = drafting ? json(draft) : json(nullptr);
        out["n_prompt"]      = n_prompt;
        out["n_gen"]         = generated.size();
        out["n_refresh"]     = n_refresh;
        out["prefix_reuse"]  = !prefix.empty(); // pass 2 started at the first inject layer
        out["n_threads"]     = n_threads;
        out["timing"] = {
            {"pass1_ms", t_pass1_ms}, {"draft_ms", t_draft_ms}, {"encode_ms", t_encode_ms},
            {"pass2_prompt_ms", t_pass2_prompt_ms}, {"prompt_ms", t_pass1_ms + t_draft_ms + t_encode_ms + t_pass2_prompt_ms},
            {"decode_ms", t_decode_ms}, {"decode_tokens", n_decode},
            {"decode_tok_s", n_decode > 0 ? n_decode/(t_decode_ms/1000.0) : 0.0},
        };
        out["tokens"] = generated;
        return out;
    }
};

static std::string dumped(const json & j) {
    return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

// --jsonl: a first line {"ready": true, ...} once loaded, then one reply line per request line; a bad request gets
// {"error": ...} and the loop goes on
static int serve_lines(engine & eng, const params & p) {
    json ready = {{"ready", true}, {"mode", eng.adapter ? "doubter" : "plain"}, {"n_ctx", eng.n_ctx},
                  {"confidence_kind", eng.adapter ? json(eng.confidence_kind()) : json(nullptr)},
                  {"refusal_text", eng.adapter ? json(eng.refusal) : json(nullptr)}};
    std::cout << dumped(ready) << std::endl; // the model and sidecar loaded: requests may come
    std::string line;
    while (std::getline(std::cin, line)) {
        if (trim(line).empty()) {
            continue;
        }
        json reply;
        try {
            const json in = json::parse(line);
            if (!in.is_object()) {
                throw std::runtime_error("a request is a JSON object");
            }
            for (const auto & [key, value] : in.items()) {
                if (key != "prompt" && key != "n_predict" && key != "stop" && key != "threshold" && key != "ignore_eos" && key != "id") {
                    throw std::runtime_error("unknown field '" + key + "'");
                }
            }
            request r = p.req;
            if (!in.contains("prompt") || !in["prompt"].is_string()) {
                throw std::runtime_error("'prompt' must be a string");
            }
            r.prompt = in["prompt"].get<std::string>();
            if (in.contains("n_predict")) {
                if (!in["n_predict"].is_number_integer() || in["n_predict"].get<int64_t>() < 1 || in["n_predict"].get<int64_t>() > eng.n_ctx) {
                    throw std::runtime_error("'n_predict' must be a positive integer no larger than the context");
                }
                r.n_predict = (int) in["n_predict"].get<int64_t>();
            }
            if (in.contains("stop")) {
                if (!in["stop"].is_array()) {
                    throw std::runtime_error("'stop' must be a list of non-empty strings");
                }
                r.stop.clear();
                for (const auto & s : in["stop"]) {
                    if (!s.is_string() || s.get<std::string>().empty()) {
                        throw std::runtime_error("'stop' must be a list of non-empty strings");
                    }
                    r.stop.push_back(s.get<std::string>());
                }
            }
            if (in.contains("threshold")) {
                if (in["threshold"].is_null()) {
                    r.threshold = NAN;
                } else if (!in["threshold"].is_number()) {
                    throw std::runtime_error("'threshold' must be a number in [0, 1] or null");
                } else {
                    r.threshold = in["threshold"].get<double>();
                }
            }
            if (in.contains("ignore_eos")) {
                if (!in["ignore_eos"].is_boolean()) {
                    throw std::runtime_error("'ignore_eos' must be true or false");
                }
                r.ignore_eos = in["ignore_eos"].get<bool>();
            }
            reply = eng.run(r);
            if (in.contains("id")) {
                reply["id"] = in["id"];
            }
        } catch (const std::exception & e) {
            reply = {{"error", e.what()}};
        }
        std::cout << dumped(reply) << std::endl;
    }
    return 0;
}

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");

    params p;
    if (!parse_args(argc, argv, p)) {
        usage(argv[0]);
        return 2;
    }
    llama_log_set(log_cb, &p.verbose);
    llama_backend_init();

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(p.model.c_str(), mparams);
    if (!model) {
        fprintf(stderr, "error: failed to load model '%s'\n", p.model.c_str());
        return 1;
    }
    llama_adapter_doubter * adapter = nullptr;
    if (p.doubter) {
        adapter = llama_doubter_adapter_init(model, p.sidecar.c_str());
        if (!adapter) {
            fprintf(stderr, "error: failed to load Doubter sidecar '%s'\n", p.sidecar.c_str());
            llama_model_free(model);
            return 1;
        }
    }
    const int n_ctx_train = llama_model_n_ctx_train(model);
    int status = 0;
    try {
        if (p.jsonl) {
            const int n_ctx = p.n_ctx > 0 ? p.n_ctx : std::min(4096, n_ctx_train);
            if (n_ctx > n_ctx_train) {
                throw std::runtime_error("-c " + std::to_string(n_ctx) + " is larger than the model's context of " +
                                         std::to_string(n_ctx_train) + " tokens");
            }
            engine eng(model, adapter, n_ctx, p.n_threads);
            eng.prefix_reuse = p.prefix_reuse;
            status = serve_lines(eng, p);
        } else {
            const int n_prompt = (int) tokenize(llama_model_get_vocab(model), p.req.prompt, true).size();
            if (n_prompt + p.req.n_predict > n_ctx_train) {
                throw std::runtime_error("the prompt has " + std::to_string(n_prompt) + " tokens and -n asks for " +
                                         std::to_string(p.req.n_predict) + " more, but the model's context is " +
                                         std::to_string(n_ctx_train) + " tokens");
            }
            const int n_draft = adapter ? llama_doubter_adapter_max_draft_tokens(adapter) : 0; // answer reading's draft
            engine eng(model, adapter, n_prompt + std::max(p.req.n_predict, n_draft), p.n_threads);
            eng.prefix_reuse = p.prefix_reuse;
            const json out = eng.run(p.req);
            if (p.json_out) {
                printf("%s\n", dumped(out).c_str());
            } else {
                const auto & t = out["timing"];
                printf("%s\n", out["text"].get<std::string>().c_str());
                printf("llama-doubter: mode=%s n_prompt=%d n_gen=%d n_refresh=%d action=%s confidence=%s pass1_ms=%.3f "
                       "encode_ms=%.3f pass2_prompt_ms=%.3f prompt_ms=%.3f decode_ms=%.3f decode_tokens=%d decode_tok_s=%.3f\n",
                       out["mode"].get<std::string>().c_str(), out["n_prompt"].get<int>(), out["n_gen"].get<int>(),
                       out["n_refresh"].get<int>(), out["action"].is_null() ? "null" : out["action"].get<std::string>().c_str(),
                       out["confidence"].dump().c_str(), t["pass1_ms"].get<double>(), t["encode_ms"].get<double>(),
                       t["pass2_prompt_ms"].get<double>(), t["prompt_ms"].get<double>(), t["decode_ms"].get<double>(),
                       t["decode_tokens"].get<int>(), t["decode_tok_s"].get<double>());
            }
        }
    } catch (const std::exception & e) {
        fprintf(stderr, "error: %s\n", e.what());
        status = 1;
    }
    llama_doubter_adapter_free(adapter);
    llama_model_free(model);
    llama_backend_free();
    return status;
}
