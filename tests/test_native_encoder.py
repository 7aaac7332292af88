"""The native CPU encoder (edge/runtime/cpu/encoder.py, csrc/encoder.c) against the int8 graph it
computes: a numpy transcription of that graph (exact integer GEMMs), ONNX Runtime running the graph
itself where its u8 x s8 GEMM is exact (VNNI, ARM), and the embedder's choice between them."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.build.encoder import build_embedder_bundle
from edge.bundle import Bundle
from edge.cpu import u8s8_exact
from edge.errors import BackendError
from edge.models import bert_graph_names as names
from edge.runtime.cpu.encoder import NativeEncoder, NativeUnavailable, pack_weight, pack_weight16, read_graph, vector_isa
from edge.runtime.embedder import Embedder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_tiny import _WORDS, make_tiny_st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_embed import varied_texts  # noqa: E402

def _has_cc() -> bool:
    from edge.runtime.cpu.build import compiler

    try:
        compiler()
        return True
    except BackendError:
        return False


# the native encoder compiles encoder.c at first use: where no C compiler exists, every test that opens one skips
needs_cc = pytest.mark.skipif(not _has_cc(), reason="no C compiler (cc): the native encoder cannot be built here")
NO_VECTOR = "this CPU has neither AVX2 nor AVX-512 VNNI: the native encoder's vector kernels do not run here"
ORT_SATURATES = "onnxruntime's u8 x s8 GEMM saturates on x86 without VNNI: it is no oracle for the int8 (VNNI) graph here"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """int8 bundles as built on a VNNI/ARM CPU (int8 weights), head_dim 32 (the vector attention) and 16."""
    root = tmp_path_factory.mktemp("native_encoder")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGE_RAG_U8S8", "exact")
    try:
        out = {}
        for name, heads in (("hd32", 2), ("hd16", 4)):
            folder = make_tiny_st(root / f"st-{name}", "mean", True, seed=3, heads=heads)
            out[name] = build_embedder_bundle(folder, root / name, quant="int8", progress=False)
        out["folder"] = folder
        return out
    finally:
        mp.undo()


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 45))) for _ in range(n)]


def _reference(arrays: dict, n_heads: int, ids: list[int]) -> np.ndarray:
    """The int8 graph of edge.build.encoder in numpy: per-row uint8 activations, exact int32 products."""
    A = arrays
    qs = np.float32(A["const/row_quant/scale"])

    def ln(x, w, b):
        m = x.mean(-1, keepdims=True)
        return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + np.float32(1e-12)) * w + b

    def linear(x, key, smooth=None):
        if smooth is not None:
            x = x * A[smooth]
        r = np.maximum(np.abs(x).max(-1, keepdims=True), A["const/row_quant/eps"])
        q = np.clip(np.rint((x * (np.float32(1) / r)) / qs) + 128, 0, 255).astype(np.int64)
        w = A[f"{key}.weight_quantized"].astype(np.int64)
        return ((q - 128) @ w).astype(np.float32) * (qs * A[f"{key}.weight_scale"]) * r

    from math import erf

    gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + erf(v / np.sqrt(2.0))), otypes=[np.float32])
    s = len(ids)
    x = ln(A["embeddings.word"][ids] + A["embeddings.position"][:s], A["embeddings.ln.weight"], A["embeddings.ln.bias"])
    layer = 0
    while f"/model/layers.{layer}/attn/qkv.bias" in A:
        p = f"/model/layers.{layer}/"
        sm, b = f"{p}attn/qkv/q/MatMul/smooth_inv", A[f"{p}attn/qkv.bias"]
        h = x.shape[1]
        q, k, v = (linear(x, f"{p}attn/qkv/{t}", sm) + b[i * h:(i + 1) * h] for i, t in enumerate("qkv"))
        d = h // n_heads
        q, k, v = (t.reshape(s, n_heads, d).transpose(1, 0, 2) for t in (q, k, v))
        sc = q @ k.transpose(0, 2, 1) / np.sqrt(np.float32(d))
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        a = ((sc / sc.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(s, h).astype(np.float32)
        x = ln(linear(a, f"{p}attn/o_proj") + A[f"{p}attn/o_proj.bias"] + x, A[f"{p}attn_ln.weight"], A[f"{p}attn_ln.bias"])
        u = gelu(linear(x, f"{p}mlp/up", f"{p}mlp/up/MatMul/smooth_inv") + A[f"{p}mlp/up.bias"])
        x = ln(linear(u, f"{p}mlp/down") + A[f"{p}mlp/down.bias"] + x, A[f"{p}mlp_ln.weight"], A[f"{p}mlp_ln.bias"])
        layer += 1
    vec = x.mean(0)
    return vec / np.linalg.norm(vec)


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def test_pack_weight_layout():
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (8, 128)).astype(np.int8)
    p = pack_weight(w)
    assert p.shape == (2, 2, 64, 4)
    for nb, k4, c, t in [(0, 0, 0, 0), (1, 1, 63, 3), (0, 1, 5, 2), (1, 0, 17, 1)]:
        assert p[nb, k4, c, t] == w[4 * k4 + t, 64 * nb + c]


def test_pack_weight16_layout():
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (6, 32)).astype(np.int8)
    p = pack_weight16(w)
    assert p.shape == (2, 3, 16, 2) and p.dtype == np.int16
    for nb, k2, c, t in [(0, 0, 0, 0), (1, 2, 15, 1), (0, 1, 7, 1), (1, 0, 3, 0)]:
        assert p[nb, k2, c, t] == w[2 * k2 + t, 16 * nb + c]


def test_the_loader_finds_its_arrays_by_the_names_the_builder_writes(bundles, monkeypatch):
    """Every array the native loader asks for is in the int8 graph edge.build.encoder wrote, and the only
    arrays of that graph it leaves are mean pooling's (encoder.c pools by itself): a name that the builder
    and the loader spell apart fails here, even one the loader has a default for (const/eps_norm)."""
    import edge.runtime.cpu.encoder as enc_mod

    class Asked(dict):
        def __init__(self, d):
            super().__init__(d)
            self.asked: set[str] = set()

        def __getitem__(self, k):
            self.asked.add(k)
            return super().__getitem__(k)

        def __contains__(self, k):
            self.asked.add(k)
            return super().__contains__(k)

        def get(self, k, default=None):
            self.asked.add(k)
            return super().get(k, default)

    class NoLib:  # the loader's reading only: nothing is compiled or run
        def er_enc_isa(self) -> int:
            return 0

    monkeypatch.setattr(enc_mod, "load_lib", lambda *a: NoLib())
    b = Bundle.open(bundles["hd32"])
    arrays, attrs = read_graph(b.file("model.onnx"))
    asked = Asked(arrays)
    NativeEncoder(asked, attrs)
    n_layers = b.manifest.model["n_layers"]
    # the layer count stops at the first layer without a qkv bias: the one probe the graph cannot answer
    assert asked.asked - set(arrays) == {names.bias(names.layer_key(n_layers, names.QKV))}
    assert set(arrays) - asked.asked == {names.AXES_1, names.AXES_M1, names.EPS_COUNT}


@needs_cc
@pytest.mark.parametrize("name", ["hd32", "hd16"])
def test_portable_c_matches_a_numpy_transcription_of_the_graph(bundles, name):
    """The portable C path (what a CPU without AVX-512 VNNI would run) is the graph: the same int8
    products, float ops to rounding."""
    arrays, attrs = read_graph(Bundle.open(bundles[name]).file("model.onnx"))
    enc = NativeEncoder.open(Bundle.open(bundles[name]), force_scalar=True)
    emb = Embedder.from_bundle(bundles[name], backend="onnxruntime")
    ids = emb._encode(_texts(12, seed=1))
    ref = np.stack([_reference(arrays, attrs["n_heads"], x) for x in ids])
    got = enc.run(ids)
    assert _min_cos(got, ref) > 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def _runs(isa: str) -> bool:
    """Whether this CPU can run encoder.c's `isa` kernels (an AVX2 build runs on every AVX2 + FMA x86)."""
    from edge.cpu import cpu_flags, is_x86
    from edge.runtime.cpu.build import ISA_NEEDS, avxvnni_needs

    needs = avxvnni_needs(cpu_flags()) if isa == "avxvnni" else ISA_NEEDS[isa]
    return is_x86() and all(f in cpu_flags() for f in needs)


@pytest.fixture
def kernels(monkeypatch):
    """forced(isa): NativeEncoder.open then compiles encoder.c for that kernel path (EDGE_RAG_NATIVE_ISA), as a
    CPU whose best path it is would (avx2: an AVX2-only x86, here on whatever x86 runs the tests)."""
    from edge.runtime.cpu import encoder as enc_mod

    def forced(isa: str) -> None:
        if not _runs(isa):
            pytest.skip(f"this CPU cannot run encoder.c's {isa} kernels")
        monkeypatch.setenv("EDGE_RAG_NATIVE_ISA", isa)
        enc_mod.load_lib.cache_clear()

    yield forced
    enc_mod.load_lib.cache_clear()  # the next test compiles for its own setting


@needs_cc
@pytest.mark.parametrize("isa", ["vnni", "avx512", "avxvnni", "avx2"])
@pytest.mark.parametrize("name", ["hd32", "hd16"])
def test_vector_kernels_match_the_graph_and_the_portable_c(bundles, kernels, isa, name):
    """Each x86 kernel path computes the graph: avx512's and avx2's int16 GEMMs (vpmaddwd) the same integer dots as
    vnni's vpdpbusd, avxvnni's ymm vpdpbusd too, the ymm paths' 8-lane attention, norms and GELU the same float ops."""
    kernels(isa)
    b = Bundle.open(bundles[name])
    vec, port = NativeEncoder.open(b), NativeEncoder.open(b, force_scalar=True)
    assert vec.isa == isa and port.isa == "scalar"
    arrays, attrs = read_graph(b.file("model.onnx"))
    ids = Embedder.from_bundle(bundles[name], backend="onnxruntime")._encode(_texts(20, seed=2))
    got = vec.run(ids)
    assert _min_cos(got, port.run(ids)) > 0.9999
    assert _min_cos(got[:8], np.stack([_reference(arrays, attrs["n_heads"], x) for x in ids[:8]])) > 0.9999
    np.testing.assert_array_equal(vec.run([ids[3]])[0], got[3])  # rows never mix on this path either


@needs_cc
@pytest.mark.parametrize("pair", [("avxvnni", "avx2"), ("avx512", "vnni")])
def test_paths_with_the_same_float_lanes_give_the_same_vectors_bit_for_bit(bundles, kernels, pair):
    """The GEMMs of every x86 path compute the same integer dots, so two paths with the same float code (ymm: avx2 and
    avxvnni; zmm: vnni and avx512) give bitwise the same vectors."""
    ids = Embedder.from_bundle(bundles["hd32"], backend="onnxruntime")._encode(_texts(20, seed=5))
    out = []
    for isa in pair:
        kernels(isa)
        enc = NativeEncoder.open(Bundle.open(bundles["hd32"]))
        assert enc.isa == isa
        out.append(enc.run(ids))
    np.testing.assert_array_equal(out[0], out[1])


@needs_cc
@pytest.mark.skipif(not u8s8_exact(), reason=ORT_SATURATES)
def test_native_matches_onnxruntime_on_the_same_bundle(bundles):
    nat = Embedder.from_bundle(bundles["hd32"], backend="cpu")
    ort = Embedder.from_bundle(bundles["hd32"], backend="onnxruntime")
    assert ort.backend == "onnxruntime" and nat.embedder_id == ort.embedder_id
    texts = _texts(40, seed=3)
    assert _min_cos(nat.embed(texts), ort.embed(texts)) > 0.9999


@needs_cc
def test_a_vector_does_not_depend_on_its_batch(bundles):
    enc = NativeEncoder.open(Bundle.open(bundles["hd32"]))
    ids = Embedder.from_bundle(bundles["hd32"], backend="onnxruntime")._encode(_texts(9, seed=4))
    together = enc.run(ids)
    for i in (0, 4, 8):
        np.testing.assert_array_equal(enc.run([ids[i]])[0], together[i])  # rows never mix: bit for bit


def test_embedder_uses_the_native_encoder_where_it_runs_and_onnxruntime_elsewhere(bundles, monkeypatch):
    emb = Embedder.from_bundle(bundles["hd32"])  # the default backend: cpu
    assert emb.backend == ("native" if vector_isa() else "onnxruntime")
    assert emb.info.backend == emb.backend and emb.info.quant == "int8"
    monkeypatch.setenv("EDGE_RAG_NATIVE_ENCODER", "0")
    assert Embedder.from_bundle(bundles["hd32"]).backend == "onnxruntime"


@needs_cc
def test_what_the_native_encoder_cannot_run_is_refused_and_onnxruntime_embeds_it(bundles, tmp_path, monkeypatch):
    fp32 = build_embedder_bundle(bundles["folder"], tmp_path / "fp32", quant="fp32", progress=False)
    with pytest.raises(NativeUnavailable, match="int8"):
        NativeEncoder.open(Bundle.open(fp32))
    monkeypatch.setenv("EDGE_RAG_U8S8", "saturates")  # as built on an AVX2-only x86: uint8 weights
    u8 = build_embedder_bundle(bundles["folder"], tmp_path / "u8", quant="int8", progress=False)
    with pytest.raises(NativeUnavailable, match="zero point"):
        NativeEncoder.open(Bundle.open(u8))
    assert Embedder.from_bundle(fp32).backend == "onnxruntime"
    assert Embedder.from_bundle(u8).backend == "onnxruntime"


@needs_cc
def test_bad_token_ids_and_lengths_are_errors_not_crashes(bundles):
    enc = NativeEncoder.open(Bundle.open(bundles["hd32"]))
    with pytest.raises(BackendError, match="vocabulary"):
        enc.run([[101, 10 ** 6, 102]])
    with pytest.raises(BackendError, match="tokens"):
        enc.run([[101] * (enc.max_pos + 1)])
    with pytest.raises(BackendError, match="tokens"):
        enc.run([[]])
    assert enc.run([]).shape == (0, enc.dim)


@pytest.mark.slow
@pytest.mark.skipif(vector_isa() is None, reason=NO_VECTOR)
def test_default_minilm_native_against_onnxruntime_and_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    from edge.models.defaults import default_embedder_path

    folder = default_embedder_path()
    path = build_embedder_bundle(folder, tmp_path / "int8", quant="int8", progress=False)
    nat = Embedder.from_bundle(path)
    assert nat.backend == "native"
    texts = varied_texts(200)
    a = nat.embed(texts)
    if u8s8_exact():  # onnxruntime is an oracle for int8 weights only where its u8 x s8 GEMM cannot saturate
        b = Embedder.from_bundle(path, backend="onnxruntime").embed(texts)
        # a code that rounds the other way (one float op apart) in one layer moves a vector by ~1e-4
        assert _min_cos(a, b) > 0.999  # measured: 0.99949 on these 200 texts (Zen 4)
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    assert _min_cos(a, ref) > 0.99


@needs_cc
def test_the_graph_is_read_once_then_from_a_cache_without_importing_onnx(bundles, edge_home):
    import subprocess

    emb = Embedder.from_bundle(bundles["hd32"], backend="onnxruntime")
    ids = emb._encode(_texts(5, seed=6))
    first = NativeEncoder.open(Bundle.open(bundles["hd32"])).run(ids)  # reads model.onnx, writes the cache
    caches = list((edge_home / "native").glob("encoder-*.safetensors"))
    assert len(caches) == 1
    code = ("import sys, numpy as np; from edge.bundle import Bundle; from edge.runtime.cpu.encoder import NativeEncoder; "
            f"v = NativeEncoder.open(Bundle.open({str(bundles['hd32'])!r})).run({ids!r}); "
            "assert 'onnx' not in sys.modules; np.save(sys.argv[1], v)")
    out = edge_home / "v.npy"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=Path(__file__).resolve().parent.parent)
    np.testing.assert_array_equal(np.load(out), first)
    caches[0].write_bytes(b"not a safetensors file")  # damaged: read model.onnx again and rewrite it
    np.testing.assert_array_equal(NativeEncoder.open(Bundle.open(bundles["hd32"])).run(ids), first)
    assert caches[0].stat().st_size > 1000


@needs_cc
@pytest.mark.parametrize("isa", [None, "avxvnni", "avx2"])
def test_the_doctors_kernel_path_is_the_one_the_build_compiles(kernels, isa):
    """edge.runtime.cpu.build.kernel_path reads the CPU's flags (nothing compiled); encoder.c's preprocessor decides."""
    from edge.runtime.cpu.build import kernel_path

    if isa:
        kernels(isa)
    from edge.runtime.cpu.encoder import machine_refusal

    if machine_refusal() is not None:
        pytest.skip(machine_refusal())
    assert kernel_path(encoder=True) == vector_isa()


def test_the_cpu_backend_needs_avx2_or_vnni_and_says_why_not(monkeypatch):
    import edge.cpu
    from edge.doctor import diagnose
    from edge.runtime.cpu import encoder as enc_mod

    monkeypatch.setattr(edge.cpu, "is_x86", lambda machine=None: True)
    monkeypatch.setattr(edge.cpu, "cpu_flags", lambda: frozenset({"sse4_2", "avx", "avx512f", "avx512bw"}))
    why = enc_mod.machine_refusal()
    assert "AVX2" in why and enc_mod.vector_isa() is None
    d = diagnose()["native_encoder"]
    assert d == {"cpu_picks": False, "reason": why, "kernels": None}
    monkeypatch.setenv("CC", "cc")
    for flags in ({"avx2", "fma", "f16c"}, {"avx2", "avx512bw", "avx512_vnni"}):  # an AVX2-only EPYC; a VNNI Xeon
        monkeypatch.setattr(edge.cpu, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert enc_mod.machine_refusal() is None


def test_int8_weights_are_built_where_the_native_encoder_computes_them_exactly(monkeypatch):
    """On an AVX2-only x86 onnxruntime's u8 x s8 GEMM saturates, encoder.c's does not: with the native encoder
    there, embedder bundles get int8 weights (as on VNNI and ARM); without it, onnxruntime's uint8 ones."""
    import edge.cpu
    from edge.build.encoder import int8_weight_type
    from edge.runtime.cpu import encoder as enc_mod

    monkeypatch.delenv("EDGE_RAG_U8S8", raising=False)
    monkeypatch.delenv("EDGE_RAG_NATIVE_ENCODER", raising=False)
    monkeypatch.setenv("CC", "cc")
    monkeypatch.setattr(edge.cpu, "is_x86", lambda machine=None: True)
    monkeypatch.setattr(edge.cpu, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    assert enc_mod.int8_exact() and int8_weight_type(enc_mod.int8_exact()) == "int8"
    monkeypatch.setenv("EDGE_RAG_NATIVE_ENCODER", "0")  # onnxruntime will embed
    assert not enc_mod.int8_exact()
    monkeypatch.delenv("EDGE_RAG_NATIVE_ENCODER")
    monkeypatch.setattr(edge.cpu, "cpu_flags", lambda: frozenset({"sse4_2"}))  # neither runs it exactly
    assert not enc_mod.int8_exact()
    monkeypatch.setenv("EDGE_RAG_U8S8", "exact")  # building for a VNNI or ARM CPU
    assert enc_mod.int8_exact()
    monkeypatch.setattr(edge.cpu, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setenv("EDGE_RAG_U8S8", "saturates")  # building for onnxruntime on an AVX2-only x86
    assert not enc_mod.int8_exact()


def test_an_arm_cpu_runs_the_native_encoder_only_when_asked(monkeypatch):
    """Orin's cores have sdot (asimddp): encoder.c's NEON kernels compute the graph there (tests/test_native_arm.py,
    under qemu) but were never timed on an ARM chip, so onnxruntime stays the default until EDGE_RAG_NATIVE_ENCODER=1."""
    import platform

    import edge.cpu
    from edge.runtime.cpu import encoder as enc_mod

    monkeypatch.setattr(edge.cpu, "is_x86", lambda machine=None: False)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setenv("CC", "cc")
    monkeypatch.delenv("EDGE_RAG_NATIVE_ENCODER", raising=False)
    monkeypatch.setattr(edge.cpu, "cpu_flags", lambda: frozenset({"fp", "asimd", "asimddp"}))
    why = enc_mod.machine_refusal()
    assert "EDGE_RAG_NATIVE_ENCODER=1" in why
    monkeypatch.setenv("EDGE_RAG_NATIVE_ENCODER", "1")
    assert enc_mod.machine_refusal() is None
    monkeypatch.setattr(edge.cpu, "cpu_flags", lambda: frozenset({"fp", "asimd"}))  # ARMv8.0: no sdot
    assert "asimddp" in enc_mod.machine_refusal()
