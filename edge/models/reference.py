"""The plain numpy float32 forward pass: the one reference every lowering is checked against.

Every architecture of edge.models.arch through its features (qk-norm, sandwich norms, GeLU,
embedding scale, soft-capping, sliding layers, local RoPE base). Full-sequence (no KV cache),
causal, HF conventions: RMSNorm, RoPE rotating halves (edge.models.rope), grouped-query attention,
gated MLP. Weights: HF names, float32 checkpoints or bundle form (quantized linears are read and
dequantized through edge.quant.format.read_linear). Also the forward pass calibration runs (AWQ
needs each linear layer's input activations); the CUDA backend's reference is this one.

Shapes: T tokens, H hidden, nh heads, nkv kv heads, d head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edge.models.arch import layer_norm_names
from edge.models.checkpoint import read_rows
from edge.models.rope import apply_rope, rope_tables
from edge.models.spec import ModelSpec
from edge.quant.format import has_linear, read_linear

# capture(layer, point, x): point is one of the names below; x is float32 [T, K] (a view: copy to keep).
#   "attn_in"  input of q/k/v_proj (after the pre-attention norm)    [T, H]
#   "o_in"     input of o_proj (attention output, heads merged)       [T, nh * d]
#   "mlp_in"   input of gate/up_proj (after the pre-MLP norm)         [T, H]
#   "down_in"  input of down_proj (act(gate) * up)                    [T, I]
Capture = Callable[[int, str, np.ndarray], None]


class Rope:
    """cos/sin [T, d/2] for one sequence's positions, per layer kind (global / sliding)."""

    def __init__(self, spec: ModelSpec, positions: np.ndarray):
        self.full = rope_tables(spec, positions)
        self.local = rope_tables(spec, positions, local=True) if spec.features.rope_local_theta is not None else self.full

    def layer(self, spec: ModelSpec, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.local if spec.features.sliding(i) else self.full


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), with sigmoid(x) = (1 + tanh(x / 2)) / 2 (no exp overflow)."""
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x * x * x)))


ACTIVATION = {"silu": silu, "gelu_tanh": gelu_tanh}


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    return x if cap is None else np.tanh(x / np.float32(cap)) * np.float32(cap)


def _f32(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float32)


@dataclass
class LayerWeights:
    """One decoder layer's float32 tensors. ln1: the pre-attention norm, ln2: the pre-MLP norm
    (AWQ folds scales into both); norms: the other norms by HF suffix (sandwich, q/k norms)."""

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
    norms: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_weights(cls, w: dict[str, np.ndarray], i: int, spec: ModelSpec) -> "LayerWeights":
        p = f"model.layers.{i}."
        names = layer_norm_names(spec.features)
        lin = {n: read_linear(w, p + suffix).dequantize() for n, suffix in
               (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"), ("o", "self_attn.o_proj"),
                ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))}
        norms = {suffix: _f32(w[p + suffix + ".weight"]) for role, suffix in names.items() if role not in ("attn_in", "mlp_in")}
        if spec.features.qk_norm:
            norms |= {s: _f32(w[p + s + ".weight"]) for s in ("self_attn.q_norm", "self_attn.k_norm")}
        return cls(ln1=_f32(w[p + names["attn_in"] + ".weight"]), ln2=_f32(w[p + names["mlp_in"] + ".weight"]), **lin,
                   q_bias=_f32(w.get(p + "self_attn.q_proj.bias")), k_bias=_f32(w.get(p + "self_attn.k_proj.bias")),
                   v_bias=_f32(w.get(p + "self_attn.v_proj.bias")), norms=norms)

    def tensors(self, spec: ModelSpec, i: int) -> dict[str, np.ndarray]:
        """The non-linear tensors back under their HF names (norms and biases)."""
        p = f"model.layers.{i}."
        names = layer_norm_names(spec.features)
        out = {p + names["attn_in"] + ".weight": self.ln1, p + names["mlp_in"] + ".weight": self.ln2}
        out |= {p + s + ".weight": t for s, t in self.norms.items()}
        for b in "qkv":
            if getattr(self, f"{b}_bias") is not None:
                out[p + f"self_attn.{b}_proj.bias"] = getattr(self, f"{b}_bias")
        return out


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x @ w.T
    return y + b if b is not None else y


def attention_mask(spec: ModelSpec, i: int, t: int) -> np.ndarray:
    """Additive mask [T, T]: causal, and on a sliding layer only the last sliding_window keys
    (key j is seen from query q when q - sliding_window < j <= q, as transformers does)."""
    q, k = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = k <= q
    if spec.features.sliding(i):
        allowed &= k > q - spec.sliding_window
    return np.where(allowed, np.float32(0.0), np.float32(-np.inf))


def attention(spec: ModelSpec, i: int, lw: LayerWeights, x: np.ndarray, rope: Rope) -> np.ndarray:
    """Causal GQA self-attention before o_proj. x [T, H] (normed) -> [T, nh * d]."""
    t = x.shape[0]
    f = spec.features
    nh, nkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
    q = _linear(x, lw.q, lw.q_bias).reshape(t, nh, d).transpose(1, 0, 2)  # [nh, T, d]
    k = _linear(x, lw.k, lw.k_bias).reshape(t, nkv, d).transpose(1, 0, 2)  # [nkv, T, d]
    v = _linear(x, lw.v, lw.v_bias).reshape(t, nkv, d).transpose(1, 0, 2)
    if f.qk_norm:
        q = rms_norm(q, lw.norms["self_attn.q_norm"], spec.rms_eps)
        k = rms_norm(k, lw.norms["self_attn.k_norm"], spec.rms_eps)
    cos, sin = rope.layer(spec, i)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = nh // nkv
    k = np.repeat(k, rep, axis=0)  # [nh, T, d]: query head h reads kv head h // rep
    v = np.repeat(v, rep, axis=0)
    scale = f.attn_scale if f.attn_scale is not None else 1.0 / math.sqrt(d)
    scores = softcap((q @ k.transpose(0, 2, 1)) * np.float32(scale), f.attn_softcap)  # [nh, T, T]
    scores = scores + attention_mask(spec, i, t)[None]
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v).transpose(1, 0, 2).reshape(t, nh * d)


def layer_forward(spec: ModelSpec, i: int, lw: LayerWeights, h: np.ndarray, rope: Rope, capture: Capture | None = None) -> np.ndarray:
    """One decoder layer: h [T, H] -> [T, H]."""
    names = layer_norm_names(spec.features)
    x = rms_norm(h, lw.ln1, spec.rms_eps)
    if capture:
        capture(i, "attn_in", x)
    a = attention(spec, i, lw, x, rope)
    if capture:
        capture(i, "o_in", a)
    a = _linear(a, lw.o)
    if "attn_out" in names:
        a = rms_norm(a, lw.norms[names["attn_out"]], spec.rms_eps)
    h = h + a
    x = rms_norm(h, lw.ln2, spec.rms_eps)
    if capture:
        capture(i, "mlp_in", x)
    m = ACTIVATION[spec.features.activation](_linear(x, lw.gate)) * _linear(x, lw.up)
    if capture:
        capture(i, "down_in", m)
    m = _linear(m, lw.down)
    if "mlp_out" in names:
        m = rms_norm(m, lw.norms[names["mlp_out"]], spec.rms_eps)
    return h + m


def embed(spec: ModelSpec, weights: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """[T, H] rows of the embedding table, times the architecture's embedding scale."""
    # only these rows: a lazily read checkpoint (GGUF) would otherwise dequantize the whole table per call
    x = read_rows(weights, "model.embed_tokens.weight", np.asarray(ids, dtype=np.int64))
    return x * np.float32(spec.features.embed_scale) if spec.features.embed_scale != 1.0 else x


def lm_head_weight(spec: ModelSpec, weights: dict[str, np.ndarray]) -> np.ndarray:
    """float32 [V, H]: the head (dequantized if stored quantized) or the tied embedding table."""
    if has_linear(weights, "lm_head"):
        return read_linear(weights, "lm_head").dequantize()
    return _f32(weights["model.embed_tokens.weight"])


def final_logits(spec: ModelSpec, weights: dict[str, np.ndarray], h: np.ndarray) -> np.ndarray:
    """Final norm, head and final soft-cap: h [T, H] -> logits [T, V]."""
    h = rms_norm(h, _f32(weights["model.norm.weight"]), spec.rms_eps)
    return softcap(h @ lm_head_weight(spec, weights).T, spec.features.final_softcap)


def forward(spec: ModelSpec, weights: dict[str, np.ndarray], ids: np.ndarray, *, capture: Capture | None = None,
            logits: bool = True) -> np.ndarray:
    """Logits float32 [T, vocab] for one sequence ids [T] starting at position 0 (or the final
    hidden state [T, H] after model.norm when logits=False)."""
    ids = np.asarray(ids, dtype=np.int64)
    rope = Rope(spec, np.arange(len(ids)))
    h = embed(spec, weights, ids)
    for i in range(spec.n_layers):
        h = layer_forward(spec, i, LayerWeights.from_weights(weights, i, spec), h, rope, capture)
    if not logits:
        return rms_norm(h, _f32(weights["model.norm.weight"]), spec.rms_eps)
    return final_logits(spec, weights, h)


def token_nll(spec: ModelSpec, weights: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ids[1:] given their prefixes, float64 [T - 1]."""
    lg = forward(spec, weights, ids[:-1]).astype(np.float64)  # [T-1, V]
    m = lg.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(axis=-1, keepdims=True)))[:, 0]
    return lse - lg[np.arange(len(ids) - 1), ids[1:]]
