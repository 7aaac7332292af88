"""RoPE, once: inverse frequencies after the config's scaling, and the cos/sin tables every
lowering uses (the numpy reference, both ONNX forms, the CUDA backend's uploads).

HF convention (rotate_half): dimension i rotates with i + d/2. Scaling types: default, linear,
llama3, longrope (Phi-3.5; short factors, so a context beyond original_max_position_embeddings
is refused: transformers switches every position to the long factors there, which a KV cache
computed with the short ones cannot follow). Sliding layers of models with rope_local_theta
(Gemma 3) use that base, unscaled.
"""

from __future__ import annotations

import math

import numpy as np

from edge.errors import ModelError

SCALINGS = ("default", "linear", "llama3", "longrope")


def rope_kind(spec) -> str:
    sc = spec.rope_scaling or {}
    return sc.get("rope_type", sc.get("type", "default")) or "default" if sc else "default"


def inv_freq(spec, local: bool = False) -> tuple[np.ndarray, float]:
    """(inverse frequencies float64 [d/2], attention factor that scales cos and sin)."""
    d = spec.head_dim
    expo = np.arange(0, d, 2, dtype=np.float64) / d
    if local and spec.features.rope_local_theta is not None:
        return 1.0 / (spec.features.rope_local_theta ** expo), 1.0
    inv = 1.0 / (spec.rope_theta ** expo)
    sc = spec.rope_scaling or {}
    kind = rope_kind(spec)
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(sc["factor"]), 1.0
    if kind == "llama3":
        factor = float(sc["factor"])
        lo, hi = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old = float(sc.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, smoothed, out), 1.0
    if kind == "longrope":
        old = int(sc["original_max_position_embeddings"])
        factor = sc.get("factor") or spec.max_position / old
        attn = sc.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
        ext = np.asarray(sc["short_factor"], dtype=np.float64)
        return 1.0 / (ext * spec.rope_theta ** expo), float(attn)
    raise ModelError(f"RoPE scaling type {kind!r} is not supported", fix=f"supported: {', '.join(SCALINGS)}")


def max_rope_positions(spec) -> int | None:
    """Positions the tables may cover (None: no bound beyond max_position)."""
    if rope_kind(spec) == "longrope":
        return int(spec.rope_scaling["original_max_position_embeddings"])
    return None


def check_context(spec, n_pos: int) -> None:
    bound = max_rope_positions(spec)
    if bound is not None and n_pos > bound:
        raise ModelError(f"a {n_pos}-token context is beyond this model's LongRoPE short range ({bound} tokens)",
                         fix=f"build with --context {bound} or less")


def rope_tables(spec, positions: int | np.ndarray, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [T, d/2] for `positions` (an int n: positions 0..n-1), attention factor applied."""
    pos = np.arange(positions) if np.isscalar(positions) else np.asarray(positions)
    check_context(spec, int(pos.max()) + 1 if pos.size else 0)
    inv, attn = inv_freq(spec, local)
    ang = pos.astype(np.float64)[:, None] * inv[None, :]
    return (np.cos(ang) * attn).astype(np.float32), (np.sin(ang) * attn).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [..., T, d] rotated by cos/sin [T, d/2] (pairs (i, i + d/2))."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
