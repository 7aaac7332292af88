"""Load and faults against `edge-rag serve`: many concurrent streamed clients, some that hang up.

    python bench/bench_load.py --threads 2 [--clients 64] [--requests 1000] [--max-tokens 16]
                               [--disconnect-every 10] [--server edge-rag|llama-server] [--url HOST:PORT]

Starts the server (bench/serve_harness.py; or uses a running one with --url, RSS then not
measured), then --clients closed-loop clients send --requests streamed greedy chat requests in
all. Every --disconnect-every-th request hangs up after 2 content events (an abrupt close). Meanwhile
a poller GETs /health every 0.25 s on its own connection. Reported (one JSON line each):

  load        requests, errors (non-200, error events, streams without [DONE]; hang-ups on purpose
              are not errors), requests/s, tok/s, TTFT p50/p99
  health      /health latency p50/p99/max during the load (target < 50 ms)
  rss         server RSS when request 100 completes and when the last does (target: flat within 5%)
  kv_freed    from /health's engine counters (issue 9: {"engine": {waiting, running,
              kv_blocks_used, kv_blocks_total}}): after the load, and after 8 long streams that
              hang up after 3 tokens, the server returns to running == waiting == 0 and to the
              kv_blocks_used it had idle before; "not exposed" while /health has no such block.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_harness import (PROMPTS, Server, chat_body, default_models, engine_counters, get_health,  # noqa: E402
                                 load_avg, pct, r1, server_cmd, stream_chat)

NOT_EXPOSED = "not exposed"


async def wait_idle(host: str, port: int, limit_s: float = 60) -> tuple[dict | None, float]:
    """Poll /health until the engine has nothing running or waiting: (counters, seconds waited)."""
    t0 = time.perf_counter()
    while True:
        _, h = await get_health(host, port)
        c = engine_counters(h)
        if c is None or (c["running"] == 0 and c["waiting"] == 0) or time.perf_counter() - t0 > limit_s:
            return c, time.perf_counter() - t0
        await asyncio.sleep(0.05)


async def run(host: str, port: int, args, rss) -> list[dict]:
    lines = []
    _, h0 = await get_health(host, port)
    idle0 = engine_counters(h0)

    # ---- the load ---------------------------------------------------------------------------
    next_i = 0
    done = 0
    results = []
    rss_at = {}
    health_lat: list[float] = []
    health_fail = 0
    peak = {"running": 0, "waiting": 0, "kv_blocks_used": 0}
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal next_i, done
        while next_i < args.requests:
            i = next_i
            next_i += 1
            hang = args.disconnect_every and (i + 1) % args.disconnect_every == 0
            r = await stream_chat(host, port, chat_body(PROMPTS[i % len(PROMPTS)], args.max_tokens),
                                  disconnect_after=2 if hang else None)
            results.append(r)
            done += 1
            if done in (100, args.requests) and rss is not None:
                rss_at[done] = rss()

    async def poller() -> None:
        nonlocal health_fail
        while not stop.is_set():
            dt, h = await get_health(host, port, timeout=30)
            if h is None:
                health_fail += 1
            else:
                health_lat.append(1e3 * dt)
                c = engine_counters(h)
                if c:
                    for k in peak:
                        peak[k] = max(peak[k], c[k])
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except asyncio.TimeoutError:
                pass

    la0 = load_avg()
    t0 = time.perf_counter()
    poll = asyncio.create_task(poller())
    await asyncio.gather(*(client() for _ in range(args.clients)))
    wall = time.perf_counter() - t0
    stop.set()
    await poll

    errors = [r for r in results if r.error]
    hung = [r for r in results if r.disconnected]
    full = [r for r in results if not r.error and not r.disconnected]
    ttft = [1e3 * r.ttft for r in results if r.ttft is not None and not r.error]
    kinds: dict[str, int] = {}
    for r in errors:
        k = r.error.split(":")[0]
        kinds[k] = kinds.get(k, 0) + 1
    common = {"server": args.server, "threads": args.threads, "clients": args.clients, "max_tokens": args.max_tokens}
    lines.append({"figure": "load", **common, "requests": len(results), "errors": len(errors), "error_kinds": kinds,
                  "first_error": errors[0].error if errors else None, "disconnected_on_purpose": len(hung),
                  "completed": len(full), "wall_s": round(wall, 1), "req_s": r1(len(results) / wall),
                  "tok_s": r1(sum(r.tokens for r in full) / wall), "ttft_p50_ms": r1(pct(ttft, 50)),
                  "ttft_p99_ms": r1(pct(ttft, 99)), "load_avg_1m": [la0, load_avg()], "target_errors": 0})
    lines.append({"figure": "load_health", **common, "polls": len(health_lat), "failed_polls": health_fail,
                  "health_p50_ms": r1(pct(health_lat, 50)), "health_p99_ms": r1(pct(health_lat, 99)),
                  "health_max_ms": r1(max(health_lat, default=float("nan"))), "target_max_ms": 50,
                  "engine_peak": peak if idle0 is not None else NOT_EXPOSED})
    if rss is not None and 100 in rss_at and args.requests in rss_at:
        a, b = rss_at[100], rss_at[args.requests]
        lines.append({"figure": "load_rss", **common, "rss_mib_at_100": a, f"rss_mib_at_{args.requests}": b,
                      "growth_pct": round(100 * (b - a) / a, 2), "target_growth_pct_max": 5.0})

    # ---- KV blocks freed after the load and after hang-ups ------------------------------------
    after_load, waited = await wait_idle(host, port)
    kv = {"figure": "kv_freed", **common}
    if idle0 is None or after_load is None:
        kv["engine_counters"] = NOT_EXPOSED
    else:
        kv |= {"idle_before": idle0, "idle_after_load": after_load, "settle_s_after_load": round(waited, 2)}
    # 8 long streams that hang up after 3 tokens: the blocks they held must come back
    seen_used = []

    async def watch(stop_watch: asyncio.Event) -> None:
        while not stop_watch.is_set():
            _, h = await get_health(host, port)
            c = engine_counters(h)
            if c:
                seen_used.append(c["kv_blocks_used"])
            await asyncio.sleep(0.05)

    sw = asyncio.Event()
    w = asyncio.create_task(watch(sw))
    hangs = await asyncio.gather(*(stream_chat(host, port, chat_body(PROMPTS[i], 512), disconnect_after=3) for i in range(8)))
    t_hang = time.perf_counter()
    after_hang, waited = await wait_idle(host, port)
    sw.set()
    await w
    kv["hangup_streams"] = len(hangs)
    kv["hangup_errors"] = sum(1 for r in hangs if r.error)
    if idle0 is not None and after_hang is not None:
        base = after_load["kv_blocks_used"]
        kv |= {"idle_after_hangups": after_hang, "settle_s_after_hangups": round(time.perf_counter() - t_hang, 2),
               "kv_blocks_used_peak_during_hangups": max(seen_used, default=None),
               "freed": after_hang["running"] == 0 and after_hang["waiting"] == 0 and after_hang["kv_blocks_used"] <= base}
    lines.append(kv)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", help="edge-rag generator bundle (default: the default engine)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--disconnect-every", type=int, default=10, help="every Nth request hangs up mid-stream (0: none)")
    ap.add_argument("--server", default="edge-rag", help="edge-rag or llama-server (same load, for comparison)")
    ap.add_argument("--parallel", type=int, default=8, help="llama-server slots (-np)")
    ap.add_argument("--url", help="HOST:PORT of a running server (not started; RSS not measured)")
    ap.add_argument("--port", type=int, default=18090)
    args = ap.parse_args()
    if args.url:
        host, _, port = args.url.rpartition(":")
        lines = asyncio.run(run(host or "127.0.0.1", int(port), args, None))
    else:
        engine, gguf = default_models(args.engine, build=args.server == "edge-rag")
        cmd = server_cmd(args.server, args.port, args.threads, engine, gguf, args.parallel)
        with Server(args.server, cmd, args.port, args.threads) as srv:
            lines = asyncio.run(run("127.0.0.1", args.port, args, srv.rss_mib))
    for line in lines:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
