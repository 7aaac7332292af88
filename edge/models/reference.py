"""A plain numpy float32 forward pass of the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2).

The slow reference every fast path is checked against, and the forward pass calibration runs
(AWQ needs each linear layer's input activations). Full-sequence (no KV cache), causal,
HF conventions: RMSNorm, RoPE rotating halves (rotate_half) with default / linear / llama3
frequency scaling, grouped-query attention, SwiGLU MLP. Weights: HF names, float32, W [N, K].

Shapes: T tokens, H hidden, nh heads, nkv kv heads, d head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edge.errors import ModelError
from edge.models.spec import ModelSpec

# capture(layer, point, x): point is one of the names below; x is float32 [T, K] (a view: copy to keep).
#   "attn_in"  input of q/k/v_proj (after input_layernorm)      [T, H]
#   "o_in"     input of o_proj (attention output, heads merged)   [T, nh * d]
#   "mlp_in"   input of gate/up_proj (after post_attention_layernorm) [T, H]
#   "down_in"  input of down_proj (silu(gate) * up)              [T, I]
Capture = Callable[[int, str, np.ndarray], None]


def rope_inv_freq(spec: ModelSpec) -> np.ndarray:
    """float64 [d/2] inverse frequencies after the config's RoPE scaling."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = spec.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default")) if sc else "default"
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "llama3":
        factor = float(sc["factor"])
        lo, hi = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, smoothed, out)
    raise ModelError(f"RoPE scaling type {kind!r} is not supported", fix="supported: default, linear, llama3")


def rope_tables(spec: ModelSpec, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [T, d] for the given positions (HF layout: the d/2 angles repeated twice)."""
    ang = positions.astype(np.float64)[:, None] * rope_inv_freq(spec)[None, :]  # [T, d/2]
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [heads, T, d] -> rotated, x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None] + rot * sin[None]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), with sigmoid(x) = (1 + tanh(x / 2)) / 2 (no exp overflow)."""
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))


@dataclass
class LayerWeights:
    """One decoder layer's float32 tensors (bias None when absent)."""

    ln1: np.ndarray
    ln2: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None

    @classmethod
    def from_weights(cls, w: dict[str, np.ndarray], i: int) -> "LayerWeights":
        p = f"model.layers.{i}."
        return cls(
            ln1=w[p + "input_layernorm.weight"],
            ln2=w[p + "post_attention_layernorm.weight"],
            q=w[p + "self_attn.q_proj.weight"],
            k=w[p + "self_attn.k_proj.weight"],
            v=w[p + "self_attn.v_proj.weight"],
            o=w[p + "self_attn.o_proj.weight"],
            gate=w[p + "mlp.gate_proj.weight"],
            up=w[p + "mlp.up_proj.weight"],
            down=w[p + "mlp.down_proj.weight"],
            q_bias=w.get(p + "self_attn.q_proj.bias"),
            k_bias=w.get(p + "self_attn.k_proj.bias"),
            v_bias=w.get(p + "self_attn.v_proj.bias"),
        )


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x @ w.T
    return y + b if b is not None else y


def attention(spec: ModelSpec, lw: LayerWeights, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Causal GQA self-attention before o_proj. x [T, H] (normed) -> [T, nh * d]."""
    t = x.shape[0]
    nh, nkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
    q = _linear(x, lw.q, lw.q_bias).reshape(t, nh, d).transpose(1, 0, 2)  # [nh, T, d]
    k = _linear(x, lw.k, lw.k_bias).reshape(t, nkv, d).transpose(1, 0, 2)  # [nkv, T, d]
    v = _linear(x, lw.v, lw.v_bias).reshape(t, nkv, d).transpose(1, 0, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = nh // nkv
    k = np.repeat(k, rep, axis=0)  # [nh, T, d]: query head h reads kv head h // rep
    v = np.repeat(v, rep, axis=0)
    scores = (q @ k.transpose(0, 2, 1)) / np.float32(math.sqrt(d))  # [nh, T, T]
    scores = scores + np.triu(np.full((t, t), -np.inf, dtype=np.float32), 1)[None]
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v).transpose(1, 0, 2).reshape(t, nh * d)


def layer_forward(
    spec: ModelSpec, i: int, lw: LayerWeights, h: np.ndarray, cos: np.ndarray, sin: np.ndarray, capture: Capture | None = None
) -> np.ndarray:
    """One decoder layer: h [T, H] -> [T, H]."""
    x = rms_norm(h, lw.ln1, spec.rms_eps)
    if capture:
        capture(i, "attn_in", x)
    a = attention(spec, lw, x, cos, sin)
    if capture:
        capture(i, "o_in", a)
    h = h + _linear(a, lw.o)
    x = rms_norm(h, lw.ln2, spec.rms_eps)
    if capture:
        capture(i, "mlp_in", x)
    m = silu(_linear(x, lw.gate)) * _linear(x, lw.up)
    if capture:
        capture(i, "down_in", m)
    return h + _linear(m, lw.down)


def embed(weights: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    return weights["model.embed_tokens.weight"][np.asarray(ids, dtype=np.int64)].astype(np.float32)


def lm_head_weight(spec: ModelSpec, weights: dict[str, np.ndarray]) -> np.ndarray:
    return weights["model.embed_tokens.weight"] if spec.tie_embeddings or "lm_head.weight" not in weights else weights["lm_head.weight"]


def forward(
    spec: ModelSpec,
    weights: dict[str, np.ndarray],
    ids: np.ndarray,
    *,
    capture: Capture | None = None,
    logits: bool = True,
) -> np.ndarray:
    """Logits float32 [T, vocab] for one sequence ids [T] starting at position 0 (or the final
    hidden state [T, H] after model.norm when logits=False)."""
    ids = np.asarray(ids, dtype=np.int64)
    cos, sin = rope_tables(spec, np.arange(len(ids)))
    h = embed(weights, ids)
    for i in range(spec.n_layers):
        h = layer_forward(spec, i, LayerWeights.from_weights(weights, i), h, cos, sin, capture)
    h = rms_norm(h, weights["model.norm.weight"], spec.rms_eps)
    return h @ lm_head_weight(spec, weights).T if logits else h


def token_nll(spec: ModelSpec, weights: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ids[1:] given their prefixes, float64 [T - 1]."""
    lg = forward(spec, weights, ids[:-1]).astype(np.float64)  # [T-1, V]
    m = lg.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(axis=-1, keepdims=True)))[:, 0]
    return lse - lg[np.arange(len(ids) - 1), ids[1:]]
