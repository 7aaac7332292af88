"""edge-rag's CUDA backend vs its GPU peers on random-weight models of real configs, in one call on
one GPU: transformers (bf16, eager; weak, never the headline), llama.cpp CUDA (its own llama-bench /
llama-batched-bench on a random Q4_0 GGUF: --llama-bin, --gguf-py) and gpt-fast (torch.compile,
int4 tinygemm and bf16: --gpt-fast, bench/gpt_fast_peer.py). One JSON line per figure, ratio lines
and a markdown table of the call's figures at the end.

    PYTHONPATH=. python3 bench/bench_cuda.py --out /tmp/bench [--configs smollm2-135m,...] [--no-hf] \
        [--llama-bin DIR --gguf-py DIR] [--gpt-fast DIR --gpt-fast-int4 b1 --gpt-fast-bf16 b16,prefill]

Each (config, peer) runs in its own subprocess, one after the other in the same call (a fresh CUDA
context each, as a user's process serving one model has); this process builds the bundles,
measures the copy bandwidth and prints the ratios.

Per config (prompt 128, 128 new tokens, greedy): decode tok/s and TTFT for both, and for
edge-rag the achieved bandwidth = bytes read per token x tok/s as a fraction of the measured
device-to-device copy bandwidth. Llama-3.2-1B also: batch-16 aggregate decode; Llama-3.2-1B and
Llama-3-8B: a 2048-token prefill. Before timing, every linear shape of each model is checked against
dequantize + fp32 matmul, and small models' logits against the numpy reference.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.random_bundle import CONFIGS, make_random_bundle  # noqa: E402
from edge.bundle import Bundle  # noqa: E402
from edge.quant.policy import bytes_read_per_token  # noqa: E402

PROMPT, NEW = 128, 128
PREFILL_CONFIGS = ("llama-3.2-1b", "llama-3-8b")  # configs that also time a 2048-token prefill
B16_CONFIGS = ("llama-3.2-1b",)
LOG = None


def emit(**fig) -> None:
    line = json.dumps(fig)
    print(line, flush=True)
    if LOG:
        with open(LOG, "a") as f:
            f.write(line + "\n")


def copy_bandwidth(cp) -> float:
    """Device-to-device copy bandwidth, bytes/s (bytes read + bytes written), median of 20."""
    n = 1 << 30
    a = cp.random.randint(0, 255, size=n, dtype=cp.uint8)
    b = cp.empty_like(a)
    s, e = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for i in range(25):
        s.record()
        b.data.copy_from_device_async(a.data, n)
        e.record()
        e.synchronize()
        if i >= 5:
            ts.append(cp.cuda.get_elapsed_time(s, e) / 1e3)
    del a, b
    return 2 * n / statistics.median(ts)


def validate_linears(sess) -> float:
    """Max rel error of each distinct linear (GEMV m=1, m=16 and the cuBLAS path) vs fp32."""
    cp = sess.cp
    worst = 0.0
    seen = set()
    for lin in [*sess.layers[0].values(), sess.lm_head]:
        if not hasattr(lin, "kind") or (lin.kind, lin.n, lin.k) in seen:
            continue
        seen.add((lin.kind, lin.n, lin.k))
        wf = sess.dequantize(lin).astype(cp.float32)
        for m in (1, 16, 48):
            x = (cp.random.standard_normal((m, lin.k), dtype=cp.float32)).astype(cp.float16)
            want = x.astype(cp.float32) @ wf.T
            if lin.bias is not None:
                want += lin.bias.astype(cp.float32)
            y = cp.full((m, lin.n), cp.nan, dtype=cp.float16)
            sess.linear(lin, x, m, y)
            err = float(cp.linalg.norm(y.astype(cp.float32) - want) / cp.linalg.norm(want))
            if not err < 5e-3:
                raise AssertionError(f"linear {lin.kind} [{lin.n}, {lin.k}] m={m}: rel err {err:.2e}")
            worst = max(worst, err)
        del wf
    return worst


def validate_logits(sess, bundle) -> float:
    from edge.runtime.cuda.reference import reference_logits

    ids = np.random.default_rng(0).integers(0, sess.vocab_size, size=12)
    ref = reference_logits(sess.spec, bundle.load_weights(), ids)
    sess.add_sequence(999)
    got = [sess.prefill(999, ids[:8])]
    for t in range(8, 12):
        got.append(sess.decode([999], ids[t : t + 1])[0])
    sess.release(999)
    got = np.stack(got)
    want = ref[7:12]
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    if not err < 1e-2:
        raise AssertionError(f"logits rel err {err:.2e}")
    return err


def event_ms(cp, fn, reps: int = 3) -> float:
    """Median GPU ms of fn() over `reps` runs after one warm-up (CUDA events)."""
    s, e = cp.cuda.Event(), cp.cuda.Event()
    fn()
    ts = []
    for _ in range(reps):
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(cp.cuda.get_elapsed_time(s, e))
    return statistics.median(ts)


def _prefill_attention_timer(sess, seq: int, ids):
    """Prefills `seq` (already added) with `ids`, then returns a function that times all layers'
    prefill attention over that real cache with random queries (event ms; its kwargs go to event_ms)."""
    cp, tokens = sess.cp, len(ids)
    sess.prefill(seq, ids)
    slots = cp.asarray(np.asarray(sess.blocks.slots(seq), dtype=np.int32))
    q = cp.random.standard_normal((tokens, sess.spec.q_size), dtype=cp.float32).astype(cp.float16)
    a = cp.empty_like(q)
    return lambda **kw: event_ms(cp, lambda: [sess._prefill_attention(q, sess.kv[i, 0], sess.kv[i, 1], slots, tokens, 0, a, layer=i)
                                              for i in range(len(sess.layers))], **kw)


def prefill_breakdown(sess, name: str, device: str, tokens: int = 2048) -> None:
    """Where a long prefill's time goes: dequantization, cuBLAS GEMMs, attention (all layers)."""
    cp = sess.cp
    lins = [L[k] for L in sess.layers for k in ("qkv", "o", "gu", "down")]
    t_deq = event_ms(cp, lambda: [sess.dequantize(lin, sess._dequant_workspace(lin)) for lin in lins])
    w0 = {k: sess.dequantize(sess.layers[0][k]) for k in ("qkv", "o", "gu", "down")}
    xs = {k: cp.random.standard_normal((tokens, w.shape[1]), dtype=cp.float32).astype(cp.float16) for k, w in w0.items()}
    ys = {k: cp.empty((tokens, w.shape[0]), dtype=cp.float16) for k, w in w0.items()}
    from edge.runtime.cuda.blas import gemm_f16

    t_gemm = event_ms(cp, lambda: [gemm_f16(cp, xs[k], w0[k], ys[k], tokens) for _ in lins[::4] for k in w0])
    flops = 2 * tokens * sum(w.size for w in w0.values()) * len(sess.layers)
    ids = np.random.default_rng(3).integers(0, sess.vocab_size, size=tokens)
    sess.add_sequence(77)
    try:
        t_attn = _prefill_attention_timer(sess, 77, ids)()
    finally:
        sess.release(77)
    emit(figure="prefill_breakdown", device=device, model=name, tokens=tokens, dequant_ms=round(t_deq, 2),
         gemm_ms=round(t_gemm, 2), gemm_tflops=round(flops / t_gemm / 1e9, 1), attention_ms=round(t_attn, 2))


def pdl_ab(sess, name: str, device: str, prompt) -> None:
    """Decode b1 with the step graph's kernels launched programmatically (edge.runtime.cuda.pdl)
    and without, alternating in this process: greedy-stream tok/s, graph replay ms, and whether
    the two give the same tokens and logits (they must: the same kernels in the same order)."""
    if not sess.pdl:
        emit(figure="pdl_ab", device=device, model=name, pdl=False, error=sess.pdl_error)
        return
    runs: dict[bool, dict] = {False: {"tok_s": [], "replay_ms": []}, True: {"tok_s": [], "replay_ms": []}}
    toks, logits = {}, {}
    for on in (False, True, False, True):
        sess.pdl = on
        sess._graphs.clear()
        sess.add_sequence(900)
        tok = sess.prefill_greedy(900, prompt)
        sess.decode([900], np.array([tok]))  # captures the graph
        logits[on] = sess.decode([900], np.array([tok]))
        sess.release(900)
        toks[on] = _b1_timing(sess, prompt, runs[on])
    sess.pdl = True
    sess._graphs.clear()
    emit(figure="pdl_ab", device=device, model=name, pdl_error=sess.pdl_error,
         tok_s_pdl=round(statistics.median(runs[True]["tok_s"]), 1), tok_s_plain=round(statistics.median(runs[False]["tok_s"]), 1),
         replay_ms_pdl=round(statistics.median(runs[True]["replay_ms"]), 4), replay_ms_plain=round(statistics.median(runs[False]["replay_ms"]), 4),
         same_tokens=toks[True] == toks[False], same_logits=bool(np.array_equal(logits[True], logits[False])))


def b1_form(sess, prompt, out: dict) -> np.ndarray:
    """One form of the batch-1 step (the kernels the caller just set): its graphs recaptured, the
    second decode step's logits returned (to compare forms), then its timing into `out`."""
    sess._graphs.clear()
    sess.add_sequence(900)
    tok = sess.prefill_greedy(900, prompt)
    sess.decode([900], np.array([tok]))
    logits = sess.decode([900], np.array([tok]))
    sess.release(900)
    _b1_timing(sess, prompt, out)
    return logits


def _b1_timing(sess, prompt, r: dict) -> list[int]:
    """Append to r one round of batch-1 figures with the session as set: two greedy streams'
    tok/s and ten replays of the step graph (ms). Returns the last stream's tokens."""
    cp = sess.cp
    sess._graphs.clear()
    for rep in range(2):
        sess.add_sequence(rep)
        tok = sess.prefill_greedy(rep, prompt)
        t1 = time.perf_counter()
        out = list(sess.greedy_stream(rep, tok, NEW - 1))
        r.setdefault("tok_s", []).append((NEW - 1) / (time.perf_counter() - t1))
        sess.release(rep)
    g, st = sess._graphs[1], sess.stream
    s0, e0 = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(10):
        s0.record(st)
        g.launch(st)
        e0.record(st)
        e0.synchronize()
        r.setdefault("replay_ms", []).append(cp.cuda.get_elapsed_time(s0, e0))
    return out


def _medians(runs: dict) -> dict:
    return {k: {"tok_s": round(statistics.median(v["tok_s"]), 1), "replay_ms": round(statistics.median(v["replay_ms"]), 4)} for k, v in runs.items()}


def gemv_ab(sess, name: str, device: str, prompt) -> None:
    """Session 10's two GEMV changes, each against what came before, alternating twice in this
    process (step graph under PDL as the session runs it): "picked" is the autotuner's choice per
    shape among every variant (the pipelined block-K ones included); "classic" the best of the
    variants that are not pipelined (by the autotuner's own times); "classic_plain_deq" those same
    kernels built with the old int4 dequantization (EDGE_DEQ_PLAIN). Also: per shape, the best
    pipelined and non-pipelined variant's us and GB/s in the autotuner's graph, and whether the
    three give the same logits (the dequantization must not change a bit)."""
    import cupy as cp

    from edge.runtime.cuda.kernels_src import CSRC

    src = "#define EDGE_DEQ_PLAIN 1\n" + "".join((CSRC / f).read_text() for f in ("common.cuh", "gemv.cu"))
    mod = cp.RawModule(code=src, options=sess.k.options)
    plain = {n: mod.get_function(n) for n in sess.k.functions if n.startswith("gemv_int4_")}
    base = {n: sess.k.functions[n] for n in plain}
    cands = {sess._cand_name((v, f)): (v, f) for v in sess.INT4_M1_VARIANTS for f in (True, False)}
    shapes = _int4_shapes(sess)
    picked = {k: (v[0].m1, v[0].fused) for k, v in shapes.items()}
    classic, per_shape = {}, {}
    for key, times in sess.int4_m1_us.items():
        c = {n: t for n, t in times.items() if "_p" not in n.split("_bk_")[-1]}
        p = {n: t for n, t in times.items() if n not in c}
        best_c, best_p = min(c, key=c.get), (min(p, key=p.get) if p else None)
        classic[key] = cands[best_c]
        nbytes = shapes[key][0].nbytes
        per_shape[key] = {"classic": best_c, "classic_us": round(c[best_c], 2), "classic_gb_s": round(nbytes / c[best_c] / 1e3, 0),
                          "pipe": best_p, "pipe_us": p.get(best_p), "pipe_gb_s": round(nbytes / p[best_p] / 1e3, 0) if best_p else None}

    def set_picks(picks):
        for key, lins in shapes.items():
            for lin in lins:
                lin.m1, lin.fused = picks.get(key, (lin.m1, lin.fused))

    runs: dict[str, dict] = {}
    logits = {}
    try:
        for _ in range(2):
            for variant in ("picked", "classic", "classic_plain_deq"):
                set_picks(picked if variant == "picked" else classic)
                sess.k.functions.update(plain if variant == "classic_plain_deq" else base)
                logits[variant] = b1_form(sess, prompt, runs.setdefault(variant, {}))
    finally:
        sess.k.functions.update(base)
        set_picks(picked)
        sess._graphs.clear()
    emit(figure="gemv_ab", device=device, model=name, pdl=sess.pdl, **_medians(runs), per_shape=per_shape,
         same_logits_deq=bool(np.array_equal(logits["classic"], logits["classic_plain_deq"])),
         picked_vs_classic_max_abs=float(np.max(np.abs(logits["picked"].astype(np.float64) - logits["classic"]))))


def prefill_diag(sess, name: str, device: str, ids, dequant_early_ms: float | None = None) -> None:
    """Where the long prefill's wall time goes in this process: the host's enqueue time (until
    _prefill returns), the GPU span (events), the wall to the last result, and Python garbage
    collections during the timed prefills; ring on and off. With dequant_early_ms (the 64
    dequantizations timed right after load) next to the same figure now."""
    import gc

    cp = sess.cp
    collections = [0]

    def on_gc(phase, info):
        if phase == "start":
            collections[0] += 1

    out = {}
    gc.callbacks.append(on_gc)
    try:
        for overlap in (True, False):
            sess.prefill_overlap = overlap
            walls, enq, spans = [], [], []
            s0, e0 = cp.cuda.Event(), cp.cuda.Event()
            for rep in range(6):
                sess.add_sequence(51)
                cp.cuda.Device().synchronize()
                t0 = time.perf_counter()
                s0.record(sess.stream)
                logits = sess._prefill(51, ids)
                t1 = time.perf_counter()
                e0.record(sess.stream)
                e0.synchronize()
                t2 = time.perf_counter()
                del logits
                sess.release(51)
                if rep:
                    walls.append(1e3 * (t2 - t0))
                    enq.append(1e3 * (t1 - t0))
                    spans.append(cp.cuda.get_elapsed_time(s0, e0))
            out["ring" if overlap else "no_ring"] = {"wall_ms": round(statistics.median(walls), 3), "enqueue_ms": round(statistics.median(enq), 3),
                                                     "gpu_ms": round(statistics.median(spans), 3)}
    finally:
        gc.callbacks.remove(on_gc)
        sess.prefill_overlap = True
    lins = [L[k] for L in sess.layers for k in ("qkv", "o", "gu", "down")]
    late = event_ms(cp, lambda: [sess.dequantize(lin, sess._dequant_workspace(lin)) for lin in lins])
    emit(figure="prefill_diag", device=device, model=name, tokens=len(ids), gc_collections=collections[0], **out,
         dequant_early_ms=None if dequant_early_ms is None else round(dequant_early_ms, 3), dequant_now_ms=round(late, 3))


def flash_ab(sess, name: str, device: str, tokens: int = 2048) -> None:
    """Prefill attention per flash_prefill instance (prefill.FLASH_VARIANTS: 4 or 8 warps a block),
    alternating twice in this process: all layers' attention alone (events, a real cache
    and random queries) and the whole prefill's wall (prefill_greedy, as prefill_2048); the
    variants' logits must be the same bits."""
    from edge.runtime.cuda.prefill import FLASH_VARIANTS

    cp = sess.cp
    keep = sess.flash_variant
    variants = [v for v, f in FLASH_VARIANTS.items() if sess.spec.head_dim in f[3]]
    ids = np.random.default_rng(3).integers(0, sess.vocab_size, size=tokens)
    attn: dict[str, list] = {v: [] for v in variants}
    wall: dict[str, list] = {v: [] for v in variants}
    logits = {}
    try:
        sess.add_sequence(78)
        try:
            time_attention = _prefill_attention_timer(sess, 78, ids)
            for _ in range(2):
                for v in variants:
                    sess.flash_variant = v
                    attn[v].append(time_attention(reps=5))
        finally:
            sess.release(78)
        for _ in range(2):
            for v in variants:
                sess.flash_variant = v
                for rep in range(4):
                    sess.add_sequence(79)
                    cp.cuda.Device().synchronize()
                    t0 = time.perf_counter()
                    sess.prefill_greedy(79, ids)
                    wall[v].append(1e3 * (time.perf_counter() - t0))
                    sess.release(79)
                sess.add_sequence(79)
                logits[v] = sess.prefill(79, ids)
                sess.release(79)
    finally:
        sess.flash_variant = keep
    emit(figure="flash_ab", device=device, model=name, tokens=tokens, default=keep,
         attention_ms={v: round(statistics.median(t), 3) for v, t in attn.items()},
         prefill_ms={v: round(statistics.median(t), 3) for v, t in wall.items()},
         same_logits=all(np.array_equal(logits[v], logits[variants[0]]) for v in variants))


class _Recorder:
    """Stands in for session.k: records every launch (name, function, grid, block, args, kwargs)."""

    def __init__(self, k):
        self.k, self.calls = k, []

    def __getitem__(self, name):
        f = self.k[name]

        def call(grid, block, args, **kw):
            self.calls.append((name, f, grid, block, args, kw))
            f(grid, block, args, **kw)

        return call

    def __getattr__(self, attr):
        return getattr(self.k, attr)


BK_N_ARG = {"st": 5, "glu": 5, "res": 8, "rope": 11, "fold": 9, "gluf": 9, "ropef": 15}  # where N sits in each block-K epilogue's args


def _launch_label(name: str, args) -> str:
    if name.startswith("gemv_int4_bk_"):
        return f"{name}[n={int(args[BK_N_ARG[name.rsplit('_', 1)[1]]])}]"
    if name.startswith("gemm_"):  # tensor-core GEMM: (W, S, X, bias, Y, ws, tickets, M, N, ...)
        return f"{name}[n={int(args[8])}]"
    if name.startswith("gemv_"):  # args: (W, [S,] X, bias, Y, M, N, K, ...)
        n = int(args[5] if name.startswith("gemv_fp16") else args[6])
        return f"{name}[n={n}]"
    return name


def step_kernel_breakdown(sess, name: str, device: str, m: int = 1) -> None:
    """In-graph cost of each kernel type of one decode step: the step's launches of that type,
    recorded from the real step body, captured alone into a graph and replayed (median of 7).
    Sums over types ~ the whole step's graph (launch gaps included in each type's share).
    Inputs are the last step's (context ~ PROMPT + NEW)."""
    cp = sess.cp
    bsz = sess._bucket(m)
    real, rec = sess.k, _Recorder(sess.k)
    sess.k = rec
    try:
        with sess.stream:
            sess._decode_graph_body(bsz)
        sess.stream.synchronize()
    finally:
        sess.k = real
    groups: dict[str, list] = {}
    for call in rec.calls:
        groups.setdefault(_launch_label(call[0], call[4]), []).append(call)
    out, total = {}, 0.0
    s0, e0 = cp.cuda.Event(), cp.cuda.Event()
    for label, calls in groups.items():
        st = sess.stream
        with st:
            st.begin_capture()
            try:
                for _, f, grid, block, args, kw in calls:
                    f(grid, block, args, **kw)
            finally:
                g = st.end_capture()
            g.launch(st)
            ts = []
            for _ in range(7):
                s0.record(st)
                g.launch(st)
                e0.record(st)
                e0.synchronize()
                ts.append(cp.cuda.get_elapsed_time(s0, e0) * 1e3)
        us = statistics.median(ts)
        total += us
        out[label] = {"count": len(calls), "us_per_step": round(us, 1), "us_each": round(us / len(calls), 2)}
    emit(figure="step_kernels", device=device, model=name, batch=m, launches=len(rec.calls),
         sum_us=round(total, 1), kernels=out)


def decode_breakdown(sess, name: str, device: str, m: int = 1) -> None:
    """Per-kernel times of one decode step's linears (event-timed, median) and graph replay alone."""
    cp = sess.cp
    out = {}
    for key, lin in [*((k, sess.layers[0][k]) for k in ("qkv", "o", "gu", "down")), ("lm_head", sess.lm_head)]:
        x = cp.random.standard_normal((m, lin.k), dtype=cp.float32).astype(cp.float16)
        y = cp.empty((m, lin.n), dtype=cp.float32 if key == "lm_head" else cp.float16)
        with sess.stream:
            ms = event_ms(cp, lambda: [sess.linear(lin, x, m, y, out_f32=key == "lm_head") for _ in range(10)]) / 10
        out[key] = {"us": round(1e3 * ms, 1), "gb_s": round(lin.nbytes / ms / 1e6, 0), "kind": lin.kind, "n": lin.n, "k": lin.k}
    g = sess._graphs.get(sess._bucket(m))
    if g is not None:
        st = sess.stream
        s0, e0 = cp.cuda.Event(), cp.cuda.Event()
        ts = []
        for _ in range(10):
            s0.record(st)
            g.launch(st)
            e0.record(st)
            e0.synchronize()
            ts.append(cp.cuda.get_elapsed_time(s0, e0))
        out["graph_replay_ms"] = round(statistics.median(ts), 3)
    emit(figure="decode_breakdown", device=device, model=name, batch=m, **out)


def _int4_shapes(sess) -> dict:
    """int4 Linears grouped by shape and role (the autotuner's unit)."""
    out: dict = {}
    for lin in [L[k] for L in sess.layers for k in ("qkv", "o", "gu", "down")] + [sess.lm_head]:
        if lin.kind == "int4":
            out.setdefault(f"{lin.shape_key}|{lin.role}", []).append(lin)
    return out


def bench_edge(name: str, path: Path, args, copy_bw: float, device: str) -> dict:
    import cupy as cp

    from edge.runtime.cuda.session import CudaDecoderSession

    b = Bundle.open(path, kind="generator", verify=False)
    spec = b.spec
    recipe, group = b.manifest.quant.recipe, b.manifest.quant.group_size or 128
    is_1b = name == "llama-3.2-1b"
    long_prefill = name in PREFILL_CONFIGS
    t0 = time.perf_counter()
    sess = CudaDecoderSession(b, max_batch=16 if is_1b else 1, max_context=2304 if long_prefill else 512)
    load_s = time.perf_counter() - t0
    if long_prefill:  # the same figure as prefill_breakdown's dequant_ms, before anything else ran in this process
        lins = [L[k] for L in sess.layers for k in ("qkv", "o", "gu", "down")]
        res_early = event_ms(cp, lambda: [sess.dequantize(lin, sess._dequant_workspace(lin)) for lin in lins])
    lin_err = validate_linears(sess)
    logit_err = validate_logits(sess, b) if spec.n_params < 1e9 else None
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, spec.vocab_size, size=PROMPT)
    sess.generate_greedy(prompt, 8)  # warm-up: graphs captured, cuBLAS handles made
    ttfts, decs, syncs = [], [], []
    for rep in range(3):
        # what Generator does for greedy: prefill + argmax on the GPU, then the pipelined stream
        sess.add_sequence(rep)
        t0 = time.perf_counter()
        tok = sess.prefill_greedy(rep, prompt)
        t1 = time.perf_counter()
        toks = list(sess.greedy_stream(rep, tok, NEW - 1))
        t2 = time.perf_counter()
        sess.release(rep)
        assert len(toks) == NEW - 1
        ttfts.append(t1 - t0)
        decs.append((NEW - 1) / (t2 - t1))
        # one synchronous step at a time (decode_greedy): the host's per-step cost not hidden
        sess.add_sequence(rep)
        tok = sess.prefill_greedy(rep, prompt)
        t1 = time.perf_counter()
        for _ in range(NEW - 1):
            tok = int(sess.decode_greedy([rep], np.array([tok]))[0])
        syncs.append((NEW - 1) / (time.perf_counter() - t1))
        sess.release(rep)
    tps = statistics.median(decs)
    # how far the host runs ahead of the GPU (greedy_stream's depth; 3 is the default)
    by_depth = {}
    for depth in (1, 3, 8, 16):
        ts = []
        for rep in range(3):
            sess.add_sequence(rep)
            tok = sess.prefill_greedy(rep, prompt)
            t1 = time.perf_counter()
            toks = list(sess.greedy_stream(rep, tok, NEW - 1, depth=depth))
            ts.append((NEW - 1) / (time.perf_counter() - t1))
            sess.release(rep)
        by_depth[depth] = round(statistics.median(ts), 1)
    kv_read = (PROMPT + NEW / 2) * spec.kv_bytes_per_token(2)
    bpt = bytes_read_per_token(spec, recipe, group) + kv_read
    res = {"config": name, "tok_s": tps, "ttft_ms": 1e3 * statistics.median(ttfts)}
    emit(figure="decode_b1", backend="edge-cuda", device=device, model=name, recipe=recipe, group=group, batch=1,
         prompt=PROMPT, new_tokens=NEW, decode_tok_s=round(tps, 1), decode_tok_s_sync=round(statistics.median(syncs), 1),
         decode_tok_s_by_depth=by_depth,
         ttft_ms=round(res["ttft_ms"], 2),
         bytes_per_token=int(bpt), achieved_gb_s=round(bpt * tps / 1e9, 1), copy_gb_s=round(copy_bw / 1e9, 1),
         roofline_frac=round(bpt * tps / copy_bw, 3), weight_gib=round(sess.weight_bytes / 2**30, 3),
         load_s=round(load_s, 1),
         int4_m1_pick={k: sess._cand_name((v[0].m1, v[0].fused)) for k, v in _int4_shapes(sess).items()},
         int4_m1_us={k: {n: round(t, 1) for n, t in d.items()} for k, d in sess.int4_m1_us.items()}, linear_rel_err=lin_err, logits_rel_err=logit_err,
         peak_gib=round(cp.get_default_memory_pool().total_bytes() / 2**30, 2))
    decode_breakdown(sess, name, device, 1)
    step_kernel_breakdown(sess, name, device, 1)
    pdl_ab(sess, name, device, prompt)
    try:
        gemv_ab(sess, name, device, prompt)
    except Exception as e:  # noqa: BLE001 (an experiment: report it and go on)
        emit(figure="gemv_ab", device=device, model=name, error=f"{type(e).__name__}: {str(e)[:300]}")
    if is_1b:
        prompts = [rng.integers(0, spec.vocab_size, size=PROMPT) for _ in range(16)]
        for rep in range(2):  # first pass warms the batch-16 graph
            toks = []
            for i, p in enumerate(prompts):
                sess.add_sequence(i)
                toks.append(sess.prefill_greedy(i, p))
            ids = list(range(16))
            t0 = time.perf_counter()
            for _ in range(NEW - 1):
                toks = sess.decode_greedy(ids, np.array(toks))
            dt = time.perf_counter() - t0
            for i in ids:
                sess.release(i)
        agg = 16 * (NEW - 1) / dt
        res["b16_tok_s"] = agg
        decode_breakdown(sess, name, device, 16)
        step_kernel_breakdown(sess, name, device, 16)
        bpt16 = bytes_read_per_token(spec, recipe, group) + 16 * kv_read
        emit(figure="decode_b16", backend="edge-cuda", device=device, model=name, recipe=recipe, batch=16, prompt=PROMPT,
             new_tokens=NEW, aggregate_tok_s=round(agg, 1), step_ms=round(1e3 * dt / (NEW - 1), 3),
             roofline_frac=round(bpt16 * agg / 16 / copy_bw, 3),
             attn=(f"{sess._gqa[0]} x{sess.attn_gqa_splits(16)} splits" if sess.attn_gqa(16) else f"per query head x{sess.attn_grid_splits(16)} splits"),
             tc_us={k: v["splits"] for k, v in sess.tc_us.items()},
             tc_pick={lin.shape_key: (f"K across 8 warps, {lin.tc_kb} n8-tiles a warp" if lin.tc_kb else f"splits {lin.tc_splits} " + (f"async {lin.tc_async}" if lin.tc_async else f"depth {lin.tc_depth}")) + f" from M={lin.tc_from}"
                      for lin in sess.linears() if lin.tc_splits})
    if long_prefill:
        long = rng.integers(0, spec.vocab_size, size=2048)
        ts = []
        for rep in range(6):
            sess.add_sequence(50)
            cp.cuda.Device().synchronize()
            t0 = time.perf_counter()
            sess.prefill_greedy(50, long)
            ts.append(time.perf_counter() - t0)
            sess.release(50)
        res["prefill2048_ms"] = 1e3 * statistics.median(ts[1:])
        prefill_diag(sess, name, device, long, dequant_early_ms=res_early)
        prefill_breakdown(sess, name, device)
        flash_ab(sess, name, device)
        flops = 2 * 2048 * (spec.n_layers * spec.layer_linear_params) + 2 * spec.n_layers * spec.n_heads * spec.head_dim * 2048 * 2048
        emit(figure="prefill_2048", backend="edge-cuda", device=device, model=name, recipe=recipe, tokens=2048,
             prefill_ms=round(res["prefill2048_ms"], 2), prefill_tok_s=round(2048 / res["prefill2048_ms"] * 1e3, 0),
             tflops=round(flops / (res["prefill2048_ms"] / 1e3) / 1e12, 1))
    del sess
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()
    return res


def bench_hf(name: str, device: str) -> dict:
    import torch
    import transformers as tf

    cfg_d = dict(CONFIGS[name])
    cfg_d.pop("_name_or_path", None)
    cfg = tf.AutoConfig.for_model(cfg_d.pop("model_type"), **cfg_d)
    torch.manual_seed(0)
    with torch.device("cuda"):
        try:
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="eager")
        except TypeError:
            model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation="eager")
    model.eval()
    res = {"config": name}

    def gen(batch: int, n: int) -> float:
        ids = torch.randint(0, cfg.vocab_size, (batch, PROMPT), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(1, 4)  # warm-up
    batches = (1, 16) if name == "llama-3.2-1b" else (1,)
    for batch in batches:
        ttft = statistics.median(gen(batch, 1) for _ in range(3))
        total = gen(batch, NEW)
        tps = batch * (NEW - 1) / (total - ttft)
        fig = "decode_b1" if batch == 1 else "decode_b16"
        res[f"b{batch}_tok_s"] = tps
        emit(figure=fig, backend="transformers-bf16-eager", device=device, model=name, batch=batch, prompt=PROMPT,
             new_tokens=NEW, decode_tok_s=round(tps, 1) if batch == 1 else None,
             aggregate_tok_s=round(tps, 1) if batch > 1 else None, ttft_ms=round(1e3 * ttft, 2),
             torch=torch.__version__, transformers=tf.__version__)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def _jsonl(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def bench_llama_cpp(name: str, args, device: str) -> dict:
    """llama.cpp's own CUDA benchmarks on a random Q4_0 GGUF of the config (bench/random_gguf.py):
    llama-bench decode (128 tokens after a 128-token context: -n 128 -d 128) and a 2048-token
    prefill (-p 2048, ubatch 512 and 2048, the faster kept), llama-batched-bench 16 sequences of
    128 + 128 tokens. Flash attention on, every layer on the GPU."""
    import os

    gguf = args.work / f"{name}-q4_0.gguf"
    if not gguf.exists():
        cmd = [sys.executable, str(Path(__file__).parent / "random_gguf.py"), name, str(gguf)]
        if args.gguf_py:
            cmd += ["--gguf-py", str(args.gguf_py)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    env = dict(os.environ, LD_LIBRARY_PATH=f"{args.llama_bin}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    bench = [str(args.llama_bin / "llama-bench"), "-m", str(gguf), "-ngl", "99", "-fa", "1", "-o", "jsonl"]

    def run(cmd):
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if p.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed ({p.returncode}): {p.stderr[-2000:]}")
        return _jsonl(p.stdout)

    res = {"config": name}
    common = dict(backend="llama.cpp-cuda", device=device, model=name, recipe="Q4_0 (LM head Q8_0)")
    tg = run(bench + ["-p", "0", "-n", str(NEW), "-d", str(PROMPT), "-r", "3"])
    res["tok_s"] = tg[0]["avg_ts"]
    emit(figure="decode_b1", batch=1, prompt=PROMPT, new_tokens=NEW, decode_tok_s=round(res["tok_s"], 1),
         build=tg[0].get("build_commit"), **common)
    if name in PREFILL_CONFIGS:
        pp = run(bench + ["-p", "2048", "-n", "0", "-ub", "512,2048", "-r", "5"])
        best = max(pp, key=lambda d: d["avg_ts"])
        res["prefill2048_ms"] = 2048 / best["avg_ts"] * 1e3
        emit(figure="prefill_2048", tokens=2048, prefill_ms=round(res["prefill2048_ms"], 2),
             prefill_tok_s=round(best["avg_ts"], 0), n_ubatch=best["n_ubatch"],
             by_ubatch={d["n_ubatch"]: round(2048 / d["avg_ts"] * 1e3, 2) for d in pp}, **common)
    if name in B16_CONFIGS:
        bb = run([str(args.llama_bin / "llama-batched-bench"), "-m", str(gguf), "-ngl", "99", "-fa", "on", "-c", "8192",
                  "-npp", str(PROMPT), "-ntg", str(NEW), "-npl", "16", "--output-format", "jsonl"])
        res["b16_tok_s"] = bb[0]["speed_tg"]
        emit(figure="decode_b16", batch=16, prompt=PROMPT, new_tokens=NEW, aggregate_tok_s=round(res["b16_tok_s"], 1), **common)
    return res


def bench_gpt_fast(name: str, mode: str, what: set[str], args, device: str) -> dict:
    """gpt-fast in its own process (bench/gpt_fast_peer.py); what: figures to time among b1, b16,
    prefill (each is one torch.compile of ~1-1.5 min on the device)."""
    cmd = [sys.executable, str(Path(__file__).parent / "gpt_fast_peer.py"), "--gpt-fast", str(args.gpt_fast),
           "--config", name, "--mode", mode, "--device-name", device,
           "--batches", ",".join(b for b, k in (("1", "b1"), ("16", "b16")) if k in what and (k != "b16" or name in B16_CONFIGS))]
    if "prefill" in what and name in PREFILL_CONFIGS:
        cmd += ["--prefill", "2048"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    res = {"config": name}
    for d in _jsonl(p.stdout):
        emit(**d)
        if d.get("figure") == "decode_b1":
            res["tok_s"] = d["decode_tok_s"]
        elif d.get("figure") == "decode_b16":
            res["b16_tok_s"] = d["aggregate_tok_s"]
        elif d.get("figure") == "prefill":
            res["prefill2048_ms"] = d["prefill_ms"]
    if p.returncode != 0:
        emit(figure="peer_failed", backend=f"gpt-fast-{mode}", model=name, exit=p.returncode)
    return res


def print_table(edge: dict, peers: dict[str, dict]) -> None:
    """Ratio lines (edge-rag over each peer) and a markdown table of the same call's figures."""
    rows = [("decode b1, tok/s", "tok_s", True), ("16 sequences, aggregate tok/s", "b16_tok_s", True),
            ("2048-token prefill, ms", "prefill2048_ms", False)]
    for name, e in edge.items():
        for label, key, higher in rows:
            if key not in e:
                continue
            for peer, res in peers.items():
                v = res.get(name, {}).get(key)
                if v:
                    emit(figure="ratio", model=name, what=key, peer=peer,
                         edge_over_peer=round(e[key] / v if higher else v / e[key], 2))
    cols = ["edge-rag cuda", *peers]
    print("\n| figure | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for name, e in edge.items():
        for label, key, _ in rows:
            vals = [e.get(key)] + [peers[p].get(name, {}).get(key) for p in peers]
            if any(v is not None for v in vals):
                print(f"| {name} {label} | " + " | ".join("-" if v is None else f"{v:,.1f}" for v in vals) + " |")


def _worker(kind: str, name: str, out: Path, copy_bw: float) -> dict:
    """One config, one peer, in a fresh process (its own CUDA context and memory pools): a user's
    process serves one model, and a model measured after others in the same process ran a few %
    slower here (same kernel times, slower back-to-back graph replays)."""
    cmd = [sys.executable, __file__, "--worker", kind, "--configs", name, "--out", str(out), "--copy-bw", str(copy_bw)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    result = None
    for line in proc.stdout.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            print(line, flush=True)
            continue
        if d.get("figure") == "_result":
            result = d["result"]
        else:
            print(line, flush=True)  # the worker already logged it
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"{kind} worker for {name} failed (exit {proc.returncode})")
    return result


def main() -> None:
    global LOG
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=Path("/tmp/edge-bench"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-bench-bundles"))
    ap.add_argument("--recipe", default="int4")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--llama-bin", type=Path, help="folder of llama.cpp's CUDA llama-bench / llama-batched-bench (peer)")
    ap.add_argument("--gguf-py", type=Path, help="llama.cpp's gguf-py folder (to write the peer's random GGUF)")
    ap.add_argument("--gpt-fast", type=Path, help="folder with gpt-fast's model.py, quantize.py, generate.py, tokenizer.py (peer)")
    ap.add_argument("--gpt-fast-configs", default="llama-3.2-1b", help="configs gpt-fast runs (compile time)")
    ap.add_argument("--gpt-fast-int4", default="b1,b16,prefill", help="figures gpt-fast int4 times (b1, b16, prefill)")
    ap.add_argument("--gpt-fast-bf16", default="b1,b16,prefill", help="figures gpt-fast bf16 times")
    ap.add_argument("--worker", choices=("edge", "hf"), help=argparse.SUPPRESS)
    ap.add_argument("--copy-bw", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    LOG = args.out / "figures.jsonl"
    if args.worker:  # one config, one peer (see _worker)
        from edge.runtime.cuda import probe

        name = args.configs
        device = probe(compile=args.worker == "edge").get("gpu")
        if args.worker == "edge":
            res = bench_edge(name, args.work / f"{name}-{args.recipe}", args, args.copy_bw, device)
        else:
            res = bench_hf(name, device)
        print(json.dumps({"figure": "_result", "result": res}), flush=True)
        return
    import cupy as cp

    from edge.runtime.cuda import probe

    p = probe()
    device = p.get("gpu")
    emit(figure="probe", **p)
    bw = copy_bandwidth(cp)
    emit(figure="copy_bandwidth", device=device, gb_s=round(bw / 1e9, 1))
    edge, hf = {}, {}
    peers: dict[str, dict] = {}
    for name in args.configs.split(","):
        path = args.work / f"{name}-{args.recipe}"
        if not (path / "manifest.json").exists():
            t0 = time.perf_counter()
            make_random_bundle(name, path, recipe=args.recipe, group_size=args.group, max_context=4096)
            emit(figure="bundle_built", model=name, seconds=round(time.perf_counter() - t0, 1))
        gc.collect()
        edge[name] = _worker("edge", name, args.out, bw)
        if not args.no_hf:
            hf[name] = _worker("hf", name, args.out, bw)
        if args.llama_bin:
            peers.setdefault("llama.cpp CUDA", {})[name] = bench_llama_cpp(name, args, device)
        if args.gpt_fast and name in args.gpt_fast_configs.split(","):
            for mode, what in (("int4", args.gpt_fast_int4), ("bf16", args.gpt_fast_bf16)):
                if what:
                    peers.setdefault(f"gpt-fast {mode}", {})[name] = bench_gpt_fast(name, mode, set(what.split(",")), args, device)
    if peers:
        print_table(edge, peers)
    for name in edge:
        if name in hf:
            emit(figure="ratio_b1", model=name, edge_over_hf=round(edge[name]["tok_s"] / hf[name]["b1_tok_s"], 2))
            if "b16_tok_s" in edge[name]:
                emit(figure="ratio_b16", model=name, edge_over_hf=round(edge[name]["b16_tok_s"] / hf[name]["b16_tok_s"], 2))


if __name__ == "__main__":
    main()
