"""The native CPU backend (edge/runtime/cpu) under the engine: logits against the numpy reference,
concurrent == alone (greedy and seeded), prefix-cache hits, planned vs allocated KV, and the
architectures it refuses. Tiny seeded Llama / Qwen2 bundles in the shipped int4 recipe (int4
layers, int8 head)."""

from __future__ import annotations


import numpy as np
import pytest

from engine_checks import check_concurrent_equals_alone, check_prefix_cache_same_text, check_seeded_sampling_equals_alone
from helpers_tiny import make_tiny_bundle, tiny_hf_model

from edge.bundle import Bundle
from edge.cpu import cpu_flags, is_x86
from edge.errors import BackendError
from edge.models.reference import forward
from edge.runtime.cpu import build
from edge.runtime.cpu.backend import NativeBackend, planned_kv_bytes
from edge.runtime.generator import Generator
from edge.runtime.sampler import SamplingParams
from edge.runtime.step import StepBatch
from edge.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("nat") / "int4", tiny_hf_model("llama", seed=5), "int4", forms=(),
                            max_context=64, max_batch=4)


def _one_row(be, ids, pos, tables, lo, hi):
    bs = be.block_size
    p = pos[lo:hi]
    slots = (tables[0, p // bs] * bs + p % bs).astype(np.int32)
    one = np.ones(1, np.int32)
    sb = StepBatch(bs, ids[lo:hi].copy(), p.copy(), slots, np.array([0, hi - lo], np.int32), np.array([hi], np.int32), tables,
                   one, np.zeros(1, np.float32), np.ones(1, np.float32), np.zeros(1, np.int32), np.zeros(1, np.float32), one.copy())
    sb.validate()
    return be.execute(sb).logits[0].copy()


def _rows_step(be, rows):
    """One step of several rows, each (ids, positions, block table row), every row wanting logits."""
    bs = be.block_size
    ids = np.concatenate([r[0] for r in rows]).astype(np.int32)
    pos = np.concatenate([r[1] for r in rows]).astype(np.int32)
    slots = np.concatenate([r[2][r[1] // bs] * bs + r[1] % bs for r in rows]).astype(np.int32)
    qs = np.cumsum([0] + [len(r[0]) for r in rows]).astype(np.int32)
    tables = np.stack([r[2] for r in rows]).astype(np.int32)
    n = len(rows)
    one = np.ones(n, np.int32)
    sb = StepBatch(bs, ids, pos, slots, qs, np.array([r[1][-1] + 1 for r in rows], np.int32), tables, one, np.zeros(n, np.float32),
                   np.ones(n, np.float32), np.zeros(n, np.int32), np.zeros(n, np.float32), one.copy())
    sb.validate()
    return be.execute(sb).logits[:n].copy()


@pytest.mark.parametrize("arch,hidden,kv", [("llama", 64, "fp16"), ("qwen2", 64, "fp16"), ("llama", 256, "fp16"), ("llama", 64, "int8"),
                                            ("llama", 256, "int8")])
def test_logits_follow_the_numpy_reference_over_scattered_blocks(tmp_path, arch, hidden, kv):
    """A 12-token prompt piece then 12 decode steps, the row's KV in blocks 3, 1, 2 of the pool,
    against edge.models.reference.forward over the bundle's own (dequantized) weights. The gap is
    the int8 activations and the fp16 (or int8) KV. hidden 256: head_dim 64 (full 16-position K
    chunks and 4-vector V sums per head)."""
    path = make_tiny_bundle(tmp_path / "b", tiny_hf_model(arch, seed=3, hidden=hidden), "int4", forms=(), max_context=64, max_batch=4,
                            kv_dtype=kv)
    b = Bundle.open(path, verify=False)
    be = NativeBackend(b, threads=2)
    assert be.caps.kv_dtype == kv
    ids = np.random.default_rng(0).integers(0, 256, 24).astype(np.int32)
    want = forward(b.spec, b.load_weights(), ids)[11:]
    pos = np.arange(len(ids), dtype=np.int32)
    tables = np.array([[3, 1, 2, -1]], np.int32)
    got = np.stack([_one_row(be, ids, pos, tables, 0, 12)] + [_one_row(be, ids, pos, tables, i, i + 1) for i in range(12, len(ids))])
    err = np.abs(got - want).max() / np.abs(want).max()
    # int8 K/V add a rounding of up to 1/254 of each head's absmax per token (hidden 256: 0.056 against fp16's 0.039)
    assert err < (0.05 if kv == "fp16" else 0.08), f"{arch}: max relative logit error {err:.4f}; first rows {got[0, :4]} vs {want[0, :4]}"
    # hidden 256's random logits have near-ties: 11 of 13 rows agree (as with the attention before K was stored transposed)
    assert (got.argmax(1) == want.argmax(1)).mean() >= (0.9 if hidden == 64 else 0.8)


X86 = is_x86()


def _runs(isa: str) -> bool:  # this CPU can run that path (edge.runtime.cpu.build.ISA_NEEDS)
    return X86 and set(build.ISA_NEEDS.get(isa, ())) <= cpu_flags()


# the $EDGE_RAG_NATIVE_ISA builds (edge.runtime.cpu.build.ISA_BUILDS): the portable C, and AVX2 without AVX-512 where it runs,
# and AVX-VNNI's ymm vpdpbusd tile (or its EVEX stand-in) where it runs
ISA_BUILDS = ([(), build.ISA_BUILDS["scalar"]] + ([build.ISA_BUILDS["avx2"]] if _runs("avx2") else [])
              + ([build.avxvnni_build(cpu_flags())]
                 if X86 and set(build.avxvnni_needs(cpu_flags())) <= cpu_flags() else []))


@pytest.mark.skipif(not X86, reason="x86 flags")
@pytest.mark.parametrize("hidden,kv", [(64, "fp16"), (256, "fp16"), (64, "int8"), (256, "int8")])
def test_the_whole_step_gives_the_same_bits_without_simd(int4_bundle, tmp_path, hidden, kv):
    """This machine's build (VNNI / AVX2 / F16C code: GEMM, exp, quantization, attention) against the
    same source compiled for AVX2 without AVX-512 and for plain x86-64 (the portable C of every step,
    what an ARM build runs). hidden 256: head_dim 64, the attention's 4-vectors-per-head V sums
    (SmolLM2's, Qwen2's). kv int8: the int8 pool's K scores and V sums."""
    path = int4_bundle if hidden == 64 else make_tiny_bundle(tmp_path / "h256", tiny_hf_model("llama", seed=6, hidden=256), "int4",
                                                           forms=(), max_context=64, max_batch=4)
    b = Bundle.open(path, verify=False)
    ids = np.random.default_rng(4).integers(0, 256, 21).astype(np.int32)  # 21: not a multiple of 8 or 16
    pos = np.arange(len(ids), dtype=np.int32)
    tables = np.array([[2, 0, 3, -1]], np.int32)
    runs = []
    for flags in ISA_BUILDS:
        be = NativeBackend(b, threads=2, build_flags=flags, kv_dtype=kv)
        runs.append(np.stack([_one_row(be, ids, pos, tables, 0, 13)] + [_one_row(be, ids, pos, tables, i, i + 1) for i in range(13, 21)]))
    for r in runs[1:]:
        assert np.array_equal(runs[0], r), f"max diff {np.abs(runs[0] - r).max()}"


@pytest.mark.parametrize("threads,kv", [(2, "fp16"), (3, "fp16"), (2, "int8")])
def test_a_decode_step_with_rows_left_over_equals_each_row_alone(int4_bundle, threads, kv):
    """5 decode rows on 2 threads (7 on 3): the attention units are (row, kv head) (native.c's J.upr);
    each row's logits are bitwise those of the row alone, and those of a build whose units are whole
    rows (-DSPLIT_TAIL=0)."""
    b = Bundle.open(int4_bundle, verify=False)
    n = 5 if threads == 2 else 7
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 256, 3 + 4 * r).astype(np.int32) for r in range(n)]  # different positions, some past one block
    nxt = rng.integers(0, 256, n).astype(np.int32)
    tables = [np.array([3 * r + 2, 3 * r, 3 * r + 1, -1], np.int32) for r in range(n)]
    got = []
    for flags in ((), ("-DSPLIT_TAIL=0",)):
        be = NativeBackend(b, threads=threads, build_flags=flags, kv_dtype=kv, kv_tokens=64 * 3 * n, max_batch=n)
        for p, t in zip(prompts, tables):
            _rows_step(be, [(p, np.arange(len(p)), t)])
        dec = [(nxt[r:r + 1], np.array([len(prompts[r])]), tables[r]) for r in range(n)]
        batched = _rows_step(be, dec)
        alone = np.concatenate([_rows_step(be, [d]) for d in dec])
        assert np.array_equal(batched, alone), f"max diff {np.abs(batched - alone).max()}"
        got.append(batched)
    assert np.array_equal(got[0], got[1])


def test_which_thread_takes_which_chunk_changes_no_bit(int4_bundle):
    """The step's work is claimed from counters (native.c's phases), so which thread computes which
    column tiles and attention units differs from run to run: an 8-row decode step and a step mixing a
    prompt piece with decode rows, each run 12 times on 3 threads, give every time the bits of 1 thread."""
    b = Bundle.open(int4_bundle, verify=False)
    rng = np.random.default_rng(11)
    n = 8
    prompts = [rng.integers(0, 256, 2 + 3 * r).astype(np.int32) for r in range(n)]
    nxt = rng.integers(0, 256, n).astype(np.int32)
    tables = [np.array([3 * r + 1, 3 * r + 2, 3 * r, -1], np.int32) for r in range(n)]
    piece = rng.integers(0, 256, 9).astype(np.int32)
    want, runs = None, []
    for threads in (1, 3):
        be = NativeBackend(b, threads=threads, kv_tokens=64 * 3 * (n + 1), max_batch=n + 1)
        for p, t in zip(prompts, tables):
            _rows_step(be, [(p, np.arange(len(p)), t)])
        dec = [(nxt[r:r + 1], np.array([len(prompts[r])]), tables[r]) for r in range(n)]
        mixed = dec[:3] + [(piece, np.arange(len(piece)), np.array([3 * n, 3 * n + 1, 3 * n + 2, -1], np.int32))]
        got = [(_rows_step(be, dec), _rows_step(be, mixed)) for _ in range(12 if threads > 1 else 1)]
        if threads == 1:
            want = got[0]
        else:
            runs = got
    for i, (a, m) in enumerate(runs):
        assert np.array_equal(a, want[0]), f"decode run {i}: max diff {np.abs(a - want[0]).max()}"
        assert np.array_equal(m, want[1]), f"mixed run {i}: max diff {np.abs(m - want[1]).max()}"


def make_gen(bundle, max_batch=12, kv_dtype=None, **kw) -> Generator:
    b = Bundle.open(bundle, verify=False)
    be = NativeBackend(b, max_batch=max_batch, prefill_chunk=8, kv_tokens=max_batch * 64, threads=2,  # every row full: no preemption
                       kv_dtype=kv_dtype)
    return Generator(be, Tokenizer.from_bundle(b), b, **kw)


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_twelve_concurrent_requests_equal_each_alone(int4_bundle, kv):
    got = check_concurrent_equals_alone(lambda bundle, max_batch=12, **kw: make_gen(bundle, max_batch, kv, **kw), int4_bundle)
    assert sum(n for _, n, _ in got) > 12  # they generated (not all stopped at once)


def test_seeded_sampling_equals_alone(int4_bundle):
    check_seeded_sampling_equals_alone(make_gen, int4_bundle)


def test_prefix_cache_hit_gives_the_same_tokens_and_reads_shared_blocks(int4_bundle):
    gen = check_prefix_cache_same_text(make_gen, int4_bundle, max_tokens=6)
    assert gen.session.caps.kv_layout == "paged" and gen.session.caps.copies_blocks


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_planned_kv_is_what_the_backend_allocates(int4_bundle, tmp_path, kv):
    """The manifest's pool (kv_blocks x kv_block_size tokens of fp16 K and V, or of int8 K and V with
    one fp16 scale per token and kv head) is the pool's bytes, and the engine's block manager hands
    out exactly its blocks."""
    path = int4_bundle if kv == "fp16" else make_tiny_bundle(tmp_path / "kv8", tiny_hf_model("llama", seed=5), "int4", forms=(),
                                                             max_context=64, max_batch=4, kv_dtype="int8")
    b = Bundle.open(path, verify=False)
    lim, spec = b.limits, b.spec
    be = NativeBackend(b)
    caps = be.caps
    per_token = spec.n_layers * 2 * spec.n_kv_heads * (spec.head_dim * 2 if kv == "fp16" else spec.head_dim + 2)
    assert lim.kv_dtype == kv and caps.kv_dtype == kv
    assert caps.num_blocks == lim.kv_blocks and caps.block_size == lim.kv_block_size
    assert caps.kv_bytes == be.kv.nbytes == caps.num_blocks * caps.block_size * per_token == planned_kv_bytes(b)
    with Generator(be, Tokenizer.from_bundle(b), b).engine as e:
        assert e.kv.num_blocks == caps.num_blocks


def test_from_bundle_backend_native(int4_bundle):
    gen = Generator.from_bundle(int4_bundle, backend="native", threads=1)
    assert isinstance(gen.session, NativeBackend)
    want = make_gen(int4_bundle, max_batch=1).generate("Once upon", SamplingParams(max_tokens=5, temperature=0))
    assert gen.generate("Once upon", SamplingParams(max_tokens=5, temperature=0)) == want  # one thread == two


def test_an_architecture_it_does_not_run_is_a_one_line_error(tmp_path):
    path = make_tiny_bundle(tmp_path / "q3", tiny_hf_model("qwen3", seed=1), "int4", forms=(), max_context=32, max_batch=2)
    with pytest.raises(BackendError, match="qk_norm") as e:
        NativeBackend(Bundle.open(path, verify=False))
    assert "\n" not in str(e.value) and "onnxruntime" in e.value.fix


def test_edge_rag_native_isa_runs_that_path_or_refuses_in_one_line(int4_bundle, monkeypatch):
    """$EDGE_RAG_NATIVE_ISA (edge.runtime.cpu.build.forced_isa): avx2 builds the step without AVX-512
    (what an AVX2-only CPU runs) and gives the default build's bits, as avxvnni's tile does; a name that is no path, or a path
    this CPU lacks, is a one-line error."""
    from edge.errors import UsageError

    b = Bundle.open(int4_bundle, verify=False)
    ids = np.random.default_rng(5).integers(0, 256, 11).astype(np.int32)
    pos = np.arange(len(ids), dtype=np.int32)
    tables = np.array([[1, 0, -1, -1]], np.int32)
    want = _one_row(NativeBackend(b, threads=2), ids, pos, tables, 0, 11)
    monkeypatch.setenv("EDGE_RAG_NATIVE_ISA", "neon")
    with pytest.raises(UsageError, match="EDGE_RAG_NATIVE_ISA=neon is not a native kernel path"):
        NativeBackend(b, threads=2)
    if _runs("avx2"):
        monkeypatch.setenv("EDGE_RAG_NATIVE_ISA", "avx2")
        be = NativeBackend(b, threads=2)
        assert be.isa == "avx2" and be.lib.er_isa_max() == 1  # the AVX2 tile, and no AVX-512 path in this build
        assert np.array_equal(_one_row(be, ids, pos, tables, 0, 11), want)
    if X86 and set(build.avxvnni_needs(cpu_flags())) <= cpu_flags():  # the AVX2 tile with ymm vpdpbusd: the same dots
        monkeypatch.setenv("EDGE_RAG_NATIVE_ISA", "avxvnni")
        be = NativeBackend(b, threads=2)
        assert be.isa == "avxvnni" and be.lib.er_isa_max() == 1 and be.lib.er_ymm_vnni() == 1
        assert np.array_equal(_one_row(be, ids, pos, tables, 0, 11), want)
    monkeypatch.delenv("EDGE_RAG_NATIVE_ISA", raising=False)
    assert NativeBackend(b, threads=2).isa == build.kernel_path()  # doctor's reading of the flags is what compiles
    if not _runs("vnni"):
        monkeypatch.setenv("EDGE_RAG_NATIVE_ISA", "vnni")
        with pytest.raises(BackendError, match="cannot run it"):
            NativeBackend(b, threads=2)


def test_avxvnni_compiles_an_avx_vnni_cpus_build_or_its_stand_in(monkeypatch):
    """avxvnni: the ymm tile with vpdpbusd, as -march=native compiles it on an Alder Lake (-march=alderlake there);
    on a CPU with AVX-512 VNNI and no AVX-VNNI the same code with the EVEX instruction (native.c's and encoder.c's
    builds alike); elsewhere a one-line refusal."""
    import edge.cpu

    monkeypatch.setenv("EDGE_RAG_NATIVE_ISA", "avxvnni")
    monkeypatch.setattr(edge.cpu, "is_x86", lambda machine=None: True)
    for flags, want in (({"avx2", "fma", "f16c", "avx_vnni"}, "-march=alderlake"),
                        ({"avx2", "fma", "f16c", "avx512bw", "avx512vl", "avx512_vnni"}, "-DAVXVNNI_EVEX")):
        monkeypatch.setattr(edge.cpu, "cpu_flags", lambda f=flags: frozenset(f))
        isa, got = build.forced_isa()
        assert isa == "avxvnni" and want in got
    monkeypatch.setattr(edge.cpu, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    with pytest.raises(BackendError, match=r"avxvnni: this CPU cannot run it \(no avx_vnni \(or avx512_vnni \+ avx512vl"):
        build.forced_isa()


@pytest.fixture(scope="module")
def int4_ort_bundle(tmp_path_factory):
    """An int4 bundle with its ONNX Runtime graph too: what `auto` may fall back to."""
    return make_tiny_bundle(tmp_path_factory.mktemp("nat-ort") / "int4", tiny_hf_model("llama", seed=5), "int4", forms=("ort",),
                            max_context=64, max_batch=2)


def _fake_cpu(monkeypatch, flags, x86=True):
    import edge.cpu

    monkeypatch.setattr(edge.cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(edge.cpu, "is_x86", lambda machine=None: x86)
    monkeypatch.setattr("edge.runtime.generator._cuda_available", lambda: False)
    monkeypatch.setenv("CC", "cc")  # a compiler is found (edge.runtime.cpu.build.compiler): the CPU alone decides


def test_auto_picks_native_only_where_it_runs_fast(int4_ort_bundle, tmp_path, monkeypatch):
    """`auto` without a GPU: native for an int4 / int8 llama-family bundle on an x86 CPU with AVX2 and a C
    compiler; onnxruntime on ARM, on an x86 without AVX2, for an fp32 bundle and without a bundle."""
    from edge.runtime.generator import resolve_backend

    b = Bundle.open(int4_ort_bundle, verify=False)
    _fake_cpu(monkeypatch, {"avx2", "fma", "f16c"})
    assert resolve_backend("auto", b) == "native"
    assert resolve_backend("auto") == "onnxruntime"  # no bundle: nothing to judge
    assert resolve_backend("onnxruntime", b) == "onnxruntime"
    _fake_cpu(monkeypatch, {"sse4_2", "avx"})
    assert resolve_backend("auto", b) == "onnxruntime"
    from edge.doctor import diagnose
    from edge.runtime.cpu.backend import machine_refusal

    assert machine_refusal() == "this CPU lacks avx2, fma, f16c"  # what `edge-rag doctor` says
    d = diagnose()
    assert d["backends"]["native"] is False and d["native"] == {"auto_picks": False, "reason": machine_refusal(), "kernels": None}
    for flags, want in (({"avx2", "fma", "f16c"}, "avx2"), ({"avx2", "fma", "f16c", "avx_vnni"}, "avxvnni"),
                        ({"avx2", "fma", "f16c", "avx512bw"}, "avx512"), ({"avx2", "fma", "f16c", "avx512bw", "avx512_vnni"}, "vnni")):
        _fake_cpu(monkeypatch, flags)
        assert diagnose()["native"]["kernels"] == diagnose()["native_encoder"]["kernels"] == want  # what each build compiles
    _fake_cpu(monkeypatch, {"asimddp"}, x86=False)
    assert (build.kernel_path(), build.kernel_path(encoder=True)) == ("scalar", "neon")
    _fake_cpu(monkeypatch, {"avx2", "fma", "f16c"}, x86=False)
    assert resolve_backend("auto", b) == "onnxruntime"
    _fake_cpu(monkeypatch, {"avx2", "fma", "f16c"})
    with monkeypatch.context() as m:  # no compiler on PATH and no $CC
        m.delenv("CC")
        m.setattr(build.shutil, "which", lambda name: None)
        assert resolve_backend("auto", b) == "onnxruntime" and machine_refusal() == "no C compiler (cc) to build its kernels"
    fp32 = Bundle.open(make_tiny_bundle(tmp_path / "fp32", tiny_hf_model("llama", seed=5), "fp32", forms=(), max_context=32, max_batch=1),
                       verify=False)
    assert resolve_backend("auto", fp32) == "onnxruntime"
    q3 = Bundle.open(make_tiny_bundle(tmp_path / "q3", tiny_hf_model("qwen3", seed=1), "int4", forms=(), max_context=32, max_batch=1),
                     verify=False)
    assert resolve_backend("auto", q3) == "onnxruntime"  # qk_norm: not in native.c


@pytest.mark.skipif(not (is_x86() and set(build.ISA_NEEDS["avx2"]) <= cpu_flags()), reason="auto picks native only on x86 with AVX2")
def test_auto_generator_runs_native_and_falls_back_when_cc_fails(int4_ort_bundle, monkeypatch, capsys):
    """From a bundle, `auto` runs native (the tokens of `--backend native`); where the compiler it found fails,
    it says so on stderr and runs onnxruntime (its tokens); `--backend native` is then a one-line error."""
    monkeypatch.setattr("edge.runtime.generator._cuda_available", lambda: False)
    gen = Generator.from_bundle(int4_ort_bundle)
    assert gen.engine.caps.backend == "native" and isinstance(gen.session, NativeBackend)
    p = SamplingParams(max_tokens=5, temperature=0)
    assert gen.generate("Once upon", p) == Generator.from_bundle(int4_ort_bundle, backend="native").generate("Once upon", p)
    build.load.cache_clear()
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("EDGE_RAG_NATIVE_CFLAGS", "-DFALLBACK_TEST=1")  # a new .so name: nothing cached to reuse
    try:
        gen = Generator.from_bundle(int4_ort_bundle)
        assert gen.engine.caps.backend == "onnxruntime"
        err = capsys.readouterr().err
        assert "native CPU backend cannot run here" in err and "using onnxruntime" in err
        assert gen.generate("Once upon", p) == Generator.from_bundle(int4_ort_bundle, backend="onnxruntime").generate("Once upon", p)
        with pytest.raises(BackendError, match="does not run"):
            Generator.from_bundle(int4_ort_bundle, backend="native")
    finally:
        build.load.cache_clear()
