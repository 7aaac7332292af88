"""`edge-rag serve` vs llama-cpp-python's OpenAI server, same model, over HTTP, streaming.

    python bench/bench_serve.py [--engine BUNDLE] [--threads 2] [--runs 5] [--max-tokens 64]

Both serve SmolLM2-135M-Instruct from the same GGUF (edge.models.defaults.default_generator_path):
edge-rag from its default int4 bundle built from it, llama.cpp (llama-cpp-python's
`python -m llama_cpp.server`) from the GGUF itself, each in its own process with `--threads`
threads. The client sends the same chat requests to each, one at a time (greedy, streamed):

  ttft_ms        request sent -> first content chunk received
  decode_tok_s   (completion tokens - 1) / (last chunk - first chunk); completion tokens from
                 the same request sent unstreamed right after (greedy: the same tokens), its `usage`
  total_ms       request sent -> `[DONE]`
  rss_mib        the server process's resident memory after the runs

Consecutive prompts differ, but all start with SmolLM2's default system prompt: llama.cpp's
server reuses that cached prefix (edge-rag has no prefix cache yet), which shows in its TTFT.
One JSON line per figure, medians over runs and prompts, then the edge / llama.cpp ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "Explain what a watchdog timer does in an embedded controller.",
    "List three checks before restarting a stalled conveyor.",
    "Why do lithium batteries lose capacity in the cold?",
]


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return urllib.request.urlopen(req, timeout=300)


def _wait(base: str, proc: subprocess.Popen, limit_s: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < limit_s:
        if proc.poll() is not None:
            raise SystemExit(f"server {base} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(base + "/v1/models", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"server {base} did not come up in {limit_s} s")


def _one(base: str, prompt: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    t_first = t_last = None
    text = []
    with _post(base + "/v1/chat/completions", body | {"stream": True}) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content")
            if delta:
                t_last = time.perf_counter()
                t_first = t_first or t_last
                text.append(delta)
    t_end = time.perf_counter()
    # the token count from the same request unstreamed, sent after (llama.cpp reuses a cached
    # prompt prefix: sent before, it would make the measured request's prefill free)
    usage = json.loads(_post(base + "/v1/chat/completions", body).read())["usage"]
    n = int(usage["completion_tokens"])
    return {"ttft_ms": 1e3 * (t_first - t0), "total_ms": 1e3 * (t_end - t0), "tokens": n,
            "decode_tok_s": (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", help="edge-rag generator bundle (default: the default engine, built on first use)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=18080, help="edge-rag; llama.cpp gets port + 1")
    args = ap.parse_args()
    import psutil

    from edge.engines import tiny_generator_bundle as default_generator_bundle  # SmolLM2: the GGUF the peer runs
    from edge.models.defaults import default_generator_path

    engine = args.engine or str(default_generator_bundle())
    gguf = str(default_generator_path())
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cli = str(Path(sys.executable).with_name("edge-rag"))
    servers = {  # edge-rag also holds its embedder (serve always loads it): its RSS includes that
        "edge-rag": [cli, "serve", "--port", str(args.port), "--engine", engine, "--backend", "onnxruntime",
                     "--threads", str(args.threads), "--collection", "bench-serve-none"],
        "llama-cpp-python": [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(args.port + 1),
                             "--n_threads", str(args.threads), "--n_ctx", "2048", "--verbose", "False"],
    }
    results = {}
    for i, (name, cmd) in enumerate(servers.items()):
        base = f"http://127.0.0.1:{args.port + i}"
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait(base, proc)
            _one(base, PROMPTS[0], 8)  # warm-up
            runs = [_one(base, p, args.max_tokens) for _ in range(args.runs) for p in PROMPTS]
            rss = psutil.Process(proc.pid).memory_info().rss
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        fig = {k: round(statistics.median(r[k] for r in runs), 1) for k in ("ttft_ms", "decode_tok_s", "total_ms")}
        fig["completion_tokens"] = round(statistics.mean(r["tokens"] for r in runs), 1)
        results[name] = fig
        print(json.dumps({"figure": "serve_stream", "server": name, "threads": args.threads, "max_tokens": args.max_tokens,
                          "requests": len(runs), **fig, "rss_mib": round(rss / 2**20, 1),
                          "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
    e, p = results["edge-rag"], results["llama-cpp-python"]
    print(json.dumps({"figure": "serve_ratio", "decode_edge_over_llama_cpp": round(e["decode_tok_s"] / p["decode_tok_s"], 2),
                      "ttft_llama_cpp_over_edge": round(p["ttft_ms"] / e["ttft_ms"], 2)}), flush=True)


if __name__ == "__main__":
    main()
