"""The engine core in-process (no HTTP): aggregate decode tok/s at 1..N concurrent requests, and
the inter-token latency of decoding requests while a long prompt arrives (chunked prefill).

    python bench/bench_engine.py [--engine BUNDLE] [--backend onnxruntime] [--threads 2]
                                 [--clients 1,4,8,16] [--new 128] [--long 3000]

One JSON line per figure. Aggregate decode tok/s = tokens after each request's first / (last
token time - first token time over all requests). ITL figures are per request gaps between tokens
(p50 / p99 over all requests). `edge-rag serve` over HTTP against llama-server: bench/bench_serve.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else 0.0


def run_clients(gen, prompts, params, delay_long=None):
    """Submit every prompt at once (plus, after `delay_long` s, a long one); per request: token times."""
    times = [[] for _ in prompts]
    t0 = time.perf_counter()

    def consume(i):
        s = gen.submit(prompts[i], params)
        for _ in s:
            times[i].append(time.perf_counter())

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    long_done = {}
    if delay_long is not None:
        text, at = delay_long
        time.sleep(at)
        ta = time.perf_counter()
        s = gen.submit(text, type(params)(max_tokens=1, temperature=0))
        s.text()
        long_done = {"long_prompt_tokens": s.request.stats.n_prompt, "long_ttft_ms": round((time.perf_counter() - ta) * 1e3, 1),
                     "long_window": (ta, time.perf_counter())}
    [t.join() for t in threads]
    return t0, times, long_done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--long", type=int, default=3000)
    args = ap.parse_args()
    from edge.engines import default_generator_bundle
    from edge.runtime.generator import Generator
    from edge.runtime.sampler import SamplingParams

    counts = [int(c) for c in args.clients.split(",")]
    gen = Generator.from_bundle(args.engine or default_generator_bundle(), backend=args.backend, threads=args.threads,
                                max_batch=max(counts + [9]))
    gen.reuse_prefix = False  # distinct work per request
    base = {"backend": args.backend, "threads": args.threads, "new_tokens": args.new, "max_seqs": gen.engine.scheduler.max_seqs,
            "load_avg": round(os.getloadavg()[0], 2)}
    topics = ["the battery", "the lidar", "a watchdog", "the charger", "firmware", "the map", "safety", "wifi"]
    p = SamplingParams(max_tokens=args.new, temperature=0.7, seed=1)  # sampled: lengths do not stop early on EOS
    gen.generate("warm up", SamplingParams(max_tokens=8, temperature=0))
    single = None
    for n in counts:
        prompts = [[{"role": "user", "content": f"Write a long story about {topics[i % len(topics)]} number {i}."}] for i in range(n)]
        t0, times, _ = run_clients(gen, prompts, p)
        firsts = [t[0] for t in times if t]
        lasts = [t[-1] for t in times if t]
        toks = sum(len(t) - 1 for t in times)
        agg = toks / (max(lasts) - min(firsts))
        itl = [b - a for t in times for a, b in zip(t, t[1:])]
        single = single or agg
        print(json.dumps({"figure": "engine_concurrency", **base, "clients": n, "aggregate_decode_tok_s": round(agg, 1),
                          "vs_1_client": round(agg / single, 2), "p50_ttft_ms": round(pct([f - t0 for f in firsts], 50) * 1e3, 1),
                          "p99_ttft_ms": round(pct([f - t0 for f in firsts], 99) * 1e3, 1),
                          "p99_itl_ms": round(pct(itl, 99) * 1e3, 1), "tokens": toks + len(times)}), flush=True)
    # chunked prefill: 8 decoding requests, then a long prompt arrives
    words = " ".join((ROOT / "examples" / "manuals" / f).read_text() for f in ("error_codes.md", "troubleshooting_guide.txt", "maintenance_schedule.txt")).split()
    long_text = ""
    n = 1000
    while len(gen.tokenizer.encode(long_text)) < args.long and n < 20 * args.long:
        long_text = " ".join((words * 10)[:n])
        n += 200
    prompts = [[{"role": "user", "content": f"Write a long story about {topics[i]}."}] for i in range(8)]
    for with_long in (False, True):
        _, times, info = run_clients(gen, prompts, p, (long_text, 1.0) if with_long else None)
        itl = [b - a for t in times for a, b in zip(t, t[1:])]
        if with_long:  # the gaps of the decoding requests while the long prompt was being prefilled
            a, b = info.pop("long_window")
            during = [y - x for t in times for x, y in zip(t, t[1:]) if y >= a and x <= b]
            info["p99_itl_during_prefill_ms"] = round(pct(during, 99) * 1e3, 1)
        print(json.dumps({"figure": "chunked_prefill_itl", **base, "decoding": 8, "long_prompt": with_long,
                          "p50_itl_ms": round(pct(itl, 50) * 1e3, 1), "p99_itl_ms": round(pct(itl, 99) * 1e3, 1),
                          "token_budget": gen.engine.scheduler.token_budget, "prefill_chunk": gen.engine.scheduler.prefill_chunk,
                          **info}), flush=True)


if __name__ == "__main__":
    main()
