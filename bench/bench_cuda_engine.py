"""The CUDA backend under the engine: many concurrent requests vs the session's own batched decode,
and the tensor-core GEMM vs the GEMV per linear. Random-weight Llama-3.2-1B (int4 g128), one
process, one GPU. One JSON line per figure.

    PYTHONPATH=. python3 bench/bench_cuda_engine.py --out /tmp/bench [--concurrency 16,64] [--repeat 1] [--no-linears]

Figures (prompt 128, 128 new tokens, greedy, no EOS):
  linear_m     us per call of each distinct linear at M = 1..64 through the GEMV (M <= 16) and
               the tensor-core GEMM, inside CUDA graphs of 20 calls (what a decode step sees);
               each checked against dequantize + fp32 matmul first
  session_bN   the session's decode step for N sequences (decode_greedy, one step per call),
               aggregate tok/s, with the tensor-core GEMM and with the GEMV (the previous path)
  engine_N     N requests submitted at once to edge.runtime.engine.Engine: aggregate decode
               tok/s while all N decode (from the last first token to the first finish),
               end-to-end tok/s, TTFT p50 / max, and the ratio to session_bN of the same call;
               overlap=true: async steps (step N+1 planned and launched while step N runs),
               overlap=false: one step at a time (the engine before async steps), same process;
               --repeat K alternates the two K times
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.random_bundle import make_random_bundle  # noqa: E402

PROMPT, NEW = 128, 128
LOG: Path | None = None


def emit(**fig) -> None:
    line = json.dumps(fig)
    print(line, flush=True)
    if LOG:
        with open(LOG, "a") as f:
            f.write(line + "\n")


def graph_us(cp, stream, fn, reps: int = 20) -> float:
    """Median us per call of fn() captured `reps` times in one CUDA graph."""
    stream.begin_capture()
    try:
        for _ in range(reps):
            fn()
    finally:
        g = stream.end_capture()
    g.launch(stream)
    s, e = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for _ in range(7):
        s.record(stream)
        g.launch(stream)
        e.record(stream)
        e.synchronize()
        ts.append(cp.cuda.get_elapsed_time(s, e) * 1e3 / reps)
    return statistics.median(ts)


def linear_figures(sess, device: str) -> None:
    with sess.stream:  # the session's stream does not wait for the legacy default stream
        _linear_figures(sess, device)


def _linear_figures(sess, device: str) -> None:
    cp = sess.cp
    seen = set()
    for key in ("qkv", "o", "gu", "down", "lm"):
        lin = sess.lm_head if key == "lm" else sess.layers[0][key]
        if (lin.kind, lin.n, lin.k) in seen:
            continue
        seen.add((lin.kind, lin.n, lin.k))
        wf = sess.dequantize(lin).astype(cp.float32)
        row = {"gemv": {}, "tc": {}}
        errs = []
        for m in (1, 2, 4, 8, 16, 32, 64):
            x = cp.random.standard_normal((m, lin.k), dtype=cp.float32).astype(cp.float16)
            y = cp.empty((m, lin.n), dtype=cp.float16)
            want = x.astype(cp.float32) @ wf.T
            for path, lo in (("gemv", 1 << 30), ("tc", 1)):
                if path == "gemv" and m > 16:
                    continue
                if path == "tc" and not lin.tc_splits:
                    continue
                sess.tc_min_m = lo
                sess.linear(lin, x, m, y)
                errs.append(float(cp.linalg.norm(y.astype(cp.float32) - want) / cp.linalg.norm(want)))
                if errs[-1] > 3e-3:
                    raise AssertionError(f"{key} {path} m={m}: rel err {errs[-1]:.2e}")
                row[path][m] = round(graph_us(cp, sess.stream, lambda: sess.linear(lin, x, m, y)), 2)
        from edge.runtime.cuda import gemm

        by_mt = {}
        if lin.tc_splits:
            sess.tc_min_m = 1
            for m in (16, 32, 64):
                x = cp.random.standard_normal((m, lin.k), dtype=cp.float32).astype(cp.float16)
                y = cp.empty((m, lin.n), dtype=cp.float16)
                for mt in (1, 2, 4):
                    gemm.FORCE_MT = mt
                    by_mt[f"m{m}_mt{mt}"] = round(graph_us(cp, sess.stream, lambda: sess.linear(lin, x, m, y)), 2)
            gemm.FORCE_MT = None
        sess.tc_min_m = None
        emit(figure="linear_m_tiles", linear=key, us=by_mt)
        emit(figure="linear_m", device=device, linear=key, kind=lin.kind, n=lin.n, k=lin.k, splits=lin.tc_splits,
             us_gemv=row["gemv"], us_tc=row["tc"], tc_from=lin.tc_from, max_rel_err=round(max(errs), 6))


def session_decode(sess, n: int, rng, vocab: int) -> float:
    """Aggregate tok/s of the session's batched decode step for n sequences (prompts prefilled first)."""
    prompts = [rng.integers(0, vocab, size=PROMPT) for _ in range(n)]
    dts = []
    for _ in range(2):  # the first pass captures the bucket's graph
        toks = []
        for i, p in enumerate(prompts):
            sess.add_sequence(i)
            toks.append(sess.prefill_greedy(i, p))
        ids = list(range(n))
        t0 = time.perf_counter()
        for _ in range(NEW - 1):
            toks = sess.decode_greedy(ids, np.array(toks))
        dts.append(time.perf_counter() - t0)
        for i in ids:
            sess.release(i)
    return n * (NEW - 1) / dts[-1]


def engine_run(engine_mod, backend, n: int, rng, vocab: int, overlap: bool = True) -> dict:
    """n requests at once through the engine. The backend call the engine makes per step (launch
    with async steps, else execute) is wrapped to timestamp each step (in the engine's thread: no
    polling thread competing for the GIL): the decode rate is n tokens per step over the steps
    where all n rows decode, each step counted from its start to the next step's start (so the
    engine's host work between steps is included; with async steps a launch returns before its
    step ran, and the start-to-start time is the device's pace when the host keeps up)."""
    from edge.runtime.sampler import SamplingParams

    prompts = [rng.integers(0, vocab, size=PROMPT).tolist() for _ in range(n)]
    params = SamplingParams(max_tokens=NEW, temperature=0)
    steps: list[tuple[float, float, bool]] = []  # (start, call seconds, all n rows decoding)
    name = "launch" if backend.caps.async_steps else "execute"  # the engine calls launch() on such a backend
    execute = getattr(backend, name)

    def timed(batch):
        t = time.perf_counter()
        try:
            return execute(batch)
        finally:
            steps.append((t, time.perf_counter() - t, batch.is_decode_only and batch.num_rows == n))

    with engine_mod.Engine(backend, overlap=overlap) as eng:
        # warm-up (graphs of every bucket the run meets, cuBLAS handles)
        for s in [eng.submit(p, SamplingParams(max_tokens=8, temperature=0), detokenize=False) for p in prompts]:
            list(s)
        setattr(backend, name, timed)
        t_sub = time.perf_counter()
        streams = [eng.submit(p, params, detokenize=False) for p in prompts]
        for s in streams:
            list(s)
        t_end = time.perf_counter()
        delattr(backend, name)  # the class's method again
    reqs = [s.request for s in streams]
    gen = sum(r.stats.n_generated for r in reqs)
    ttft = sorted(r.stats.ttft_s for r in reqs)
    assert gen == n * NEW, gen
    full = [i for i, st in enumerate(steps) if st[2] and i + 1 < len(steps)]
    cycle = [steps[i + 1][0] - steps[i][0] for i in full]  # start to next start
    busy = [steps[i][1] for i in full]
    return {"decode_tok_s": n * len(full) / sum(cycle), "e2e_tok_s": gen / (t_end - t_sub),
            "step_ms": 1e3 * statistics.mean(cycle), f"{name}_ms": 1e3 * statistics.mean(busy), "full_steps": len(full),
            "ttft_p50_ms": 1e3 * ttft[len(ttft) // 2], "ttft_max_ms": 1e3 * ttft[-1], "steps": len(steps)}


def main() -> None:
    global LOG
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/edge-bench"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-bench-bundles"))
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--repeat", type=int, default=1, help="engine runs per mode (async / one step at a time), alternated")
    ap.add_argument("--no-linears", action="store_true", help="skip the per-linear figures (device time)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    LOG = args.out / "bench_cuda_engine.jsonl"
    import cupy as cp

    from edge.runtime.cuda.backend import CudaBackend
    from edge.runtime.cuda.kernels import gpu_name

    device = gpu_name(0)
    ns = [int(x) for x in args.concurrency.split(",")]
    path = args.work / "llama-3.2-1b-engine"
    t0 = time.perf_counter()
    if not (path / "manifest.json").exists():
        make_random_bundle("llama-3.2-1b", path, recipe="int4", group_size=128, max_context=PROMPT + NEW + 16, max_batch=max(ns))
    emit(figure="bundle_built", model="llama-3.2-1b", seconds=round(time.perf_counter() - t0, 1))
    be = CudaBackend.open(path, max_batch=max(ns), verify=False)
    sess = be.session
    spec = sess.spec
    emit(figure="backend", device=device, caps={k: getattr(be.caps, k) for k in ("num_blocks", "block_size", "max_seqs", "max_context", "kv_dtype", "kv_bytes")},
         sms=sess.sms, load_s=round(sess.load_s, 2))
    emit(figure="tc_autotune", device=device, picks={lin.shape_key: {"splits": lin.tc_splits, "mt_32_64": list(lin.tc_mt), "tc_from": lin.tc_from}
                                                   for lin in sess.linears() if lin.tc_splits}, us=sess.tc_us)
    if not args.no_linears:
        linear_figures(sess, device)
    rng = np.random.default_rng(0)
    try:
        import edge.runtime.engine as engine_mod
    except ImportError:
        engine_mod = None
    for n in ns:
        sess.tc_min_m = 1 << 30  # the GEMV path (before the tensor-core GEMM), for the record
        sess._graphs.clear()
        gemv = session_decode(sess, n, rng, spec.vocab_size) if n <= 16 else None
        sess.tc_min_m = None  # each linear's timed pick
        sess._graphs.clear()
        tc = session_decode(sess, n, rng, spec.vocab_size)
        emit(figure=f"session_b{n}", device=device, model="llama-3.2-1b", recipe="int4", group=128, batch=n, prompt=PROMPT,
             new_tokens=NEW, aggregate_tok_s=round(tc, 1), step_ms=round(1e3 * n / tc, 3),
             aggregate_tok_s_gemv=round(gemv, 1) if gemv else None)
        if engine_mod is None:
            emit(figure=f"engine_{n}", skipped="edge.runtime.engine is not on this branch yet")
            continue
        for _ in range(args.repeat):
            for overlap in (True, False):
                r = engine_run(engine_mod, be, n, rng, spec.vocab_size, overlap)
                emit(figure=f"engine_{n}", device=device, model="llama-3.2-1b", concurrency=n, prompt=PROMPT, new_tokens=NEW,
                     overlap=overlap, **{k: round(v, 2) for k, v in r.items()}, session_tok_s=round(tc, 1),
                     engine_over_session=round(r["decode_tok_s"] / tc, 3))
    emit(figure="peak", peak_gib=round(cp.get_default_memory_pool().total_bytes() / 2**30, 2))


if __name__ == "__main__":
    main()
