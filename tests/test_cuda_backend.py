"""The cuda backend as the engine drives it (execute(StepBatch), run_greedy) on a GPU: logits
against the numpy reference for prefill chunks, decode rows and mixed steps; a batch of rows ==
each row alone; the host-free greedy stream == step by step; device sampling with each row's
own parameters; the tensor-core GEMM against numpy and batch-invariant; the engine (when it is
on main): 12 concurrent requests == each alone, seeded sampling == alone."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.random_bundle import random_weights, tiny_config, write_bundle  # noqa: E402
from edge.models.spec import spec_from_hf_config  # noqa: E402
from edge.quant.format import dequantize_int4, dequantize_int8, quantize_int4_rtn, quantize_int8_rtn  # noqa: E402
from edge.runtime.cuda.reference import reference_logits  # noqa: E402
from edge.runtime.step import F32, I32, StepBatch  # noqa: E402
from engine_checks import run_together  # noqa: E402

pytestmark = pytest.mark.gpu


def rel(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def check(got, want, tol, what=""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    e = rel(got, want)
    assert e < tol, f"{what}: rel err {e:.2e} max-abs {np.abs(got - want).max():.3e}; got {got.ravel()[:4]} want {want.ravel()[:4]}"


class Pool:
    """A minimal stand-in for the engine's block manager: block tables and StepBatches."""

    def __init__(self, num_blocks: int, block_size: int, max_blocks: int):
        self.free = list(range(num_blocks - 1, -1, -1))
        self.bs, self.mb = block_size, max_blocks
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def grow(self, sid: int, n: int) -> None:
        t = self.tables.setdefault(sid, [])
        self.lens.setdefault(sid, 0)
        while len(t) * self.bs < self.lens[sid] + n:
            t.append(self.free.pop())

    def release(self, sid: int) -> None:
        self.free.extend(self.tables.pop(sid))
        del self.lens[sid]

    def batch(self, rows: list[tuple[int, list[int]]], *, host=0, temperature=0.0, top_p=1.0, top_k=0, uniform=0.0,
              logits_rows=None) -> StepBatch:
        ids, pos, slots, qs, lens = [], [], [], [0], []
        tables = np.full((len(rows), self.mb), -1, I32)
        for r, (sid, toks) in enumerate(rows):
            self.grow(sid, len(toks))
            t, n0 = self.tables[sid], self.lens[sid]
            for i, tok in enumerate(toks):
                p = n0 + i
                ids.append(tok)
                pos.append(p)
                slots.append(t[p // self.bs] * self.bs + p % self.bs)
            self.lens[sid] += len(toks)
            qs.append(len(ids))
            lens.append(self.lens[sid])
            tables[r, : len(t)] = t
        nr = len(rows)

        def per_row(v, dt):
            return np.asarray(v if np.ndim(v) else [v] * nr, dt)

        return StepBatch(self.bs, np.asarray(ids, I32), np.asarray(pos, I32), np.asarray(slots, I32), np.asarray(qs, I32),
                         np.asarray(lens, I32), tables, per_row(1 if logits_rows is None else logits_rows, I32),
                         per_row(temperature, F32), per_row(top_p, F32), per_row(top_k, I32), per_row(uniform, F32),
                         per_row(host, I32))

    def rewind(self, sid: int, n: int) -> None:
        """Forget the last n tokens (a step re-run at the same slots writes the same K/V)."""
        self.lens[sid] -= n


def _bundle(tmp_path, arch="llama", seed=0, **kw):
    """hidden 128: every linear's K is a multiple of the tensor-core GEMM's 128 (batch_invariant)."""
    kw = {"hidden": 128, "inter": 256, **kw}
    spec = spec_from_hf_config(tiny_config(arch, **kw))
    w = random_weights(spec, "int4", 32, seed=seed, std=0.15)
    return write_bundle(tmp_path / f"{arch}-{seed}", spec, w, "int4", 32, max_context=256, max_batch=8), spec, w


def _backend(path, **kw):
    from edge.runtime.cuda.backend import CudaBackend

    return CudaBackend.open(path, max_context=128, **kw)


def _pool(be) -> Pool:
    return Pool(be.caps.num_blocks, be.caps.block_size, be.caps.blocks_per_seq)


# ---- the tensor-core GEMM ------------------------------------------------------------------------
@pytest.mark.parametrize("kind,g", [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 0)])
def test_tc_gemm_matches_numpy_and_is_batch_invariant(kind, g):
    import cupy as cp

    from edge.runtime.cuda.gemm import TcWorkspace, launch_tc, plan_tc, split_candidates
    from edge.runtime.cuda.kernels import load
    from edge.runtime.cuda.layout import Linear

    k = load(0)
    rng = np.random.default_rng(g + 1)
    n, kk = 203, 1024  # N not a multiple of a block's 128 columns
    w = rng.standard_normal((n, kk), dtype=np.float32) * 0.05
    bias = rng.standard_normal(n).astype(np.float16)
    if kind == "int4":
        qt = quantize_int4_rtn(w, g)
        wd = dequantize_int4(qt.qweight, qt.scales, g)
        raw = cp.asarray(qt.qweight).view(cp.uint32)
        q = cp.empty_like(raw)
        k["repack_int4"](((raw.size + 255) // 256,), (256,), (raw, q, np.int64(raw.size)))
        lin = Linear("int4", n, kk, q, cp.asarray(qt.scales), int(np.log2(g)), cp.asarray(bias))
    else:
        qt = quantize_int8_rtn(w)
        wd = dequantize_int8(qt.qweight, qt.scales)
        lin = Linear("int8", n, kk, cp.asarray(qt.qweight), cp.asarray(qt.scales), 0, cp.asarray(bias))
    x = rng.standard_normal((300, kk), dtype=np.float32).astype(np.float16)
    want = x.astype(np.float32) @ wd.T + bias.astype(np.float32)
    plan_tc(lin, 132)
    assert lin.tc_splits > 1
    first = {}
    rings = ((2, 0, 0), (4, 0, 0), (2, 4, 0), (2, 8, 0))
    cases = [(s, r) for s in (1, max(split_candidates(lin))) for r in rings] + [(1, (2, 0, 2)), (1, (2, 0, 4))]
    for splits, (depth, ring, kb) in cases:
        # no K split / split K (partials + last-block reduction); 2 or 4 weight loads in flight per
        # warp in registers, or a cp.async shared-memory ring of 4 / 8 stages; or K split across
        # the 8 warps of a block on 2 / 4 n8-tiles (kb: its own sums)
        lin.tc_splits, lin.tc_depth, lin.tc_async, lin.tc_kb = splits, depth, ring, kb
        ws = TcWorkspace.for_linears(cp, [lin])
        alone = {}
        for m in (1, 2, 5, 16, 17, 33, 64, 100, 300):  # m > 64: launches of 64-row chunks
            y = cp.full((m, n), np.nan, dtype=cp.float16)
            launch_tc(k, lin, cp.asarray(x[:m]), m, y, ws)
            check(y.get(), want[:m], 3e-3, f"tc {kind} g{g} m{m} splits {lin.tc_splits}")
            yf = cp.full((m, n), np.nan, dtype=cp.float32)
            launch_tc(k, lin, cp.asarray(x[:m]), m, yf, ws, out_f32=True)
            check(yf.get(), want[:m], 3e-3, f"tc f32 {kind} m{m}")
            alone[m] = yf.get()
        for m in alone:  # row r's numbers do not depend on the other rows
            assert np.array_equal(alone[m][0], alone[1][0]) and np.array_equal(alone[m][: min(m, 5)], alone[5][: min(m, 5)]), m
        assert int(ws.tickets.get().sum()) == 0  # every ticket counter reset by its last block
        key = (splits, kb)
        if key in first:  # the depth / ring changes no bit
            assert all(np.array_equal(alone[m], first[key][m]) for m in alone), (splits, depth, ring, kb)
        first.setdefault(key, alone)


# ---- execute() -----------------------------------------------------------------------------------
def test_execute_matches_reference_prefill_decode_and_mixed(tmp_path):
    path, spec, w = _bundle(tmp_path, seed=3)
    be = _backend(path)
    pool = _pool(be)
    rng = np.random.default_rng(1)
    seqs = {0: rng.integers(0, 256, 40), 1: rng.integers(0, 256, 30), 2: rng.integers(0, 256, 25)}
    ref = {i: reference_logits(spec, w, s) for i, s in seqs.items()}

    def run(rows, n_check):
        """Execute with host logits, check against the reference, re-run the same step greedy."""
        b = pool.batch([(sid, seqs[sid][a:z].tolist()) for sid, a, z in rows], host=1)
        out = be.execute(b)
        assert (out.sampled == -1).all()
        for r, (sid, a, z) in enumerate(rows):
            check(out.logits[r], ref[sid][z - 1], 1e-2, f"seq {sid} tokens [{a}, {z})")
        for sid, a, z in rows:
            pool.rewind(sid, z - a)
        g = be.execute(pool.batch([(sid, seqs[sid][a:z].tolist()) for sid, a, z in rows]))
        assert g.logits is None and g.sampled.tolist() == out.logits[: len(rows)].argmax(1).tolist()

    run([(0, 0, 20), (1, 0, 5)], 2)  # two prompts in one step (M = 25: tensor-core GEMMs)
    run([(0, 20, 21), (1, 5, 17), (2, 0, 3)], 3)  # a decode row + a chunk over a cached prefix + a prompt
    for t in range(3):  # decode-only steps: the captured graph for the bucket
        run([(0, 21 + t, 22 + t), (1, 17 + t, 18 + t), (2, 3 + t, 4 + t)], 3)
    run([(2, 6, 25), (0, 24, 25), (1, 20, 21)], 3)
    big = be.session
    big.tc_min_m = 1 << 30  # the same mixed steps without tensor cores (GEMV / cuBLAS): same numbers
    run([(0, 25, 40), (1, 21, 22)], 2)


def _greedy_run(be, prompts, n_new, together: bool, force=None):
    """Greedy tokens and per-step logits for each prompt, all rows in the same steps or one
    prompt at a time; `force` feeds those tokens instead of the row's own argmax."""
    pool = _pool(be)
    toks = {i: [] for i in range(len(prompts))}
    logits = {i: [] for i in range(len(prompts))}
    groups = [list(range(len(prompts)))] if together else [[i] for i in range(len(prompts))]
    for grp in groups:
        out = be.execute(pool.batch([(i, prompts[i].tolist()) for i in grp], host=1))
        for r, i in enumerate(grp):
            toks[i].append(int(out.logits[r].argmax()))
            logits[i].append(out.logits[r].copy())
        for step in range(n_new - 1):
            live = [i for i in grp if not (i == 0 and step >= 3)]  # sequence 0 leaves early
            feed = [(force or toks)[i][step] for i in live]
            out = be.execute(pool.batch([(i, [f]) for i, f in zip(live, feed)], host=1))
            for r, i in enumerate(live):
                toks[i].append(int(out.logits[r].argmax()))
                logits[i].append(out.logits[r].copy())
        for i in grp:
            pool.release(i)
    return toks, logits


@pytest.mark.parametrize("invariant", [True, False])
def test_batch_of_rows_equals_each_alone(tmp_path, invariant):
    """batch_invariant: the same numbers bit for bit whatever the batch, so the same tokens.
    Default (M = 1 fused GEMVs, M > 1 tensor cores, cuBLAS past 64 rows): the same logits to
    rounding, each step fed the tokens the rows produced alone."""
    path, spec, w = _bundle(tmp_path, "qwen2", seed=2)
    be = _backend(path, batch_invariant=invariant)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, n) for n in (3, 17, 40, 9, 28)]  # together: 97 prompt tokens
    alone, la = _greedy_run(be, prompts, 12, together=False)
    both, lb = _greedy_run(be, prompts, 12, together=True, force=None if invariant else alone)
    for i in range(len(prompts)):
        assert len(lb[i]) == len(la[i])
        for t in range(len(la[i])):
            if invariant:
                assert np.array_equal(lb[i][t], la[i][t]), (i, t, rel(lb[i][t], la[i][t]))
            else:
                check(lb[i][t], la[i][t], 1e-2, f"seq {i} step {t}")
    if invariant:
        assert both == alone


def test_run_greedy_equals_execute_step_by_step(tmp_path):
    path, spec, w = _bundle(tmp_path, seed=6)
    be = _backend(path)
    prompt = np.random.default_rng(9).integers(0, 256, 11).tolist()
    pool = _pool(be)
    first = int(be.execute(pool.batch([(0, prompt)])).sampled[0])
    want = [first]
    for _ in range(30):
        want.append(int(be.execute(pool.batch([(0, [want[-1]])])).sampled[0]))
    pool.release(0)
    first2 = int(be.execute(pool.batch([(1, prompt)])).sampled[0])
    pool.grow(1, 30)  # the engine reserves every stream step's slots first
    b = pool.batch([(1, [first2])])
    got = [first2, *be.run_greedy(b, 30)]
    assert got == want
    # closing early stops it; the context's room bounds it
    it = be.run_greedy(b, 30)
    assert [next(it) for _ in range(5)] == want[1:6]
    it.close()


def _oracle(logits, temperature, top_p, top_k, u):
    """sample_rows' rule in numpy (float64)."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    if top_k > 0:
        ps[top_k:] = 0
        ps /= ps.sum()
    ps = np.where((np.cumsum(ps) - ps) < top_p, ps, 0)
    cdf = np.cumsum(ps) / ps.sum()
    return int(order[min(int((cdf < u).sum()), len(cdf) - 1)])


def test_device_sampling_per_row_parameters(tmp_path):
    path, spec, w = _bundle(tmp_path, seed=11)
    be = _backend(path)
    pool = _pool(be)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 9, 13, 7)]
    base = be.execute(pool.batch([(i, p) for i, p in enumerate(prompts)], host=1)).logits.astype(np.float64)
    temps, tps, tks = [0.0, 0.8, 1.3, 0.7], [1.0, 0.9, 0.5, 1.0], [0, 0, 0, 5]
    for u in (0.0, 0.31, 0.77, 0.999):
        for i in range(4):
            pool.rewind(i, len(prompts[i]))
        out = be.execute(pool.batch([(i, p) for i, p in enumerate(prompts)], temperature=temps, top_p=tps, top_k=tks,
                                    uniform=[u] * 4, host=[0, 0, 0, 1]))
        assert out.sampled[0] == int(base[0].argmax())
        assert out.sampled[1] == _oracle(base[1], 0.8, 0.9, 0, u)
        assert out.sampled[2] == _oracle(base[2], 1.3, 0.5, 0, u)
        assert out.sampled[3] == -1 and np.allclose(out.logits[3], base[3], rtol=0, atol=0)
    # top-k on the device too, when a row asks for it without host sampling
    for i in range(4):
        pool.rewind(i, len(prompts[i]))
    out = be.execute(pool.batch([(i, p) for i, p in enumerate(prompts)], temperature=0.9, top_k=3, uniform=0.6))
    assert out.sampled.tolist() == [_oracle(base[i], 0.9, 1.0, 3, 0.6) for i in range(4)]


def test_caps_and_planned_kv_bytes(tmp_path):
    from edge.runtime.cuda.backend import kv_bytes_per_block, plan_limits, pool_blocks

    path, spec, w = _bundle(tmp_path, seed=1)
    be = _backend(path)
    c = be.caps
    assert c.kv_layout == "paged" and c.device_sampling and c.greedy_stream and c.mixed_rows and c.kv_dtype == "fp16"
    assert c.kv_bytes == be.session.kv.nbytes == c.num_blocks * kv_bytes_per_block(spec, c.block_size)
    lim = plan_limits(be.session.bundle)
    assert c.num_blocks == pool_blocks(spec, lim, c.max_seqs, c.max_context, c.block_size)
    assert be.session.caps is c  # the session delegates to this backend: it is the engine backend too


# ---- the engine (edge.runtime.engine, when it has landed) ------------------------------------------
def _engine_tokens(engine, prompt, params):
    s = engine.submit(prompt, params, detokenize=False)
    list(s)
    return list(s.request.output_ids), s.request.finish_reason


def test_engine_twelve_concurrent_equal_alone_and_seeded_sampling(tmp_path):
    eng = pytest.importorskip("edge.runtime.engine")
    from edge.runtime.sampler import SamplingParams

    path, spec, w = _bundle(tmp_path, seed=4)
    be = _backend(path, max_batch=16, batch_invariant=True)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(2, 60, 12)]
    params = [SamplingParams(max_tokens=4 + 3 * (i % 7), temperature=0) for i in range(12)]
    alone = []
    with eng.Engine(be) as e:
        for p, sp in zip(prompts, params):
            alone.append(_engine_tokens(e, p, sp))
    with eng.Engine(be) as e:
        together = run_together(e, prompts, params)
    assert together == alone
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    with eng.Engine(be) as e:
        want = _engine_tokens(e, prompts[0], seeded)
    with eng.Engine(be) as e:
        others = [e.submit(p, SamplingParams(max_tokens=12, temperature=1.0, seed=i), detokenize=False) for i, p in enumerate(prompts[1:6])]
        got = _engine_tokens(e, prompts[0], seeded)
        [list(o) for o in others]
    assert got == want


def test_engine_async_steps_equal_one_step_at_a_time(tmp_path):
    """Async steps (step N+1 launched before N's ids are read back; rows take N's ids on the
    device, in graph steps and in mixed steps behind a launch): the same tokens and finish
    reasons as one step at a time, with an EOS that ends requests mid-way (their extra step's
    token dropped) and seeded sampling rows."""
    eng = pytest.importorskip("edge.runtime.engine")
    from edge.runtime.sampler import SamplingParams

    path, spec, w = _bundle(tmp_path, seed=4)
    be = _backend(path, max_batch=16, batch_invariant=True)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(2, 60, 12)]
    params = [SamplingParams(max_tokens=6 + 3 * (i % 7), temperature=0) if i % 4 else
              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=i) for i in range(12)]

    def run(overlap, eos=()):
        kinds = []  # per launch: (took ids from the previous launch, a mixed step)
        launch = be.launch
        be.launch = lambda b: kinds.append((b.has_prev_rows, not b.is_decode_only)) or launch(b)
        try:
            # a small budget: prompt pieces run beside rows already decoding (mixed steps behind a launch)
            with eng.Engine(be, eos_ids=eos, overlap=overlap, token_budget=40, prefill_chunk=16) as e:
                got = run_together(e, prompts, params)
        finally:
            del be.launch
        return got, kinds

    serial, _ = run(False)
    eos = serial[1][0][3]  # a token request 1 samples mid-way
    want, _ = run(False, (eos,))
    got, kinds = run(True, (eos,))
    assert got == want
    assert any(r == "stop" for _, r in want) and any(r == "length" for _, r in want)
    assert sum(p for p, _ in kinds) > 10 and any(p and m for p, m in kinds)


@pytest.mark.parametrize("kw", [{"hidden": 128, "heads": 2, "kv_heads": 1}, {"hidden": 256, "heads": 4, "kv_heads": 2}, {"hidden": 256, "heads": 2, "kv_heads": 1}])
def test_flash_prefill_matches_reference_and_cublas(tmp_path, kw):
    """The tensor-core prefill attention (head_dim 64 / 128, GQA): a 150-token prompt (three query
    tiles, three key blocks), then a 90-token chunk over the cached prefix; against the fp32
    reference and against the cuBLAS path on the same cache. Every block shape (prefill.FLASH_VARIANTS:
    128-query blocks skip a warp's wholly masked key tiles) gives the same bits as the 64-query block."""
    from edge.runtime.cuda.prefill import FLASH_VARIANTS
    from edge.runtime.cuda.session import CudaDecoderSession

    path, spec, w = _bundle(tmp_path, seed=7, **kw)
    assert spec.head_dim in (64, 128)
    ids = np.random.default_rng(3).integers(0, 256, 240)
    ref = reference_logits(spec, w, ids)
    sess = CudaDecoderSession(path, max_batch=2, max_context=256, block_size=16)
    got = {}
    variants = [v for v, f in FLASH_VARIANTS.items() if spec.head_dim in f[3]]
    for flash in [*variants, None]:
        sess.flash_prefill = flash is not None
        sess.flash_variant = flash or "w4"
        sess.add_sequence(0)
        a = sess.prefill(0, ids[:150])
        b = sess.prefill(0, ids[150:240])
        sess.release(0)
        got[flash] = (a, b)
        check(a, ref[149], 2e-2, f"prefill 150 flash={flash} {kw}")
        check(b, ref[239], 2e-2, f"chunk 150..240 flash={flash} {kw}")
    check(got["w4"][0], got[None][0], 1e-2, "flash vs cublas")
    check(got["w4"][1], got[None][1], 1e-2, "flash vs cublas, chunk")
    for v in variants:
        assert np.array_equal(got[v][0], got["w4"][0]) and np.array_equal(got[v][1], got["w4"][1]), f"flash {v} differs from w4"


def test_prefill_dequant_ring_same_bits_and_reference(tmp_path):
    """Long prefills dequantize linear i + 1 on a side stream while GEMM i runs (dequant_ring.py):
    the logits are bit for bit those of the inline path on a 150-token prompt and a 90-token
    chunk over it (the ring's buffers reused across prefills), and match the fp32 reference."""
    from edge.runtime.cuda.session import CudaDecoderSession

    path, spec, w = _bundle(tmp_path, seed=11)
    ids = np.random.default_rng(5).integers(0, 256, 240)
    ref = reference_logits(spec, w, ids)
    sess = CudaDecoderSession(path, max_batch=2, max_context=256, block_size=16)
    assert 90 > sess.tc_max_m  # both passes' linears take the cuBLAS path (the ring's)
    got = {}
    for overlap in (False, True, True):
        sess.prefill_overlap = overlap
        sess.add_sequence(0)
        a = sess.prefill(0, ids[:150])
        b = sess.prefill(0, ids[150:240])
        sess.release(0)
        got.setdefault(overlap, []).append(np.stack([a, b]))
    assert sess._ring_parts is not None and sess._ring is None  # the ring ran, and is dropped after each pass
    base = got[False][0]
    for v in got[True]:
        assert np.array_equal(v, base), f"max abs diff {np.abs(v - base).max():.3e}"
    check(base[0], ref[149], 2e-2, "prefill 150")
    check(base[1], ref[239], 2e-2, "chunk 150..240")
