"""CPU parts of the cuda backend: its numpy reference forward (vs transformers), the random
bundle helper, and available()/probe() on a machine without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.random_bundle import random_weights, tiny_config, write_bundle  # noqa: E402
from edge.bundle import Bundle  # noqa: E402
from edge.models.spec import spec_from_hf_config  # noqa: E402
from edge.runtime.cuda.reference import reference_logits  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize(
    "arch,kw,recipe",
    [("llama", {"rope_scaling": LLAMA3}, "fp32"), ("qwen2", {}, "fp32"), ("llama", {}, "int4"), ("qwen2", {}, "int8")],
)
def test_reference_matches_transformers(arch, kw, recipe):
    torch = pytest.importorskip("torch")
    from helpers_tiny import bundle_weights, hf_spec, reference_model, tiny_hf_model

    hf = tiny_hf_model(arch, seed=3, **kw)
    weights = bundle_weights(hf, recipe, 32)
    oracle = reference_model(hf, recipe, 32, form="cuda")  # the cuda backend gathers the fp16 table
    ids = np.random.default_rng(0).integers(0, 256, size=40)
    with torch.no_grad():
        want = oracle(torch.from_numpy(ids)[None]).logits[0].float().numpy()
    got = reference_logits(hf_spec(hf), weights, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-4, f"max rel diff {err:.2e}; first values {got[0, :4]} vs {want[0, :4]}"


def test_random_bundle_follows_policy(tmp_path):
    spec = spec_from_hf_config(tiny_config("qwen2", tie=True, hidden=64, inter=96))
    w = random_weights(spec, "int4", 32, seed=1)
    # int4 layers, int8 head (a quantized copy of the tied table), fp16 norms / biases / embedding
    assert w["model.layers.0.mlp.down_proj.qweight"].dtype == np.uint8
    assert w["model.layers.0.mlp.down_proj.qweight"].shape == (64, 48)
    assert w["lm_head.qweight"].dtype == np.int8
    assert w["model.layers.1.self_attn.k_proj.bias"].dtype == np.float16
    out = write_bundle(tmp_path / "b", spec, w, "int4", 32, max_context=64)
    b = Bundle.open(out, kind="generator")
    assert b.spec == spec and (b.manifest.quant.recipe, b.manifest.quant.group_size) == ("int4", 32)
    assert set(b.load_weights()) == set(w)
    logits = reference_logits(spec, b.load_weights(), np.arange(5))
    assert logits.shape == (5, spec.vocab_size) and np.isfinite(logits).all()


def test_available_and_probe_without_gpu(monkeypatch):
    from edge.runtime import cuda

    monkeypatch.setenv("EDGE_RAG_NO_GPU", "1")
    assert cuda.available() is False
    p = cuda.probe(compile=False)
    assert set(p) >= {"binding", "gpu", "compute_capability", "kernels"}


def _fake_cupy(monkeypatch, compiled: list, compiling=lambda: None):
    """A cupy with one H200-like device whose RawModule records that it compiled, after `compiling()` returns."""
    import importlib.machinery
    import types

    cupy = types.ModuleType("cupy")
    cupy.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    cupy.__version__ = "0-fake"

    class Device:
        compute_capability = "90"

        def __init__(self, i=0):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    class RawModule:
        def __init__(self, code, options):
            compiling()
            compiled.append(options)

        def get_function(self, name):
            return types.SimpleNamespace(max_dynamic_shared_size_bytes=0)

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, deviceGetAttribute=lambda a, d: 232448,
                                    getDeviceProperties=lambda i: {"name": b"NVIDIA H200", "totalGlobalMem": 150 << 30})
    cupy.cuda = types.SimpleNamespace(runtime=runtime, Device=Device)
    cupy.RawModule = RawModule
    monkeypatch.setitem(sys.modules, "cupy", cupy)


def test_probe_compiles_nothing_under_edge_rag_no_gpu(monkeypatch, tmp_path):
    """`edge-rag doctor` with EDGE_RAG_NO_GPU on a GPU machine: the device is named, nothing compiled (a cold
    compile took 96 s on an H200 host)."""
    from edge.runtime import cuda
    from edge.runtime.cuda import kernels

    compiled: list = []
    _fake_cupy(monkeypatch, compiled)
    monkeypatch.setattr(kernels, "_CACHE", {})
    monkeypatch.setenv("EDGE_RAG_HOME", str(tmp_path))
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "k"))  # load sets it where unset: restored after the test
    monkeypatch.setenv("EDGE_RAG_NO_GPU", "1")
    p = cuda.probe()
    assert p["gpu"] == "NVIDIA H200" and p["kernels"] == "not compiled" and "EDGE_RAG_NO_GPU" in p["reason"]
    assert compiled == []
    monkeypatch.delenv("EDGE_RAG_NO_GPU")
    p = cuda.probe()
    assert p["kernels"] == "compiled" and len(compiled) == 1


def test_a_long_kernel_compile_says_so_on_stderr(monkeypatch, tmp_path, capsys):
    """A compile that outlasts COMPILE_NOTE_S says so (the fake compile waits for the note, up to 10 s: no race with the
    timer); one that ends first is silent."""
    import threading

    from edge.runtime.cuda import kernels

    noted = threading.Event()
    say = kernels.say
    monkeypatch.setattr(kernels, "say", lambda msg: (say(msg), noted.set()))
    compiled: list = []
    _fake_cupy(monkeypatch, compiled, compiling=lambda: noted.wait(10))
    monkeypatch.setattr(kernels, "_CACHE", {})
    monkeypatch.setenv("EDGE_RAG_HOME", str(tmp_path))
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "k"))
    monkeypatch.setattr(kernels, "COMPILE_NOTE_S", 0.05)
    kernels.load(0)
    err = capsys.readouterr().err
    assert noted.is_set() and "compiling the cuda backend's kernels for NVIDIA H200" in err and str(tmp_path / "k") in err
    noted.clear()
    _fake_cupy(monkeypatch, compiled)  # a cache hit: no wait
    monkeypatch.setattr(kernels, "_CACHE", {})
    monkeypatch.setattr(kernels, "COMPILE_NOTE_S", 5.0)
    kernels.load(0)
    assert "compiling" not in capsys.readouterr().err and not noted.is_set()


def test_gpu_row_orders_pair_rope_halves_and_gate_up():
    """The session's row orders: what the fused epilogues (and rope_cache / silu_mul) rely on."""
    from edge.runtime.cuda.layout import gu_row_order, qkv_row_order

    hq, hkv, d = 4, 2, 16
    order = qkv_row_order(hq, hkv, d)
    assert sorted(order.tolist()) == list(range((hq + 2 * hkv) * d))  # a permutation
    rows = np.arange((hq + 2 * hkv) * d)[order]  # original row stored at each GPU row
    for h in range(hq + hkv):  # q and k heads: GPU rows 2i, 2i+1 = the pair RoPE rotates together
        for i in range(d // 2):
            assert (rows[h * d + 2 * i], rows[h * d + 2 * i + 1]) == (h * d + i, h * d + i + d // 2)
    assert rows[(hq + hkv) * d :].tolist() == list(range((hq + hkv) * d, (hq + 2 * hkv) * d))  # v untouched
    gu = gu_row_order(5)
    assert gu.tolist() == [0, 5, 1, 6, 2, 7, 3, 8, 4, 9]


def test_gemv_picks_file_roundtrip_and_corruption(tmp_path, monkeypatch):
    from edge.runtime.cuda import kernels

    monkeypatch.setenv("EDGE_RAG_HOME", str(tmp_path))
    assert kernels.load_picks() == {}
    kernels.save_picks({"gpu|sm_87|abc|int4[4096x4096]g128": "gemv_int4_bk_r4_t128"})
    assert kernels.load_picks() == {"gpu|sm_87|abc|int4[4096x4096]g128": "gemv_int4_bk_r4_t128"}
    (tmp_path / "kernels" / kernels.PICKS_FILE).write_text("{not json")
    assert kernels.load_picks() == {}  # a damaged file means re-tuning, not a crash
    assert not list((tmp_path / "kernels").glob("*.tmp"))


def test_qk_norm_in_the_paired_row_order_equals_the_reference():
    """qk_rmsnorm runs on the GPU's paired q/k rows with weights permuted by head_pair_order;
    emulated here (norm, then rope_cache's pair rotation, back to HF order) against the
    reference's norm-then-RoPE."""
    from edge.models.reference import rms_norm
    from edge.models.rope import apply_rope
    from edge.runtime.cuda.layout import head_pair_order, qkv_row_order

    rng = np.random.default_rng(0)
    hq, hkv, d, t = 4, 2, 16, 5
    q = rng.standard_normal((t, hq * d)).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(d)).astype(np.float32)
    ang = rng.standard_normal((t, d // 2))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    want = apply_rope(rms_norm(q.reshape(t, hq, d).transpose(1, 0, 2), w, 1e-6), cos, sin)  # [hq, t, d]
    qkv = np.concatenate([q, np.zeros((t, 2 * hkv * d), np.float32)], axis=1)[:, qkv_row_order(hq, hkv, d)]
    x = qkv[:, : hq * d].reshape(t, hq, d)  # paired: 2i = x_i, 2i + 1 = x_{i + d/2}
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w[head_pair_order(d)]
    x1, x2 = x[..., 0::2], x[..., 1::2]  # rope_cache: rotate each pair, write back in HF order
    got = np.concatenate([x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]], axis=-1)
    np.testing.assert_allclose(got.transpose(1, 0, 2), want, rtol=1e-5, atol=1e-5)


def test_cuda_backend_lowers_every_feature_of_the_registered_architectures():
    pytest.importorskip("torch")
    from helpers_tiny import hf_spec, tiny_hf_model

    from edge.models.arch import block_features
    from edge.runtime.cuda.session import CUDA_FEATURES

    for arch in ("qwen3", "gemma3_text", "phi3", "mistral"):
        assert set(block_features(hf_spec(tiny_hf_model(arch)))) <= set(CUDA_FEATURES), arch
