"""bench/random_gguf.py: the llama.cpp peer's random Q4_0 GGUF has the config's shapes and types
(no GPU; llama.cpp itself reads it on the device)."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from bench.random_bundle import tiny_config  # noqa: E402
from bench.random_gguf import write_random_gguf  # noqa: E402


@pytest.mark.parametrize("tie", [True, False])
def test_random_gguf_shapes_types_and_scales(tmp_path, tie):
    cfg = tiny_config("llama", tie=tie, hidden=64, heads=4, kv_heads=2, layers=2, vocab=320, inter=128)
    path = write_random_gguf(cfg, tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(path))
    t = {x.name: x for x in r.tensors}
    Q4, Q8, F32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    assert t["blk.1.ffn_down.weight"].tensor_type == Q4
    assert list(t["blk.0.ffn_gate.weight"].shape) == [64, 128]  # GGUF lists [K, N]
    assert list(t["blk.0.attn_k.weight"].shape) == [64, 2 * 16]
    assert t["blk.0.attn_norm.weight"].tensor_type == F32
    assert t["token_embd.weight"].tensor_type == (Q8 if tie else Q4)
    assert ("output.weight" in t) is (not tie)
    assert len(t) == 1 + 2 * 9 + 1 + (0 if tie else 1)
    # every block's fp16 scale (its first two bytes) is finite and small
    raw = np.asarray(t["blk.0.attn_q.weight"].data).reshape(-1, 18)
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)
    assert np.isfinite(d).all() and 0 < np.abs(d).max() < 0.1
    kv = {f.name: f for f in r.fields.values()}
    assert int(kv["llama.block_count"].parts[-1][0]) == 2
    assert len(kv["tokenizer.ggml.tokens"].data) == 320
