"""Generation speed: edge-rag (its default backend, int4 bundle) vs llama.cpp vs transformers, one run.

    python bench/bench_generate.py [--engine BUNDLE] [--threads 2] [--peers edge-rag,llama.cpp,transformers]
    python bench/bench_generate.py --peers edge-rag,edge-rag:onnxruntime,edge-rag:ort-session,llama.cpp,llama-bench

All three run SmolLM2-135M-Instruct from the same GGUF (edge.models.defaults.default_generator_path):
edge-rag from its int4 bundle built from it (default: edge.engines.default_generator_bundle()),
llama.cpp through llama-cpp-python on the GGUF itself (Q4_1), transformers (torch CPU, fp32)
loading the GGUF with gguf_file=. `edge-rag` runs the bundle through the engine core on the backend
`--backend auto` picks on this machine (edge.runtime.generator.resolve_backend: native on an x86 CPU with
AVX2 and a C compiler, else onnxruntime): what `generate`, `ask` and `serve` run by default, scheduler,
sampler and all (EOS ignored, no prefix reuse). `edge-rag:native` / `edge-rag:onnxruntime` force that
backend through the engine; `edge-rag:ort-session` is the bare ONNX Runtime session without the engine.
`llama-bench` is llama.cpp's own C++ benchmark on the same GGUF (build it first: `python bench/llama_cpp_build.py
--targets llama-bench`); its peak RSS is not comparable (the largest child process's). Each peer runs in its own subprocess so that peak RSS is its
own. Figures, each one JSON line:
  decode_tok_s   batch 1, 128 new tokens after a 16-token prompt (greedy; EOS ignored)
  prefill_tok_s  a 512-token prompt (text from pydoc_data.topics), best of 2
  ttft_s         that prompt's prefill + the first token's choice
  peak_rss_mib   the worker's peak resident set (model load included)
  decode_cpu_ms_per_tok  process CPU time per decoded token (load-robust with --threads 1)
then ratios: decode vs llama.cpp, prefill vs the faster peer, RSS vs llama.cpp.
Warm-up (a 16-token prefill + 4 steps) is excluded from every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT_TOKENS = 512
DECODE_PROMPT = 16
NEW_TOKENS = 128
CONTEXT = 2048


def prompt_text() -> str:
    """Plenty of English text every Python ships (the same for every peer)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))[:20000]


CPU: dict[str, float] = {}  # process CPU seconds of the timed decode loop


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def quant_label(bundle) -> str:
    q = bundle.manifest.quant
    return f"{q.recipe}-g{q.group_size}-{q.method}"


# ---- workers: each returns {"decode_tok_s", "prefill_tok_s", "ttft_s", "peak_rss_mib", ...} -------------
def worker_edge(args) -> dict:
    from edge.bundle import Bundle
    from edge.runtime.ort_session import OrtDecoderSession
    from edge.runtime.tokenizer import Tokenizer

    bundle = Bundle.open(args.engine, kind="generator")
    tok = Tokenizer.from_bundle(bundle)
    sess = OrtDecoderSession(bundle, max_batch=1, max_context=CONTEXT, threads=args.threads)
    ids = np.array(tok.encode(prompt_text())[:PROMPT_TOKENS], dtype=np.int64)

    def prefill(n):
        sess.add_sequence(0)
        t = time.perf_counter()
        logits = sess.prefill(0, ids[:n])
        nxt = int(np.argmax(logits))
        return time.perf_counter() - t, nxt

    def decode(first, n):
        tokid = first
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            tokid = int(np.argmax(sess.decode([0], np.array([tokid]))[0]))
        CPU["decode"] = time.process_time() - c
        return time.perf_counter() - t

    _, f = prefill(DECODE_PROMPT)  # warm-up
    decode(f, 4)
    sess.release(0)
    ttfts = []
    for _ in range(2):
        ttft, _ = prefill(PROMPT_TOKENS)
        sess.release(0)
        ttfts.append(ttft)
    _, f = prefill(DECODE_PROMPT)
    dt = decode(f, NEW_TOKENS)
    sess.release(0)
    return {"decode_tok_s": NEW_TOKENS / dt, "prefill_tok_s": PROMPT_TOKENS / min(ttfts), "ttft_s": min(ttfts),
            "peak_rss_mib": peak_rss_mib(), "decode_cpu_ms_per_tok": 1e3 * CPU["decode"] / NEW_TOKENS, "quant": quant_label(bundle), "backend": "onnxruntime"}


def worker_engine(args, backend: str) -> dict:
    """edge-rag through its engine core (edge.runtime.engine.Engine) on `backend`, greedy, EOS ignored,
    no prefix reuse: the per-token scheduling and sampling a user's `generate` pays are in the figures."""
    from edge.bundle import Bundle
    from edge.runtime.engine import Engine
    from edge.runtime.generator import open_session, resolve_backend
    from edge.runtime.sampler import SamplingParams
    from edge.runtime.tokenizer import Tokenizer

    bundle = Bundle.open(args.engine, kind="generator")
    tok = Tokenizer.from_bundle(bundle)
    picked = resolve_backend(backend, bundle)  # what `auto` runs here
    eng = Engine(open_session(bundle, backend, max_batch=1, max_context=CONTEXT, threads=args.threads), tok,
                 eos_ids=(), prefix_cache=False)
    ids = tok.encode(prompt_text())[:PROMPT_TOKENS]

    def run(n_prompt: int, n_new: int):
        rs = eng.submit(ids[:n_prompt], SamplingParams(max_tokens=n_new, temperature=0.0), detokenize=False)
        for _ in rs:
            pass
        return rs.request.stats

    run(DECODE_PROMPT, 5)  # warm-up
    ttft = min(run(PROMPT_TOKENS, 1).ttft_s for _ in range(2))
    c = time.process_time()
    st = run(DECODE_PROMPT, NEW_TOKENS + 1)  # the first token is the prefill's; NEW_TOKENS decode steps follow
    cpu = time.process_time() - c  # includes the 16-token prefill
    eng.close()
    steps = st.n_generated - 1
    return {"decode_tok_s": steps / st.decode_s, "prefill_tok_s": PROMPT_TOKENS / ttft, "ttft_s": ttft,
            "peak_rss_mib": peak_rss_mib(), "decode_cpu_ms_per_tok": 1e3 * cpu / steps,
            "quant": quant_label(bundle), "backend": f"{picked} (engine)"}


def worker_llamacpp(args) -> dict:
    from llama_cpp import Llama

    from edge.models.defaults import default_generator_path

    llm = Llama(model_path=str(default_generator_path()), n_ctx=CONTEXT, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, logits_all=False, verbose=False)
    ids = llm.tokenize(prompt_text().encode(), add_bos=False)[:PROMPT_TOKENS]

    def prefill(n):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:n])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return time.perf_counter() - t, nxt

    def decode(first, n):
        tokid = first
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            llm.eval([tokid])
            tokid = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        CPU["decode"] = time.process_time() - c
        return time.perf_counter() - t

    _, f = prefill(DECODE_PROMPT)
    decode(f, 4)
    ttft = min(prefill(PROMPT_TOKENS)[0] for _ in range(2))
    _, f = prefill(DECODE_PROMPT)
    dt = decode(f, NEW_TOKENS)
    return {"decode_tok_s": NEW_TOKENS / dt, "prefill_tok_s": PROMPT_TOKENS / ttft, "ttft_s": ttft, "peak_rss_mib": peak_rss_mib(),
            "decode_cpu_ms_per_tok": 1e3 * CPU["decode"] / NEW_TOKENS, "quant": "gguf-Q4_1", "backend": "llama.cpp"}


def worker_llamabench(args) -> dict:
    """llama.cpp's own C++ benchmark on the same GGUF: `llama-bench -p 512 -n 128` (its tg128 decodes from an
    empty context, ours after 16 prompt tokens; its pp512 is one 512-token batch). Built once by
    bench/llama_cpp_build.py (GGML_NATIVE: this CPU's best kernels); not built: an error naming the command."""
    from bench.llama_cpp_build import binaries_ready, installed_version
    from edge.models.defaults import default_generator_path

    bin_dir = binaries_ready(installed_version(), False, ("llama-bench",))
    if bin_dir is None:
        raise SystemExit("llama-bench is not built: python bench/llama_cpp_build.py --targets llama-bench")
    cmd = [str(bin_dir / "llama-bench"), "-m", str(default_generator_path()), "-p", str(PROMPT_TOKENS), "-n", str(NEW_TOKENS),
           "-t", str(args.threads), "-r", "3", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(bin_dir)})
    if r.returncode != 0:
        raise SystemExit(f"llama-bench failed: {r.stderr.strip().splitlines()[-1:]}")
    rows = json.loads(r.stdout)
    tg = next(x for x in rows if x["n_gen"] > 0)
    pp = next(x for x in rows if x["n_prompt"] > 0)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"decode_tok_s": tg["avg_ts"], "prefill_tok_s": pp["avg_ts"], "ttft_s": PROMPT_TOKENS / pp["avg_ts"],
            "peak_rss_mib": child.ru_maxrss / 1024.0, "decode_cpu_ms_per_tok": None, "quant": "gguf-Q4_1",
            "backend": f"llama-bench ({tg.get('build_commit', '?')})"}


def worker_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge.models.defaults import default_generator_path

    torch.set_num_threads(args.threads)
    g = default_generator_path()
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, torch_dtype=torch.float32).eval()
    ids = tok(prompt_text(), add_special_tokens=False, return_tensors="pt").input_ids[:, :PROMPT_TOKENS]

    @torch.inference_mode()
    def prefill(n):
        t = time.perf_counter()
        out = model(ids[:, :n], use_cache=True)
        nxt = int(out.logits[0, -1].argmax())
        return time.perf_counter() - t, nxt, out.past_key_values

    @torch.inference_mode()
    def decode(first, pkv, n):
        tokid = first
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            out = model(torch.tensor([[tokid]]), past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
            tokid = int(out.logits[0, -1].argmax())
        CPU["decode"] = time.process_time() - c
        return time.perf_counter() - t

    _, f, pkv = prefill(DECODE_PROMPT)
    decode(f, pkv, 4)
    ttft = min(prefill(PROMPT_TOKENS)[0] for _ in range(2))
    _, f, pkv = prefill(DECODE_PROMPT)
    dt = decode(f, pkv, NEW_TOKENS)
    return {"decode_tok_s": NEW_TOKENS / dt, "prefill_tok_s": PROMPT_TOKENS / ttft, "ttft_s": ttft, "peak_rss_mib": peak_rss_mib(),
            "decode_cpu_ms_per_tok": 1e3 * CPU["decode"] / NEW_TOKENS, "quant": "fp32", "backend": "torch"}


WORKERS = {"edge-rag": lambda a: worker_engine(a, "auto"), "edge-rag:ort-session": worker_edge, "llama.cpp": worker_llamacpp,
           "llama-bench": worker_llamabench, "transformers": worker_transformers,
           "edge-rag:native": lambda a: worker_engine(a, "native"),
           "edge-rag:onnxruntime": lambda a: worker_engine(a, "onnxruntime")}


# ---- parent -------------------------------------------------------------------------------------------
def run_peer(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--threads", str(args.threads)]
    if args.engine:
        cmd += ["--engine", str(args.engine)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", type=Path, default=None, help="edge-rag generator bundle (default: the default int4 engine)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="edge-rag,llama.cpp,transformers")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = [p for p in args.peers.split(",") if p not in WORKERS]
    if unknown:
        ap.error(f"unknown peer {unknown[0]!r}: choose among {', '.join(sorted(WORKERS))}")
    if args.worker:
        if args.worker.startswith("edge-rag") and args.engine is None:
            from edge.engines import tiny_generator_bundle as default_generator_bundle  # SmolLM2: the GGUF the peer runs

            args.engine = default_generator_bundle(progress=False)
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.engine is None and any(p.startswith("edge-rag") for p in args.peers.split(",")):
        from edge.engines import tiny_generator_bundle as default_generator_bundle  # SmolLM2: the GGUF the peer runs

        args.engine = default_generator_bundle(progress=True)  # build once, outside the timed worker
    cond = {"device": cpu_name(), "threads": args.threads, "batch": 1, "context": CONTEXT, "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    results = {}
    for name in args.peers.split(","):
        res = results[name] = run_peer(name, args)
        if "error" in res:
            print(json.dumps({"peer": name, **cond, "error": res["error"]}))
            continue
        base = {"peer": name, "backend": res["backend"], "quant": res["quant"], **cond}
        print(json.dumps({**base, "figure": "decode_tok_s", "prompt_tokens": DECODE_PROMPT, "new_tokens": NEW_TOKENS, "value": round(res["decode_tok_s"], 1)}))
        print(json.dumps({**base, "figure": "prefill_tok_s", "prompt_tokens": PROMPT_TOKENS, "value": round(res["prefill_tok_s"], 1)}))
        print(json.dumps({**base, "figure": "ttft_s", "prompt_tokens": PROMPT_TOKENS, "value": round(res["ttft_s"], 4)}))
        print(json.dumps({**base, "figure": "peak_rss_mib", "value": round(res["peak_rss_mib"], 1)}))
        # CPU time per decoded token: robust to other load when threads == 1 (with 2 threads it
        # also counts spin-waiting, so compare wall figures there)
        if res["decode_cpu_ms_per_tok"] is not None:  # llama-bench reports none
            print(json.dumps({**base, "figure": "decode_cpu_ms_per_tok", "value": round(res["decode_cpu_ms_per_tok"], 2)}))
        if name.startswith("edge-rag"):
            try:
                from edge.bundle import Bundle
                from edge.quant.policy import bytes_read_per_token

                m = Bundle.open(args.engine, verify=False)
                q = m.manifest.quant
                bpt = bytes_read_per_token(m.spec, q.recipe, q.group_size or 128)
                print(json.dumps({**base, "figure": "weight_bytes_per_token_x_tok_s_gb_s", "value": round(bpt * res["decode_tok_s"] / 1e9, 2)}))
            except Exception:  # noqa: BLE001 - informational only
                pass
    e, l, t = (results.get(k, {}) for k in ("edge-rag", "llama.cpp", "transformers"))
    ok = lambda r: r and "error" not in r  # noqa: E731
    if ok(e) and ok(l):
        print(json.dumps({"figure": "decode_ratio_vs_llama.cpp", "value": round(e["decode_tok_s"] / l["decode_tok_s"], 2), "target": 1.5, **cond}))
        print(json.dumps({"figure": "decode_cpu_time_ratio_llama.cpp_over_edge", "value": round(l["decode_cpu_ms_per_tok"] / e["decode_cpu_ms_per_tok"], 2), **cond}))
        print(json.dumps({"figure": "rss_ratio_vs_llama.cpp", "value": round(e["peak_rss_mib"] / l["peak_rss_mib"], 2), "target": 1.25, **cond}))
    for name in (n for n in results if n.startswith("edge-rag:")):
        if ok(results[name]) and ok(l):
            print(json.dumps({"figure": "decode_ratio_vs_llama.cpp", "peer": name, "value": round(results[name]["decode_tok_s"] / l["decode_tok_s"], 2),
                              "target": 1.5, **cond}))
    lb = results.get("llama-bench", {})
    for name in (n for n in results if n.startswith("edge-rag")):
        if ok(results[name]) and ok(lb):  # llama.cpp's own C++ benchmark: the strongest CPU peer
            print(json.dumps({"figure": "decode_ratio_vs_llama-bench", "peer": name, "value": round(results[name]["decode_tok_s"] / lb["decode_tok_s"], 2),
                              "target": 1.5, **cond}))
            print(json.dumps({"figure": "prefill_ratio_vs_llama-bench", "peer": name, "value": round(results[name]["prefill_tok_s"] / lb["prefill_tok_s"], 2), **cond}))
    peers = [r for r in (l, t) if ok(r)]
    if ok(e) and peers:
        best = max(peers, key=lambda r: r["prefill_tok_s"])
        print(json.dumps({"figure": "prefill_ratio_vs_faster_peer", "faster_peer": best["backend"], "value": round(e["prefill_tok_s"] / best["prefill_tok_s"], 2), "target": 1.0, **cond}))
        bestd = max(peers, key=lambda r: r["decode_tok_s"])
        print(json.dumps({"figure": "decode_ratio_vs_faster_peer", "faster_peer": bestd["backend"], "value": round(e["decode_tok_s"] / bestd["decode_tok_s"], 2), **cond}))


if __name__ == "__main__":
    main()
