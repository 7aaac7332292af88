"""The cuda backend allocates what the memory plan budgeted (no GPU needed: the pool arithmetic is
plain Python; the GPU test checks caps.kv_bytes against the allocated array)."""

from __future__ import annotations

from edge.models.spec import spec_from_hf_config
from edge.plan import kv_bytes_per_token
from edge.runtime.cuda.backend import kv_bytes_per_block, pool_blocks

CFG = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
       "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
       "max_position_embeddings": 131072}


def _lim(kv_blocks, dtype="fp16", bs=16):
    return {"max_context": 4096, "max_batch": 4, "kv_blocks": kv_blocks, "kv_block_size": bs, "kv_dtype": dtype}


def test_fp16_pool_is_the_planned_bytes():
    spec = spec_from_hf_config(CFG)
    assert kv_bytes_per_block(spec, 16) == 16 * kv_bytes_per_token(spec, "fp16")
    lim = _lim(700)
    nb = pool_blocks(spec, lim, 4, 4096, 16)
    assert nb == 700 and nb * kv_bytes_per_block(spec, 16) == 700 * 16 * kv_bytes_per_token(spec, "fp16")
    # another block size runs the same planned tokens
    assert pool_blocks(spec, lim, 4, 4096, 32) == 350


def test_int8_plan_gets_an_fp16_pool_of_the_same_bytes():
    spec = spec_from_hf_config(CFG)
    planned = 1000 * 16 * kv_bytes_per_token(spec, "int8")
    nb = pool_blocks(spec, _lim(1000, "int8"), 4, 4096, 16)
    got = nb * kv_bytes_per_block(spec, 16, "fp16")
    assert planned - kv_bytes_per_block(spec, 16, "fp16") < got <= planned
    # never less than one sequence at max_context
    assert pool_blocks(spec, _lim(256, "int8"), 4, 4096, 16) == 256


def test_no_plan_means_every_sequence_at_max_context():
    spec = spec_from_hf_config(CFG)
    assert pool_blocks(spec, _lim(0), 3, 1000, 16) == 3 * 63


def test_plan_limits_read_from_a_bundle(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.random_bundle import random_weights, tiny_config, write_bundle
    from edge.bundle import Bundle
    from edge.runtime.cuda.backend import plan_limits

    spec = spec_from_hf_config(tiny_config("llama"))
    path = write_bundle(tmp_path / "b", spec, random_weights(spec, "int4", 32), "int4", 32, max_context=100, max_batch=3)
    lim = plan_limits(Bundle.open(path, verify=False))
    assert (lim["max_context"], lim["max_batch"], lim["kv_block_size"], lim["kv_dtype"]) == (100, 3, 16, "fp16")
    assert lim["kv_blocks"] == 3 * 7  # the manifest's pool: every sequence at max_context
    assert pool_blocks(spec, lim, 3, 100, 16) == 21


def test_compute_precision_follows_the_bundle_or_the_ask():
    """An fp32 bundle computes in fp32 (edge.runtime.cuda.fp32), every other recipe in fp16,
    unless asked; anything else is a one-line error naming the choices."""
    import pytest

    from edge.errors import BackendError
    from edge.runtime.cuda.fp32 import resolve_precision

    assert [resolve_precision(r) for r in ("fp32", "fp16", "int8", "int4")] == ["fp32", "fp16", "fp16", "fp16"]
    assert resolve_precision("fp32", "fp16") == "fp16" and resolve_precision("int4", "fp32") == "fp32"
    with pytest.raises(BackendError, match="bf16.*auto, fp16, fp32"):
        resolve_precision("fp32", "bf16")


def test_open_session_picks_the_fp32_mode_for_an_fp32_bundle(tmp_path, monkeypatch):
    """edge.runtime.cuda.open_session (what CudaBackend.open and the generator call) opens an fp32
    bundle in the fp32 mode and an int4 one in the fp16 engine, unless asked (constructors
    stubbed: no GPU needed to check the choice)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from helpers_tiny import make_tiny_bundle, tiny_hf_model

    from edge.runtime.cuda import open_session
    from edge.runtime.cuda.fp32 import Fp32DecoderSession
    from edge.runtime.cuda.session import CudaDecoderSession

    seen = []
    for cls in (CudaDecoderSession, Fp32DecoderSession):
        monkeypatch.setattr(cls, "__init__", lambda self, b, **kw: seen.append((type(self).__name__, b.manifest.quant.recipe, kw)))
    hf = tiny_hf_model("llama")
    fp32, int4 = (make_tiny_bundle(tmp_path / r, hf, r, forms=()) for r in ("fp32", "int4"))
    assert isinstance(open_session(fp32, max_batch=2), Fp32DecoderSession)
    assert type(open_session(int4)) is CudaDecoderSession
    assert type(open_session(fp32, precision="fp16")) is CudaDecoderSession
    assert isinstance(open_session(int4, precision="fp32"), Fp32DecoderSession)
    assert seen[0] == ("Fp32DecoderSession", "fp32", {"max_batch": 2})
    assert [s[:2] for s in seen[1:]] == [("CudaDecoderSession", "int4"), ("CudaDecoderSession", "fp32"), ("Fp32DecoderSession", "int4")]
