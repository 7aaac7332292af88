"""GPTQ rounding (edge.quant.gptq): lower layer-output error than RTN on correlated inputs, the
edge.quant.format int4 layout unchanged, and an AWQ+GPTQ tiny-model build that verifies."""

from __future__ import annotations

import numpy as np
import pytest

from edge.quant.format import pack_int4, unpack_int4
from edge.quant.gptq import GptqConfig, gptq_quantize, hessian
from edge.quant.policy import Precision
from edge.quant.rtn import dequantize_tensors, fake_quant


def _correlated_inputs(rng: np.random.Generator, t: int, k: int, rank: int = 16) -> np.ndarray:
    """x [T, K] with strongly correlated channels (low-rank + noise) and a few large channels."""
    z = rng.standard_normal((t, rank)).astype(np.float32)
    mix = rng.standard_normal((rank, k)).astype(np.float32)
    x = z @ mix + 0.1 * rng.standard_normal((t, k)).astype(np.float32)
    x[:, rng.choice(k, 4, replace=False)] *= 8.0  # outlier channels, as in LLM activations
    return x


def _out_err(x: np.ndarray, w: np.ndarray, wq: np.ndarray) -> float:
    return float(np.linalg.norm(x @ wq.T - x @ w.T) / np.linalg.norm(x @ w.T))


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_output_error_vs_rtn_on_held_out_inputs(group_size, act_order):
    rng = np.random.default_rng(0)
    n, k = 96, 256
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    x_all = _correlated_inputs(rng, 1536, k)  # one channel correlation; held-out rows for the check
    x_cal, x_test = x_all[:1024], x_all[1024:]
    wq_gptq = gptq_quantize(w, hessian(x_cal), group_size, config=GptqConfig(act_order=act_order)).dequantize()
    wq_rtn = fake_quant(w, Precision("int4", group_size))
    e_rtn, e_gptq = _out_err(x_test, w, wq_rtn), _out_err(x_test, w, wq_gptq)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    # and on the calibration inputs themselves (what GPTQ minimizes)
    assert _out_err(x_cal, w, wq_gptq) < _out_err(x_cal, w, wq_rtn)


def test_gptq_with_identity_hessian_is_rtn():
    """With H = I no error propagates (U is diagonal): GPTQ must reproduce RTN exactly."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    got = gptq_quantize(w, np.eye(128), 64, config=GptqConfig(perc_damp=0.0)).dequantize()
    np.testing.assert_array_equal(got, fake_quant(w, Precision("int4", 64)))


def test_gptq_round_trip_through_the_format():
    rng = np.random.default_rng(4)
    n, k, g = 24, 128, 32
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = _correlated_inputs(rng, 256, k)
    clip = np.full((n, k // g), 0.9, np.float32)
    qt = gptq_quantize(w, hessian(x), g, clip=clip)
    assert qt.qweight.dtype == np.uint8 and qt.qweight.shape == (n, k // 2)
    assert qt.scales.dtype == np.float16 and qt.scales.shape == (n, k // g)
    q = unpack_int4(qt.qweight)
    assert q.min() >= -8 and q.max() <= 7
    np.testing.assert_array_equal(pack_int4(q), qt.qweight)
    deq = qt.dequantize()
    # the bundle reader (layout from dtypes/shapes only) gives the same weight
    back = dequantize_tensors({"L.qweight": qt.qweight, "L.scales": qt.scales})["L.weight"]
    np.testing.assert_array_equal(back, deq)
    np.testing.assert_allclose(deq, q.astype(np.float32).reshape(n, k // g, g).reshape(n, k)
                               * np.repeat(qt.scales.astype(np.float32), g, axis=1), rtol=0, atol=0)
    assert np.linalg.norm(deq - w) / np.linalg.norm(w) < 0.5  # still near the weight it quantizes


def test_quantize_model_gptq_changes_rounding_not_layout(tmp_path):
    from tiny_checkpoints import make_checkpoint

    from edge.models.checkpoint import load_checkpoint
    from edge.quant.calib import CalibrationSet
    from edge.quant.quantize import quantize_model

    spec, weights = load_checkpoint(make_checkpoint(tmp_path / "ck", "llama", tied=True))
    rng = np.random.default_rng(0)
    cal = CalibrationSet([rng.integers(0, spec.vocab_size, 64) for _ in range(4)], "random")
    awq = quantize_model(spec, weights, "int4", 32, calib=cal, awq=True)
    both = quantize_model(spec, weights, "int4", 32, calib=cal, awq=True, gptq=True)
    assert {k: (v.dtype, v.shape) for k, v in awq.tensors.items()} == {k: (v.dtype, v.shape) for k, v in both.tensors.items()}
    name = "model.layers.0.mlp.down_proj.qweight"
    assert not np.array_equal(awq.tensors[name], both.tensors[name])
    # GPTQ lowers the mean calibration output error of the int4 layers
    def mean_err(r):
        return np.mean([e.output_err for e in r.report.layers if e.kind == "int4"])
    assert mean_err(both) < mean_err(awq)


@pytest.mark.slow
def test_build_awq_gptq_bundle_verifies(tmp_path):
    from tiny_checkpoints import make_checkpoint

    from edge.bundle import Bundle
    from edge.build.generator import build_generator_bundle

    ck = make_checkpoint(tmp_path / "ck", "llama", tied=True)
    out = build_generator_bundle(ck, tmp_path / "gen", profile="orin-nano-8gb", quant="int4", group_size=32, progress=False)
    b = Bundle.open(out, kind="generator")  # verifies checksums and schema
    q = b.manifest.quant
    assert (q.method, q.awq, q.gptq) == ("awq+gptq", True, True)
    plain = build_generator_bundle(ck, tmp_path / "awq", profile="orin-nano-8gb", quant="int4", group_size=32, gptq=False, progress=False)
    assert Bundle.open(plain).manifest.quant.method == "awq"
    w = b.load_weights()
    assert w["model.layers.1.self_attn.o_proj.qweight"].dtype == np.uint8
    assert w["model.layers.1.self_attn.o_proj.scales"].shape[1] == w["model.layers.1.self_attn.o_proj.qweight"].shape[1] * 2 // 32
