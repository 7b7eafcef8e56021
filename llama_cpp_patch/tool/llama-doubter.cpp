// llama-doubter: two-pass generation with a Doubter sidecar.
//
// Pass 1 runs the prompt with injection off and reads each read layer's `l_out-<il>` through cb_eval, the
// encoder turns the pooled features into cognitive tokens, the KV cache is cleared, and pass 2 runs the prompt
// and the greedy decode with the cross-attention injected (AGC gain and dynamic refresh as the sidecar says).
// --no-doubter runs plain greedy generation from the same binary, for speed comparisons.

#include "llama.h"
#include "llama-doubter.h"

#include <algorithm>
#include <clocale>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

struct params {
    std::string model;
    std::string sidecar;
    std::string prompt;
    std::string dump_dir;
    int  n_predict  = 64;
    int  n_threads  = (int) std::min(4u, std::max(1u, std::thread::hardware_concurrency()));
    bool doubter    = true;
    bool ignore_eos = false;
    bool json       = false;
    bool verbose    = false;
};

static void usage(const char * argv0) {
    fprintf(stderr,
        "usage: %s -m base.gguf (--sidecar doubter.gguf | --no-doubter) -p PROMPT [options]\n"
        "  -n N             tokens to generate (default 64)\n"
        "  -t N             threads (default min(4, cores))\n"
        "  --ignore-eos     keep generating after end-of-generation tokens\n"
        "  --json           print one JSON object instead of text and a timing line\n"
        "  --dump-dir DIR   write pass-1/pass-2 activations, features and cognitive tokens as .npy files\n"
        "  -v               show llama.cpp's log\n", argv0);
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
        if      (a == "-m")             { p.model      = next(); }
        else if (a == "--sidecar")      { p.sidecar    = next(); }
        else if (a == "-p")             { p.prompt     = next(); }
        else if (a == "-n")             { p.n_predict  = atoi(next()); }
        else if (a == "-t")             { p.n_threads  = atoi(next()); }
        else if (a == "--dump-dir")     { p.dump_dir   = next(); }
        else if (a == "--no-doubter")   { p.doubter    = false; }
        else if (a == "--ignore-eos")   { p.ignore_eos = true; }
        else if (a == "--json")         { p.json       = true; }
        else if (a == "-v")             { p.verbose    = true; }
        else if (a == "-h" || a == "--help") { usage(argv[0]); exit(0); }
        else {
            fprintf(stderr, "error: unknown argument '%s'\n", a.c_str());
            return false;
        }
    }
    if (p.model.empty() || p.prompt.empty() || (p.doubter && p.sidecar.empty()) || p.n_predict < 1 || p.n_threads < 1) {
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

static std::string json_escape(const std::string & s) {
    std::string out;
    for (unsigned char c : s) {
        switch (c) {
            case '"':  out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n";  break;
            case '\r': out += "\\r";  break;
            case '\t': out += "\\t";  break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    snprintf(buf, sizeof(buf), "\\u%04x", c);
                    out += buf;
                } else {
                    out += (char) c;
                }
        }
    }
    return out;
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
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int64_t n_embd  = llama_model_n_embd(model);
    const int     n_layer = llama_model_n_layer(model);

    llama_adapter_doubter * adapter = nullptr;
    if (p.doubter) {
        adapter = llama_doubter_adapter_init(model, p.sidecar.c_str());
        if (!adapter) {
            fprintf(stderr, "error: failed to load Doubter sidecar '%s'\n", p.sidecar.c_str());
            llama_model_free(model);
            return 1;
        }
    }

    const int n_prompt = -llama_tokenize(vocab, p.prompt.c_str(), p.prompt.size(), NULL, 0, true, true);
    std::vector<llama_token> prompt(n_prompt);
    if (n_prompt <= 0 || llama_tokenize(vocab, p.prompt.c_str(), p.prompt.size(), prompt.data(), prompt.size(), true, true) < 0) {
        fprintf(stderr, "error: failed to tokenize the prompt\n");
        return 1;
    }

    capture cap;
    cap.n_embd = n_embd;

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx           = n_prompt + p.n_predict;
    cparams.n_batch         = n_prompt;
    cparams.n_threads       = p.n_threads;
    cparams.n_threads_batch = p.n_threads;
    cparams.no_perf         = false;
    if (adapter) {
        cparams.cb_eval           = cb_eval;
        cparams.cb_eval_user_data = &cap;
    }
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        fprintf(stderr, "error: failed to create the llama_context\n");
        return 1;
    }
    if (adapter && llama_set_doubter(ctx, adapter) != 0) {
        fprintf(stderr, "error: failed to attach the Doubter adapter\n");
        return 1;
    }

    llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    llama_batch_ext * batch = llama_batch_ext_init(ctx);

    const bool dump = !p.dump_dir.empty();
    double t_pass1_ms = 0.0, t_encode_ms = 0.0;
    int n_refresh = 0;

    // Doubter state
    int n_read = 0, n_feat = 0, n_tok = 0, refresh_interval = 0;
    float refresh_threshold = 0.0f;
    bool refresh = false;
    llama_doubter_pooling pooling = LLAMA_DOUBTER_POOLING_LAST;
    std::vector<int> read_layers, inject_layers;
    std::vector<float> feats, tokens, running_sum;
    double running_count = 0.0;

    auto newest_row = [&](int il) -> const float * {
        const auto & v = cap.rows("l_out-" + std::to_string(il));
        return v.size() >= (size_t) n_embd ? v.data() + v.size() - n_embd : nullptr;
    };

    if (adapter) {
        n_read  = llama_doubter_adapter_n_read(adapter);
        n_feat  = llama_doubter_adapter_n_feat(adapter);
        n_tok   = llama_doubter_adapter_n_tokens(adapter);
        pooling = llama_doubter_adapter_pooling(adapter);
        refresh = llama_doubter_adapter_refresh(adapter, &refresh_interval, &refresh_threshold);
        for (int i = 0; i < n_read; i++) {
            read_layers.push_back(llama_doubter_adapter_read_layer(adapter, i));
        }
        for (int i = 0; i < llama_doubter_adapter_n_inject(adapter); i++) {
            inject_layers.push_back(llama_doubter_adapter_inject_layer(adapter, i));
        }

        // pass 1: injection off, read the read layers (all rows: the mean needs every prompt position, and
        // the last layer keeps only output rows, so every position is an output when it is mean-pooled)
        const bool need_mean = pooling != LLAMA_DOUBTER_POOLING_LAST;
        const bool all_out   = need_mean && std::find(read_layers.begin(), read_layers.end(), n_layer - 1) != read_layers.end();
        cap.l_out.clear();
        cap.delta.clear();
        for (int il : read_layers) {
            cap.l_out.insert(il);
        }
        if (dump) {
            for (int il : inject_layers) {
                cap.l_out.insert(il);
            }
        }
        cap.start();
        const int64_t t0 = ggml_time_us();
        batch_set(batch, prompt.data(), n_prompt, 0, all_out);
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch) != 0) {
            fprintf(stderr, "error: pass 1 failed\n");
            return 1;
        }
        cap.active = false;
        const int64_t t1 = ggml_time_us();

        feats.assign((size_t) n_read*n_feat, 0.0f);
        for (int r = 0; r < n_read; r++) {
            const auto & v = cap.rows("l_out-" + std::to_string(read_layers[r]));
            const int64_t n_rows = (int64_t) v.size()/n_embd;
            if (n_rows < 1 || (need_mean && n_rows != n_prompt)) {
                fprintf(stderr, "error: pass 1 read %lld rows of layer %d\n", (long long) n_rows, read_layers[r]);
                return 1;
            }
            float * dst = feats.data() + (size_t) r*n_feat;
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
        if (dump) {
            for (const auto & [name, v] : cap.data) {
                write_npy(p.dump_dir + "/pass1_" + name + ".npy", v, n_embd);
            }
            write_npy(p.dump_dir + "/features.npy", feats, n_feat);
        }

        tokens.assign((size_t) n_tok*n_embd, 0.0f);
        if (llama_doubter_encode(ctx, feats.data(), feats.size(), tokens.data()) != 0) {
            fprintf(stderr, "error: the Doubter encoder failed\n");
            return 1;
        }
        const int64_t t2 = ggml_time_us();
        t_pass1_ms  = (t1 - t0)/1000.0;
        t_encode_ms = (t2 - t1)/1000.0;
        if (dump) {
            write_npy(p.dump_dir + "/cognitive_tokens.npy", tokens, n_embd);
        }

        llama_memory_clear(llama_get_memory(ctx), true);
        if (llama_doubter_set_inject(ctx, true) != 0) {
            return 1;
        }

        // with dynamic refresh, the decode steps of pass 2 read the read layers' newest row
        cap.l_out.clear();
        if (refresh) {
            if (need_mean) {
                running_sum.assign((size_t) n_read*n_embd, 0.0f);
                const int off = pooling == LLAMA_DOUBTER_POOLING_MEAN ? 0 : (int) n_embd;
                for (int r = 0; r < n_read; r++) {
                    for (int64_t j = 0; j < n_embd; j++) {
                        running_sum[r*n_embd + j] = feats[(size_t) r*n_feat + off + j]*n_prompt;
                    }
                }
                running_count = n_prompt;
            }
        }
    }

    // after each pass-2 forward: the live features and re-encoding on drift, as PyTorch's `_decode_controls`
    // (the prompt forward only counts as a step)
    int step = 0;
    auto after_forward = [&](bool decode_step) -> bool {
        step++;
        if (!refresh || !decode_step) {
            return true;
        }
        std::vector<float> current((size_t) n_read*n_feat);
        for (int r = 0; r < n_read; r++) {
            const float * last = newest_row(read_layers[r]);
            if (!last) {
                fprintf(stderr, "error: no live state of layer %d\n", read_layers[r]);
                return false;
            }
            float * dst = current.data() + (size_t) r*n_feat;
            if (pooling != LLAMA_DOUBTER_POOLING_MEAN) {
                std::copy(last, last + n_embd, dst);
            }
            if (pooling != LLAMA_DOUBTER_POOLING_LAST) { // the mean runs on over the generated tokens
                float * mean = pooling == LLAMA_DOUBTER_POOLING_MEAN ? dst : dst + n_embd;
                for (int64_t j = 0; j < n_embd; j++) {
                    running_sum[r*n_embd + j] += last[j];
                    mean[j] = (float) (running_sum[r*n_embd + j]/(running_count + 1.0));
                }
            }
        }
        running_count += 1.0;
        if (step % refresh_interval != 0) {
            return true;
        }
        double sim = 0.0;
        for (int r = 0; r < n_read; r++) {
            double dot = 0.0, na = 0.0, nb = 0.0;
            for (int j = 0; j < n_feat; j++) {
                const double a = current[(size_t) r*n_feat + j], b = feats[(size_t) r*n_feat + j];
                dot += a*b; na += a*a; nb += b*b;
            }
            sim += dot/std::max(std::sqrt(na)*std::sqrt(nb), 1e-8);
        }
        if (sim/n_read < refresh_threshold) {
            if (llama_doubter_encode(ctx, current.data(), current.size(), nullptr) != 0) {
                return false;
            }
            n_refresh++;
        }
        return true;
    };

    // pass 2 (or the only pass): prompt, then greedy decode
    const int64_t t_p0 = ggml_time_us();
    if (adapter) {
        llama_doubter_set_alpha(ctx, llama_doubter_adapter_agc_alpha(adapter, step));
        if (dump) { // the pass-2 prompt also gives each inject layer's output and cross-attention delta
            for (int il : inject_layers) {
                cap.l_out.insert(il);
                cap.delta.insert(il);
            }
        }
        cap.start();
    }
    batch_set(batch, prompt.data(), n_prompt, 0, false);
    if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch) != 0) {
        fprintf(stderr, "error: prompt processing failed\n");
        return 1;
    }
    if (adapter) {
        if (dump) {
            for (const auto & [name, v] : cap.data) {
                write_npy(p.dump_dir + "/pass2_" + name + ".npy", v, n_embd);
            }
        }
        if (!after_forward(false)) {
            return 1;
        }
        cap.delta.clear();
        cap.l_out.clear();
        for (int il : refresh ? read_layers : std::vector<int>()) {
            cap.l_out.insert(il);
        }
    }
    const int64_t t_p1 = ggml_time_us();

    std::vector<llama_token> generated;
    std::string text;
    int n_decode = 0;
    for (int n_pos = n_prompt; ; ) {
        const llama_token id = llama_sampler_sample(smpl, ctx, -1);
        if (!p.ignore_eos && llama_vocab_is_eog(vocab, id)) {
            break;
        }
        generated.push_back(id);
        char buf[256];
        const int n = llama_token_to_piece(vocab, id, buf, sizeof(buf), 0, false);
        if (n > 0) {
            text.append(buf, n);
        }
        if ((int) generated.size() >= p.n_predict) {
            break;
        }
        if (adapter) {
            llama_doubter_set_alpha(ctx, llama_doubter_adapter_agc_alpha(adapter, step));
            cap.start();
        }
        batch_set(batch, &id, 1, n_pos, false);
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch) != 0) {
            fprintf(stderr, "error: decoding failed\n");
            return 1;
        }
        n_pos++;
        n_decode++;
        if (adapter && !after_forward(true)) {
            return 1;
        }
    }
    const int64_t t_p2 = ggml_time_us();

    const double t_pass2_prompt_ms = (t_p1 - t_p0)/1000.0;
    const double t_prompt_ms = t_pass1_ms + t_encode_ms + t_pass2_prompt_ms; // time to the first token
    const double t_decode_ms = (t_p2 - t_p1)/1000.0;
    const double decode_tok_s = n_decode > 0 ? n_decode/(t_decode_ms/1000.0) : 0.0;
    const char * mode = adapter ? "doubter" : "plain";
    std::string declined = "null";
    if (adapter) {
        const std::string refusal = trim(llama_doubter_adapter_refusal_text(adapter));
        declined = trim(text).compare(0, refusal.size(), refusal) == 0 ? "true" : "false";
    }

    if (p.json) {
        printf("{\"mode\": \"%s\", \"text\": \"%s\", \"declined\": %s, \"n_prompt\": %d, \"n_gen\": %zu, \"n_refresh\": %d, "
               "\"n_threads\": %d, \"timing\": {\"pass1_ms\": %.3f, \"encode_ms\": %.3f, \"pass2_prompt_ms\": %.3f, "
               "\"prompt_ms\": %.3f, \"decode_ms\": %.3f, \"decode_tokens\": %d, \"decode_tok_s\": %.3f}, \"tokens\": [",
               mode, json_escape(text).c_str(), declined.c_str(), n_prompt, generated.size(), n_refresh, p.n_threads,
               t_pass1_ms, t_encode_ms, t_pass2_prompt_ms, t_prompt_ms, t_decode_ms, n_decode, decode_tok_s);
        for (size_t i = 0; i < generated.size(); i++) {
            printf("%s%d", i ? ", " : "", generated[i]);
        }
        printf("]}\n");
    } else {
        printf("%s\n", text.c_str());
        printf("llama-doubter: mode=%s n_prompt=%d n_gen=%zu n_refresh=%d declined=%s pass1_ms=%.3f encode_ms=%.3f "
               "pass2_prompt_ms=%.3f prompt_ms=%.3f decode_ms=%.3f decode_tokens=%d decode_tok_s=%.3f\n",
               mode, n_prompt, generated.size(), n_refresh, declined.c_str(), t_pass1_ms, t_encode_ms,
               t_pass2_prompt_ms, t_prompt_ms, t_decode_ms, n_decode, decode_tok_s);
    }

    llama_batch_ext_free(batch);
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_doubter_adapter_free(adapter);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
