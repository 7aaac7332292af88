"""The slow, plain reference for the cuda backend: a float32 numpy forward of a bundle's weights.

Every CUDA kernel and the whole decoder step are checked against this (and this against
transformers in tests/test_cuda_reference.py). It also owns the RoPE frequency table, which the
GPU path uploads as cos/sin tables, so both paths share one definition of rope scaling.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edge.models.spec import ModelSpec
from edge.models.reference import rope_inv_freq  # one definition of rope scaling
from edge.quant.format import dequantize_int4, dequantize_int8


def rope_tables(spec: ModelSpec, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [n_pos, D/2] for positions 0..n_pos-1."""
    ang = np.outer(np.arange(n_pos, dtype=np.float64), rope_inv_freq(spec))
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def linear_weight(weights: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    """Dequantized float32 [N, K] of linear `name` in the edge.quant.format layout (None if absent)."""
    if f"{name}.qweight" in weights:
        q, s = weights[f"{name}.qweight"], weights[f"{name}.scales"]
        if q.dtype == np.uint8:
            return dequantize_int4(q, s, (2 * q.shape[1]) // s.shape[1])
        return dequantize_int8(q, s)
    if f"{name}.weight" in weights:
        return weights[f"{name}.weight"].astype(np.float32)
    return None


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w.astype(np.float32)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, H, D]; cos/sin [T, D/2] (HF rotate_half pairs (i, i + D/2))."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def reference_logits(spec: ModelSpec, weights: dict[str, Any], ids: np.ndarray) -> np.ndarray:
    """float32 logits [T, vocab] for token ids [T] from position 0 (full causal attention)."""
    ids = np.asarray(ids, dtype=np.int64)
    T, D, Hq, Hkv = len(ids), spec.head_dim, spec.n_heads, spec.n_kv_heads
    cos, sin = rope_tables(spec, T)
    emb = weights["model.embed_tokens.weight"]
    x = emb[ids].astype(np.float32)  # [T, H]
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        h = _rms(x, weights[p + "input_layernorm.weight"], spec.rms_eps)
        proj = {}
        for n in ("q", "k", "v"):
            y = h @ linear_weight(weights, p + f"self_attn.{n}_proj").T
            b = weights.get(p + f"self_attn.{n}_proj.bias")
            proj[n] = y + b.astype(np.float32) if b is not None else y
        q = _rope(proj["q"].reshape(T, Hq, D), cos, sin)
        k = _rope(proj["k"].reshape(T, Hkv, D), cos, sin)
        v = proj["v"].reshape(T, Hkv, D)
        rep = Hq // Hkv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # [T, Hq, D]
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(D) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", s, v).reshape(T, Hq * D)
        x = x + a @ linear_weight(weights, p + "self_attn.o_proj").T
        h = _rms(x, weights[p + "post_attention_layernorm.weight"], spec.rms_eps)
        g = h @ linear_weight(weights, p + "mlp.gate_proj").T
        u = h @ linear_weight(weights, p + "mlp.up_proj").T
        x = x + (g / (1 + np.exp(-g)) * u) @ linear_weight(weights, p + "mlp.down_proj").T
    x = _rms(x, weights["model.norm.weight"], spec.rms_eps)
    head = linear_weight(weights, "lm_head")
    if head is None:
        head = emb.astype(np.float32)
    return x @ head.T
