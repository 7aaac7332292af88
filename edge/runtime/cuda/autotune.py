"""Load-time kernel choices of the CUDA session, each timed inside CUDA graphs (what a decode
step sees; eager launches from Python are launch-bound):

    autotune_int4_m1(sess)   per int4 weight shape and role: which M = 1 GEMV variant, and whether
                             its fused epilogue replaces the small kernel that follows
    refine_int4_m1_in_step(sess, times)
                             the best few of those per shape re-timed in the whole batch-1 step
    autotune_tc_from(sess)   per linear shape: from which M the tensor-core GEMM beats the GEMV
"""

from __future__ import annotations

import numpy as np

from edge.runtime.cuda import kernels as kmod
from edge.runtime.cuda.layout import Linear
from edge.runtime.cuda.pdl import PdlKernels

MAX_GEMV_M = 16  # as linears.MAX_GEMV_M: the GEMV's largest M
STEP_TOP = 3  # refine_int4_m1_in_step: candidates per shape re-timed in the step


def _picks_prefix(sess) -> str:
    """The picks file's key prefix: GPU, arch, kernel source, launch mode."""
    return f"{kmod.gpu_name(sess.device.id)}|sm_{sess.k.cc}|{kmod.SOURCE_HASH}|{'pdl' if sess.pdl else 'plain'}"


def autotune_int4_m1(sess) -> dict[str, dict[str, float]]:
    """Pick, per distinct (int4 weight shape, role), how M = 1 runs: which GEMV variant and
    whether its fused epilogue replaces the small kernel that follows. Returns the times.

    The best variant depends on the shape (short-K qkv/o want many small blocks, long-K down
    long-lived ones), and a fused epilogue is not free (the residual + RMSNorm one ends in a
    last-block reduction), so every candidate is timed as the whole sequence it stands for
    (e.g. "gemv + add_rmsnorm" against "fused kernel"), inside a CUDA graph of 20 repeats:
    what a decode step sees (eager launches from Python are launch-bound at ~10-20 us), launched
    programmatically where the step is (pdl.py: each repeat's prologue overlaps the one before; a
    plain graph penalised the variants that load before pdl_wait).
    Picks are stored per GPU, kernel source and shape under $EDGE_RAG_HOME/kernels, so later
    loads reuse them and a machine always runs the same kernels (variants split K in
    different orders: the same numbers to ~1e-7, not bit for bit)."""
    cp, spec = sess.cp, sess.spec
    lins = [L[k] for L in sess.layers for k in ("qkv", "o", "gu", "down")] + [sess.lm_head]
    by_key: dict[str, list[Linear]] = {}
    for lin in lins:
        if lin.kind == "int4":
            by_key.setdefault(f"{lin.shape_key}|{lin.role}", []).append(lin)
    if not by_key:
        return {}
    picks = kmod.load_picks()
    gpu = _picks_prefix(sess)
    s0, e0 = cp.cuda.Event(), cp.cuda.Event()
    times: dict[str, dict[str, float]] = {}
    largest, largest_bytes = None, -1
    reps = 20
    f16 = cp.float16
    with sess.stream:
        for key, group in by_key.items():
            lin = group[0]
            cands = [(v, True) for v in sess.INT4_M1_VARIANTS if lin.role != "st" and sess._fusable(v, lin.role, lin)]
            cands += [(v, False) for v in sess.INT4_M1_VARIANTS]
            names = {sess._cand_name(c): c for c in cands}
            best = names.get(picks.get(f"{gpu}|{key}", ""))
            if best is None:
                x = cp.ones((1, lin.k), dtype=f16)
                y = cp.empty((1, lin.n), dtype=f16)
                if lin.role == "rope":
                    ints = cp.zeros(2, dtype=cp.int32)  # pos 0, slot 0
                    q = cp.empty(spec.q_size, dtype=f16)
                    kvs = cp.empty((2, 1, spec.n_kv_heads, spec.head_dim), dtype=f16)
                    run = lambda: sess._qkv_rope(lin, x, 1, ints[:1], ints[1:], q, kvs[0], kvs[1], y)  # noqa: E731
                elif lin.role == "res":
                    res, h, w = cp.zeros((1, lin.n), dtype=cp.float32), cp.empty((1, lin.n), dtype=f16), cp.ones(lin.n, dtype=f16)
                    counter = cp.zeros(1, dtype=cp.uint32)
                    run = lambda: sess._linear_residual_norm(lin, x, 1, res, y, w, h, np.float32(spec.rms_eps), counter)  # noqa: E731
                elif lin.role == "glu":
                    act = cp.empty((1, lin.n // 2), dtype=f16)
                    run = lambda: sess._gate_up(lin, x, 1, y, act)  # noqa: E731
                else:
                    run = lambda: sess.linear(lin, x, 1, y)  # noqa: E731
                t: dict[tuple, float] = {}
                for cand in cands:
                    lin.m1, lin.fused = cand
                    real = sess.k
                    if sess.pdl:  # launched as the decode graph launches them (pdl.py): prologues overlap
                        sess.k = PdlKernels(real, cp)
                    sess.stream.begin_capture()
                    try:
                        for _ in range(reps):
                            run()
                    finally:
                        g = sess.stream.end_capture()
                        sess.k = real
                    g.launch(sess.stream)
                    ts = []
                    for _ in range(5):
                        s0.record(sess.stream)
                        g.launch(sess.stream)
                        e0.record(sess.stream)
                        e0.synchronize()
                        ts.append(cp.cuda.get_elapsed_time(s0, e0) * 1e3 / reps)  # us per launch sequence
                    t[cand] = sorted(ts)[len(ts) // 2]
                best = min(cands, key=lambda c: t[c])
                times[key] = {sess._cand_name(c): us for c, us in t.items()}
                picks[f"{gpu}|{key}"] = sess._cand_name(best)
            for other in group:
                other.m1, other.fused = best
            if lin.nbytes > largest_bytes:
                largest, largest_bytes = best[0], lin.nbytes
    if times:
        kmod.save_picks(picks)
    sess._int4_m1 = largest  # the default for int4 Linears made later (none in a loaded model)
    return times


def refine_int4_m1_in_step(sess, times: dict[str, dict[str, float]], top: int = STEP_TOP, tokens: int = 192,
                           reps: int = 20, min_bytes: int | None = None) -> dict[str, dict[str, float]]:
    """Re-time the `top` best candidates of each freshly tuned shape (`times`, autotune_int4_m1's
    return) inside the batch-1 decode step's graph replay, shape by shape (largest weights first,
    the others at their current picks), keep the fastest and store it as the shape's pick.
    Returns {shape key: {candidate: step replay ms}}; {} when nothing was refined.

    The autotuner's graphs repeat one linear 20 times: there the weights of an 8B's qkv, o and
    down (9-30 MB) stay in the 60 MB L2 across repeats and a kernel's neighbour under PDL is
    itself; in the step every weight comes from DRAM and each kernel overlaps others. Only when
    the layers' int4 weights exceed `min_bytes` (default: twice the L2), so a step cannot run
    from the L2 (tiny models: the candidates' order would not change). The step runs on a
    sequence of `tokens` random ids (the bench's ~190-token context), released afterwards."""
    cp = sess.cp
    lins = [L[k] for L in sess.layers for k in ("qkv", "o", "gu", "down") if L[k].kind == "int4"]
    if min_bytes is None:
        min_bytes = 2 * (int(cp.cuda.runtime.getDeviceProperties(sess.device.id).get("l2CacheSize", 0)) or 64 << 20)
    n = min(tokens, sess.max_context - reps - 8)
    if not times or not sess.use_graphs or n < 8 or sum(lin.nbytes for lin in lins) <= min_bytes:
        return {}
    shapes: dict[str, list[Linear]] = {}
    for lin in lins:
        shapes.setdefault(f"{lin.shape_key}|{lin.role}", []).append(lin)
    names = {sess._cand_name(c): c for v in sess.INT4_M1_VARIANTS for c in ((v, True), (v, False))}
    keys = sorted((k for k in times if k in shapes), key=lambda k: -shapes[k][0].nbytes)
    ids = np.random.default_rng(0).integers(0, sess.spec.vocab_size, size=n)
    sid = -(1 << 30)  # not a caller's id: the session has no sequences while it loads
    s0, e0 = cp.cuda.Event(), cp.cuda.Event()
    out: dict[str, dict[str, float]] = {}
    picks = kmod.load_picks()
    gpu = _picks_prefix(sess)
    sess.add_sequence(sid)
    try:
        tok = sess.prefill_greedy(sid, ids)

        def step_ms() -> float:
            sess._graphs.clear()
            sess.truncate(sid, n)
            sess.decode_greedy([sid], np.array([tok]))  # captures the bucket-1 graph and runs it
            g = sess._graphs[1]
            ts = []
            for _ in range(reps):  # each replay is the next position's step (the graph advances its inputs)
                s0.record(sess.stream)
                g.launch(sess.stream)
                e0.record(sess.stream)
                e0.synchronize()
                ts.append(cp.cuda.get_elapsed_time(s0, e0))
            return sorted(ts)[len(ts) // 2]

        if not sess._graph_safe(1):
            return {}
        for key in keys:
            ranked = [c for c in sorted(times[key], key=times[key].get) if c in names][:top]
            if len(ranked) < 2:
                continue
            ms: dict[str, float] = {}
            for c in ranked:
                for lin in shapes[key]:
                    lin.m1, lin.fused = names[c]
                ms[c] = step_ms()
            best = min(ranked, key=lambda c: ms[c])
            for lin in shapes[key]:
                lin.m1, lin.fused = names[best]
            picks[f"{gpu}|{key}"] = best
            out[key] = ms
    finally:
        sess.stream.synchronize()
        sess.release(sid)
        sess._graphs.clear()
    if out:
        kmod.save_picks(picks)
    return out


def _graph_us(sess, fn, reps: int = 10) -> float:
    """Median us per call of fn() captured `reps` times in one CUDA graph (on sess.stream)."""
    cp = sess.cp
    s0, e0 = cp.cuda.Event(), cp.cuda.Event()
    sess.stream.begin_capture()
    try:
        for _ in range(reps):
            fn()
    finally:
        g = sess.stream.end_capture()
    g.launch(sess.stream)
    ts = []
    for _ in range(3):
        s0.record(sess.stream)
        g.launch(sess.stream)
        e0.record(sess.stream)
        e0.synchronize()
        ts.append(cp.cuda.get_elapsed_time(s0, e0) * 1e3 / reps)
    return round(sorted(ts)[1], 2)


def _ring(name: str) -> tuple[int, int, int]:
    """(tc_depth, tc_async, tc_kb) of a kernel named "d2" / "d4" (register ring), "a4" / "a8" (cp.async
    stages) or "kb2" / "kb4" (K split across a block's warps, n8-tiles per warp)."""
    if name.startswith("kb"):
        return 2, 0, int(name[2:])
    return (int(name[1:]), 0, 0) if name[0] == "d" else (2, int(name[1:]), 0)


def autotune_tc(sess) -> dict[str, dict]:
    """Per distinct linear shape, for the tensor-core GEMM: the K splits and the weight loads in
    flight per warp, in registers or a cp.async shared-memory ring (timed together at M = 16; one split count for every M, so a row's numbers
    never depend on its batch; the depth changes no sum), the m16-tiles per warp
    for 17-32 and 33-64 rows, and the smallest M (2, 4, 8 or 16) from which it beats the GEMV.
    Every candidate is timed in a CUDA graph of 10 calls (us per call, returned)."""
    from edge.runtime.cuda.gemm import ASYNC_STAGES, DEPTHS, KB_NT, TcWorkspace, async_fits, split_candidates

    cp = sess.cp
    by_key: dict[str, list[Linear]] = {}
    for lin in sess.linears():
        if lin.tc_splits:
            by_key.setdefault(lin.shape_key, []).append(lin)
    if not by_key:
        return {}
    out: dict[str, dict] = {}
    keep = sess._tc
    sess._tc = TcWorkspace.for_linears(cp, sess.linears(), splits=max(max(split_candidates(g[0])) for g in by_key.values()))
    with sess.stream:
        for key, group in by_key.items():
            lin = group[0]
            t: dict = {"splits": {}, "mt": {}, "gemv": {}, "tc": {}}
            xs = {m: cp.ones((m, lin.k), dtype=cp.float16) for m in (2, 4, 8, 16, 32, 64)}
            ys = {m: cp.empty((m, lin.n), dtype=cp.float16) for m in xs}
            sess.tc_min_m = 1
            for s in split_candidates(lin):  # K splits and weight loads in flight, together
                rings = [f"d{d}" for d in DEPTHS] + [f"a{a}" for a in ASYNC_STAGES if async_fits(sess.k, lin, a, s)]
                for ring in rings + ([f"kb{nt}" for nt in KB_NT] if s == 1 else []):  # kb: one block split only
                    lin.tc_splits, (lin.tc_depth, lin.tc_async, lin.tc_kb) = s, _ring(ring)
                    t["splits"][f"{s}/{ring}"] = _graph_us(sess, lambda: sess.linear(lin, xs[16], 16, ys[16]))
            best = min(t["splits"], key=lambda sd: t["splits"][sd])
            lin.tc_splits, (lin.tc_depth, lin.tc_async, lin.tc_kb) = int(best.split("/")[0]), _ring(best.split("/")[1])
            mts = []
            for m in (32, 64):
                tm = {}
                for mt in (1, 2, 4):
                    lin.tc_mt = (mt, mt)
                    tm[mt] = _graph_us(sess, lambda: sess.linear(lin, xs[m], m, ys[m]))
                t["mt"][m] = tm
                mts.append(min(tm, key=lambda mt: tm[mt]))
            lin.tc_mt = (mts[0], mts[1])
            for m in (2, 4, 8, 16):
                for path, lo in (("gemv", 1 << 30), ("tc", 1)):
                    sess.tc_min_m = lo
                    t[path][m] = _graph_us(sess, lambda: sess.linear(lin, xs[m], m, ys[m]))
            sess.tc_min_m = None
            wins = [m for m in (2, 4, 8, 16) if all(t["tc"][m2] <= t["gemv"][m2] for m2 in (2, 4, 8, 16) if m2 >= m)]
            for other in group:
                other.tc_from = min(wins) if wins else MAX_GEMV_M + 1
                other.tc_splits, other.tc_mt, other.tc_depth, other.tc_async, other.tc_kb = lin.tc_splits, lin.tc_mt, lin.tc_depth, lin.tc_async, lin.tc_kb
            out[key] = t
    del keep
    sess._tc = TcWorkspace.for_linears(cp, sess.linears())
    return out
