"""The server's overhead over calling the same service in-process, and a load test with concurrent clients.

    python benchmarks/bench_serving.py --run-dir RUN [--backend pytorch|llama.cpp] [--questions 24] [--clients 6]

The questions are the first held-out test questions of the run. Each is answered in-process (`DoubterService.answer`)
and through `POST /v1/chat/completions` on a real uvicorn on 127.0.0.1 with the official `openai` client,
alternately, so machine load affects both alike; the overhead is the ratio of the medians (target <= 1.05). Then
`--clients` threads send every question `--rounds` times at once: every reply must equal the serial reply to its own
question (none lost or mixed up); p50/p95 latency and throughput are reported. Requests are served one at a time
(one model), so latency under load grows with the number of clients.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import time
from pathlib import Path

import openai
import torch

from peft_doubter.data.collection import load_cache
from peft_doubter.names import SERVE_BACKENDS
from peft_doubter.runs.manifest import read_manifest
from peft_doubter.serving import build_llama_cpp_service, build_service, running_server
from peft_doubter.serving.service import DoubterOptions


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--backend", choices=SERVE_BACKENDS, default="pytorch")
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    manifest = read_manifest(args.run_dir)
    cache = load_cache(args.run_dir / manifest["cache"])
    questions = [cache[i]["question"] for i, split in enumerate(cache["split"]) if split == "test"][:args.questions]
    service = build_service(args.run_dir, model_id="bench") if args.backend == "pytorch" else \
        build_llama_cpp_service(args.run_dir, model_id="bench", threads=args.threads)
    options = DoubterOptions()
    in_process, over_http, serial = [], [], {}
    with running_server(service) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(question: str) -> tuple[str, float]:
            start = time.perf_counter()
            reply = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": question}])
            return reply.choices[0].message.content, time.perf_counter() - start

        ask(questions[0])  # warm-up
        for question in questions:
            start = time.perf_counter()
            local = service.answer(question, options)
            in_process.append(time.perf_counter() - start)
            serial[question], seconds = ask(question)
            over_http.append(seconds)
            if serial[question] != local.text:
                raise SystemExit(f"the server's reply differs from the in-process answer for {question!r}")
        jobs = [q for _ in range(args.rounds) for q in questions]
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.clients) as pool:
            replies = list(pool.map(lambda q: (q, *ask(q)), jobs))
        wall = time.perf_counter() - start
    mixed = sum(text != serial[q] for q, text, _ in replies)
    latencies = [seconds for _, _, seconds in replies]
    result = {
        "backend": args.backend, "questions": len(questions),
        "in_process_median_s": statistics.median(in_process), "http_median_s": statistics.median(over_http),
        "overhead_ratio": statistics.median(over_http) / statistics.median(in_process),
        "load": {"clients": args.clients, "requests": len(replies), "lost_or_mixed": mixed,
                 "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
                 "requests_per_s": len(replies) / wall},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if mixed:
        raise SystemExit(f"{mixed} replies lost or mixed up")


if __name__ == "__main__":
    main()
