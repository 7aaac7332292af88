"""Abusive clients against `edge-rag serve`: do well-behaved clients keep their latency, and does
the server give its memory back?

    python bench/bench_abuse.py [--engine BUNDLE] [--threads 2] [--clients 32] [--requests 3]

One `edge-rag serve` process (default engines unless --engine; `--threads` ORT threads), then:

  1. baseline   `--clients` concurrent clients, each sending `--requests` chat requests one after
                another (greedy, max_tokens `--max-tokens`, not streamed); latency per request
  2. abused     the same load while one client asks for max_tokens 10^12 (streamed, read slowly)
                and another posts a 50 MB body; then the abusers are dropped
  3. embeddings one /v1/embeddings request at the limit (--max-embed-inputs texts of 2,000 chars),
                the request issue 13 saw raise the server from 377 MB to 1.29 GB

Figures (one JSON line each): p50/p99 latency of the well-behaved clients in 1 and 2 and their
ratio (target: p99 within 2x), what the abusers got (status, time to the 413, tokens streamed
before being dropped), and the server's RSS idle (after one warm-up request), after the load and
after the embeddings request, each read after the server has settled (target: within 10% of idle).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Explain what a watchdog timer does.", "List three checks before restarting a conveyor.",
           "Why do batteries lose capacity in the cold?", "What is a torque sensor?"]


def emit(fig: str, **kw) -> None:
    print(json.dumps({"figure": fig, **kw}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2 ** 20


def settled_rss(pid: int, secs: float = 6.0) -> float:
    """RSS once it stops moving (the last of a few readings a second apart)."""
    last = rss_mib(pid)
    for _ in range(int(secs)):
        time.sleep(1.0)
        last = rss_mib(pid)
    return last


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def chat(client, base: str, i: int, max_tokens: int) -> float:
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
            "temperature": 0}
    t0 = time.perf_counter()
    r = client.post(f"{base}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return (time.perf_counter() - t0) * 1e3


def load(base: str, clients: int, requests: int, max_tokens: int) -> list[float]:
    import httpx

    def one(c: int) -> list[float]:
        with httpx.Client() as cl:
            return [chat(cl, base, c + k, max_tokens) for k in range(requests)]

    with ThreadPoolExecutor(clients) as ex:
        return [x for xs in ex.map(one, range(clients)) for x in xs]


def greedy_abuser(base: str, stop: threading.Event, out: dict) -> None:
    """Streams max_tokens 10^12, reading slowly, until told to stop; then drops the connection."""
    import httpx

    body = {"messages": [{"role": "user", "content": "Write a very long story about a robot."}],
            "max_tokens": 10 ** 12, "temperature": 0.8, "seed": 1, "stream": True}
    n = 0
    t0 = time.perf_counter()
    out["requests"] = 0
    try:
        with httpx.Client(timeout=600) as cl:
            while not stop.is_set():  # the model may stop on its own: ask again, so one is always running
                body["seed"] += 1
                out["requests"] += 1
                with cl.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                    out["status"] = r.status_code
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            n += 1
                        if stop.is_set():
                            break
                        time.sleep(0.005)  # a slow reader
    except Exception as e:  # noqa: BLE001 - the figure says what happened
        out["error"] = f"{type(e).__name__}: {e}"
    out["chunks"] = n
    out["seconds"] = time.perf_counter() - t0


def big_poster(base: str, out: dict, mb: int = 50) -> None:
    """POSTs a `mb` MB JSON body as fast as the socket takes it; records status and time."""
    import httpx

    pad = "a" * (mb << 20)
    body = ('{"messages": [{"role": "user", "content": "hi"}], "pad": "' + pad + '"}').encode()
    t0 = time.perf_counter()
    try:
        r = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                       timeout=600)
        out["status"] = r.status_code
    except Exception as e:  # noqa: BLE001 - the server may close the connection mid-upload after its 413
        out["error"] = f"{type(e).__name__}: {str(e)[:120]}"
    out["seconds"] = time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=3, help="requests per well-behaved client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--embed-inputs", type=int, default=256)
    args = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "import sys; from edge.cli import main; sys.exit(main())", "serve", "--port", str(port),
           "--threads", str(args.threads), "--collection", "bench-abuse-none"]
    if args.engine:
        cmd += ["--engine", str(args.engine)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    srv = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        import httpx

        t0 = time.time()
        while True:
            if srv.poll() is not None:
                print(srv.stderr.read(), file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > 600:
                raise SystemExit("server did not start")
            time.sleep(0.5)
        health = httpx.get(f"{base}/health").json()
        with httpx.Client() as cl:
            chat(cl, base, 0, args.max_tokens)  # warm-up
        idle = settled_rss(srv.pid, 3)
        cond = {"threads": args.threads, "clients": args.clients, "requests_each": args.requests,
                "max_tokens": args.max_tokens, "generator": health.get("generator"), "cpus": os.cpu_count(),
                "loadavg": os.getloadavg()[0]}
        emit("rss_idle_mib", value=round(idle, 1), **cond)

        t = time.perf_counter()
        base_lat = load(base, args.clients, args.requests, args.max_tokens)
        emit("baseline_latency_ms", p50=round(pct(base_lat, 50)), p99=round(pct(base_lat, 99)), n=len(base_lat),
             wall_s=round(time.perf_counter() - t, 1), **cond)

        stop = threading.Event()
        greedy: dict = {}
        poster: dict = {}
        tg = threading.Thread(target=greedy_abuser, args=(base, stop, greedy), daemon=True)
        tp = threading.Thread(target=big_poster, args=(base, poster), daemon=True)
        tg.start()
        time.sleep(1.0)  # the greedy request is generating before the others arrive
        tp.start()
        t = time.perf_counter()
        ab_lat = load(base, args.clients, args.requests, args.max_tokens)
        wall = time.perf_counter() - t
        stop.set()
        tg.join(60)
        tp.join(120)
        emit("abused_latency_ms", p50=round(pct(ab_lat, 50)), p99=round(pct(ab_lat, 99)), n=len(ab_lat),
             wall_s=round(wall, 1), **cond)
        ratio = pct(ab_lat, 99) / pct(base_lat, 99)
        emit("p99_ratio_abused_over_baseline", value=round(ratio, 2), target="<= 2.0", met=ratio <= 2.0)
        emit("abuser_max_tokens_1e12", status=greedy.get("status"), chunks_streamed=greedy.get("chunks"),
         requests=greedy.get("requests"),
             seconds=round(greedy.get("seconds", 0), 1), error=greedy.get("error"))
        emit("abuser_50mb_body", status=poster.get("status"), seconds=round(poster.get("seconds", 0), 2),
             error=poster.get("error"))
        after_load = settled_rss(srv.pid)
        emit("rss_after_load_mib", value=round(after_load, 1), vs_idle=round(after_load / idle, 3),
             target="<= 1.10", met=after_load <= 1.10 * idle)

        texts = [(f"passage {i}: " + "the coolant pump pressure sensor reads low " * 60)[:2000]
                 for i in range(args.embed_inputs)]
        t = time.perf_counter()
        r = httpx.post(f"{base}/v1/embeddings", json={"input": texts}, timeout=600)
        emit("embeddings_at_limit", status=r.status_code, inputs=len(texts), chars_each=2000,
             seconds=round(time.perf_counter() - t, 1), peak_rss_mib=None)
        after_emb = settled_rss(srv.pid)
        emit("rss_after_embeddings_mib", value=round(after_emb, 1), vs_idle=round(after_emb / idle, 3),
             target="<= 1.10", met=after_emb <= 1.10 * idle)
        r = httpx.post(f"{base}/v1/embeddings", json={"input": texts * 8}, timeout=60)
        emit("embeddings_over_limit", status=r.status_code, inputs=len(texts) * 8)
        return 0
    finally:
        srv.terminate()
        try:
            srv.wait(15)
        except subprocess.TimeoutExpired:
            srv.kill()


if __name__ == "__main__":
    sys.exit(main())
