"""Quantization: error bounds, pack/unpack, AWQ folding and its gain over RTN, whole-model
quantization against the float reference, calibration split."""

from __future__ import annotations

import numpy as np
import pytest

from edge.quant.format import pack_int4, quantize_int4_rtn, quantize_int8_rtn, unpack_int4
from edge.quant.policy import Precision
from tiny_checkpoints import make_checkpoint


def _w(n=48, k=256, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def test_pack_unpack_round_trip_and_nibble_order():
    q = np.random.default_rng(0).integers(-8, 8, size=(5, 64)).astype(np.int8)
    p = pack_int4(q)
    assert p.shape == (5, 32) and p.dtype == np.uint8
    assert np.array_equal(unpack_int4(p), q)
    # element 0 in the low nibble, stored with +8 offset
    assert p[0, 0] == ((int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4))


def test_int8_rtn_error_bound():
    w = _w()
    qt = quantize_int8_rtn(w)
    err = np.abs(qt.dequantize() - w)
    s = qt.scales.astype(np.float32)[:, None]
    assert np.all(err <= s / 2 + 1e-6)  # half a step per output channel
    assert np.abs(qt.qweight).max() <= 127


@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_rtn_error_bound(g):
    w = _w()
    qt = quantize_int4_rtn(w, g)
    err = np.abs(qt.dequantize() - w).reshape(w.shape[0], -1, g)
    s = qt.scales.astype(np.float32)[..., None]
    # half a step, plus what fp16 rounding of the scale moves the top of the range (7 steps)
    assert np.all(err <= s / 2 + 7 * s * 2**-11 + 1e-6)
    assert qt.scales.shape == (w.shape[0], w.shape[1] // g)


def test_linear_tensors_round_trip_through_bundle_format():
    from edge.quant.rtn import dequantize_tensors, fake_quant, quantize_linear

    w = _w(32, 128)
    for prec in (Precision("fp32"), Precision("fp16"), Precision("int8"), Precision("int4", 32), Precision("int4", 128)):
        t = quantize_linear("m", w, prec)
        back = dequantize_tensors(t)["m.weight"]
        assert back.shape == w.shape
        assert np.array_equal(back, fake_quant(w, prec)), prec
    assert quantize_linear("m", w, Precision("int4", 64))["m.qweight"].shape == (32, 64)


def _outlier_acts(t=512, k=256, seed=0):
    """Activations with a few salient channels 30x larger than the rest (as in LLMs)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k)).astype(np.float32)
    x[:, rng.choice(k, 6, replace=False)] *= 30.0
    return x


def test_awq_beats_rtn_on_outlier_channels():
    from edge.quant.awq import search_scale
    from edge.quant.rtn import fake_quant

    x, w = _outlier_acts(), _w(96, 256, seed=1)
    prec = Precision("int4", 64)
    y = x @ w.T

    def out_err(wq):
        return np.linalg.norm(x @ wq.T - y) / np.linalg.norm(y)

    s, alpha, l_rtn, l_awq = search_scale(x, [w], [prec])
    rtn = out_err(fake_quant(w, prec))
    awq = out_err(fake_quant(w * s, prec) / s)
    assert alpha > 0 and l_awq < l_rtn
    assert awq < 0.8 * rtn, f"AWQ {awq:.4f} vs RTN {rtn:.4f}"


def test_awq_clip_search_lowers_group_error():
    from edge.quant.awq import search_clip
    from edge.quant.rtn import fake_quant

    x, w = _outlier_acts(seed=2), _w(64, 256, seed=3)
    prec = Precision("int4", 64)
    clip = search_clip(x, w, 64)
    assert clip.shape == (64, 4) and clip.min() >= 0.7 and clip.max() <= 1.0
    y = x @ w.T
    e_clip = np.linalg.norm(x @ fake_quant(w, prec, clip).T - y)
    e_rtn = np.linalg.norm(x @ fake_quant(w, prec).T - y)
    assert e_clip <= e_rtn


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_awq_folding_keeps_the_float_function(tmp_path, arch):
    """Scales folded into norms / v_proj rows (tied across GQA heads) / up_proj rows leave the
    layer's float output unchanged."""
    from edge.models.checkpoint import load_checkpoint
    from edge.models.reference import LayerWeights, Rope, layer_forward
    from edge.quant.awq import awq_layer
    from edge.quant.calib import LayerwiseActivations

    spec, w = load_checkpoint(make_checkpoint(tmp_path / arch, arch))
    ids = [np.random.default_rng(0).integers(0, 256, 64)]
    acts = LayerwiseActivations(spec, w, ids)
    lw = LayerWeights.from_weights(w, 0, spec)
    a = acts.run(0, lw)
    # make some channels salient so that every group picks alpha > 0
    a = {k: v * np.where(np.arange(v.shape[1]) % 7 == 0, 20.0, 1.0).astype(np.float32) for k, v in a.items()}
    arr = {n: getattr(lw, n) for n in ("q", "k", "v", "o", "gate", "up", "down")} | {"ln1": lw.ln1, "ln2": lw.ln2, "v_bias": lw.v_bias}
    precs = {n: Precision("int4", 32) for n in ("q", "k", "v", "o", "gate", "up", "down")}
    scaled, res = awq_layer(arr, a, precs, spec.n_heads, spec.n_kv_heads)
    assert all(v > 0 for v in res.alphas.values()), res.alphas
    lw2 = LayerWeights(ln1=scaled["ln1"], ln2=scaled["ln2"], q=scaled["q"], k=scaled["k"], v=scaled["v"], o=scaled["o"],
                       gate=scaled["gate"], up=scaled["up"], down=scaled["down"], q_bias=lw.q_bias, k_bias=lw.k_bias, v_bias=scaled["v_bias"])
    h = np.random.default_rng(1).standard_normal((64, spec.hidden_size)).astype(np.float32)
    rope = Rope(spec, np.arange(64))
    ref = layer_forward(spec, 0, lw, h, rope)
    out = layer_forward(spec, 0, lw2, h, rope)
    assert np.abs(out - ref).max() < 1e-4 * np.abs(ref).max()


def _nll(spec, weights, seqs):
    from edge.models.reference import token_nll

    return float(np.mean(np.concatenate([token_nll(spec, weights, s) for s in seqs])))


def test_quantize_model_recipes_against_float(tmp_path):
    from edge.models.checkpoint import load_checkpoint
    from edge.models.reference import forward
    from edge.quant.calib import make_calibration_set
    from edge.quant.quantize import quantize_model
    from edge.quant.rtn import dequantize_tensors

    folder = make_checkpoint(tmp_path / "m", "llama", tied=True)
    spec, w = load_checkpoint(folder)
    cal = make_calibration_set(folder / "tokenizer.json", n_seqs=4, seq_len=64)
    ids = np.random.default_rng(5).integers(0, 256, 48)
    ref = forward(spec, w, ids)

    def rel(recipe, **kw):
        r = quantize_model(spec, w, recipe, 32, calib=cal, **kw)
        return r, np.linalg.norm(forward(spec, dequantize_tensors(r.tensors), ids) - ref) / np.linalg.norm(ref)

    r32, e32 = rel("fp32")
    assert e32 == 0 and all(v.dtype == np.float32 for v in r32.tensors.values())
    assert "lm_head.weight" not in r32.tensors  # tied, unquantized: not duplicated
    r16, e16 = rel("fp16")
    assert e16 < 2e-3
    r8, e8 = rel("int8")
    assert e8 < 0.03 and r8.tensors["lm_head.qweight"].dtype == np.int8  # tied head: int8 copy
    rr, e_rtn = rel("int4")
    ra, e_awq = rel("int4", awq=True)
    assert rr.tensors["model.layers.0.mlp.down_proj.qweight"].dtype == np.uint8
    n_linears = spec.n_layers * 7 + 1
    assert len(ra.report.layers) == n_linears and all(e.output_err is not None for e in ra.report.layers)
    assert ra.report.summary()["output_err_mean"] < rr.report.summary()["output_err_mean"]
    assert e8 < e_rtn and e_awq < 0.5


def test_int4_falls_back_to_int8_where_group_does_not_tile(tmp_path):
    from edge.models.checkpoint import load_checkpoint
    from edge.quant.quantize import quantize_model

    spec, w = load_checkpoint(make_checkpoint(tmp_path / "m", "llama", intermediate_size=96, tokenizer=False))
    t = quantize_model(spec, w, "int4", 64).tensors
    assert t["model.layers.0.mlp.down_proj.qweight"].dtype == np.int8  # K = 96, not a multiple of 64
    assert t["model.layers.0.mlp.up_proj.qweight"].dtype == np.uint8  # K = 64


def test_calibration_and_heldout_split_are_disjoint():
    from edge.quant.calib import calibration_keys, calibration_text, heldout_keys, heldout_text

    c, h = calibration_keys(), heldout_keys()
    assert c and h and not set(c) & set(h)
    assert max(c) < min(h)  # sorted split: calibration first
    held = heldout_text()
    assert len(held) > 20_000 and held[:2000] not in calibration_text()


def test_calib_file_too_small_is_usage_error(tmp_path):
    from edge.errors import UsageError
    from edge.quant.calib import read_calib_file

    f = tmp_path / "c.txt"
    f.write_text("tiny")
    with pytest.raises(UsageError, match="too little text"):
        read_calib_file(f)
