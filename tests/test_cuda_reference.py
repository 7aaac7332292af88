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
