"""AWQ: activation-aware weight quantization (Lin et al., 2023), in numpy.

Salient input channels (large mean |x| in calibration activations) lose the most when their
weights round to 4 bits. AWQ multiplies weight column k by s_k before quantizing and divides
the input by s_k, folding 1/s into the op that produces the input, so the float function is
unchanged and only the rounding error moves:

    y = x W^T = (x / s) (W * s)^T           s = mean|x|^alpha / sqrt(max * min), alpha in [0, 1]

alpha is searched on a grid (alpha = 0 is plain RTN, so the chosen scales are never worse
than RTN on the calibration loss). Per decoder layer, four groups, as in the paper:

    input_layernorm          -> q_proj, k_proj, v_proj    (ln1 weight /= s)
    v_proj (rows)            -> o_proj                    (v rows /= s; needs s equal across the
                                                           query heads sharing a KV head: with GQA
                                                           the scale is tied per KV channel)
    post_attention_layernorm -> gate_proj, up_proj        (ln2 weight /= s)
    up_proj (rows)           -> down_proj                 (silu(gate) * up is linear in up)

Optionally (AWQ's auto-clip) each int4 group's clipping range is searched too: scale =
clip * absmax / 7 with clip in [CLIP_MIN, 1], minimizing that group's output error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge.quant.policy import Precision
from edge.quant.rtn import fake_quant

N_GRID = 20
MAX_SEARCH_TOKENS = 256  # rows of X used in the loss (statistics use all rows)
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input `point`, and the op whose output channels absorb 1/s."""

    point: str  # activation capture point (edge.models.reference.Capture)
    prev: str  # "ln1" | "v" | "ln2" | "up"
    linears: tuple[str, ...]  # short names: "q", "k", ...


GROUPS = (
    ScaleGroup("attn_in", "ln1", ("q", "k", "v")),
    ScaleGroup("o_in", "v", ("o",)),
    ScaleGroup("mlp_in", "ln2", ("gate", "up")),
    ScaleGroup("down_in", "up", ("down",)),
)


@dataclass
class AwqResult:
    """Per-layer outcome: chosen alpha per group, and each linear's column multipliers `col`
    (W' = W * col / row[:, None]) and row divisors `row`, for mapping back to the float basis."""

    alphas: dict[str, float] = field(default_factory=dict)
    col: dict[str, np.ndarray] = field(default_factory=dict)
    row: dict[str, np.ndarray] = field(default_factory=dict)
    loss_rtn: dict[str, float] = field(default_factory=dict)
    loss_awq: dict[str, float] = field(default_factory=dict)


def _subsample(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    if x.shape[0] <= n:
        return x
    idx = np.random.default_rng(seed).choice(x.shape[0], n, replace=False)
    return x[np.sort(idx)]


def tie_kv(s: np.ndarray, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """Average s [nh * d] over the query heads sharing each KV head, broadcast back."""
    rep = n_heads // n_kv_heads
    d = s.shape[0] // n_heads
    t = s.reshape(n_kv_heads, rep, d).mean(axis=1, keepdims=True)
    return np.broadcast_to(t, (n_kv_heads, rep, d)).reshape(-1).copy()


def search_scale(
    x: np.ndarray,
    ws: list[np.ndarray],
    precs: list[Precision],
    *,
    n_grid: int = N_GRID,
    tie=None,
    max_tokens: int = MAX_SEARCH_TOKENS,
) -> tuple[np.ndarray, float, float, float]:
    """Best per-input-channel scale s [K] for weights ws (each [N_i, K]) reading inputs x [T, K].

    Returns (s, alpha, loss at alpha=0 i.e. RTN, best loss); loss = sum_i ||x W_i'^T - x W_i^T||^2
    with W_i' = fake_quant(W_i * s) / s."""
    x_mean = np.abs(x).mean(axis=0).astype(np.float64)  # [K]
    xs = _subsample(x, max_tokens)
    refs = [xs @ w.T for w in ws]
    best = (np.ones(x.shape[1], np.float32), 0.0, np.inf)
    loss_rtn = np.inf
    for gi in range(n_grid):
        alpha = gi / n_grid
        s = np.maximum(x_mean, 1e-4) ** alpha
        s = s / np.sqrt(s.max() * s.min())
        if tie is not None:
            s = tie(s)
        s = s.astype(np.float32)
        loss = 0.0
        for w, p, y in zip(ws, precs, refs):
            wq = fake_quant(w * s[None, :], p) / s[None, :]
            loss += float(np.sum((xs @ wq.T - y) ** 2))
        if gi == 0:
            loss_rtn = loss
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], loss_rtn, best[2]


def search_clip(x: np.ndarray, w: np.ndarray, group_size: int, *, grid=CLIP_GRID) -> np.ndarray:
    """Per-group clip ratio [N, K // g] minimizing each group's partial-output error on x [T, K].

    For group j of output n: err(c) = sum_t (x_t,j . dw_n,j)^2 = dw_n,j^T C_j dw_n,j with the
    per-group Gram matrix C_j = X_j^T X_j [g, g] (computed once, over all tokens)."""
    from edge.quant.rtn import quantize_int4_clipped

    n, k = w.shape
    ng = k // group_size
    xg = x.astype(np.float32).reshape(-1, ng, group_size).transpose(1, 0, 2)  # [G, T, g]
    gram = np.matmul(xg.transpose(0, 2, 1), xg)  # [G, g, g]
    wg = w.reshape(n, ng, group_size)
    best_err = np.full((n, ng), np.inf)
    best = np.ones((n, ng), np.float32)
    for c in grid:
        clip = np.full((n, ng), c, np.float32)
        dw = (wg - quantize_int4_clipped(w, group_size, clip).dequantize().reshape(n, ng, group_size)).transpose(1, 0, 2)  # [G, N, g]
        err = np.sum(np.matmul(dw, gram) * dw, axis=2).T  # [N, G]
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, c, best)
    return best


def awq_layer(
    lw_arrays: dict[str, np.ndarray],
    acts: dict[str, np.ndarray],
    precs: dict[str, Precision],
    n_heads: int,
    n_kv_heads: int,
    *,
    n_grid: int = N_GRID,
) -> tuple[dict[str, np.ndarray], AwqResult]:
    """Search and fold AWQ scales for one layer.

    lw_arrays: short names q,k,v,o,gate,up,down (W [N, K]), ln1, ln2, and v_bias (or absent).
    acts: inputs per capture point. precs: per linear short name.
    Returns (scaled arrays, result); groups without an int4 linear are left alone."""
    a = {k: (None if v is None else v.astype(np.float32)) for k, v in lw_arrays.items()}
    res = AwqResult()
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        res.col[name] = np.ones(a[name].shape[1], np.float32)
        res.row[name] = np.ones(a[name].shape[0], np.float32)
    for grp in GROUPS:
        if not any(precs[n].kind == "int4" for n in grp.linears):
            continue
        tie = (lambda s: tie_kv(s, n_heads, n_kv_heads)) if grp.prev == "v" else None
        ws = [a[n] for n in grp.linears]
        s, alpha, l_rtn, l_best = search_scale(acts[grp.point], ws, [precs[n] for n in grp.linears], n_grid=n_grid, tie=tie)
        res.alphas[grp.point], res.loss_rtn[grp.point], res.loss_awq[grp.point] = alpha, l_rtn, l_best
        if alpha == 0.0:
            continue
        for n in grp.linears:  # columns *= s
            a[n] = a[n] * s[None, :]
            res.col[n] = res.col[n] * s
        if grp.prev in ("ln1", "ln2"):
            a[grp.prev] = a[grp.prev] / s
        else:  # previous linear's output rows /= s
            s_prev = s
            if grp.prev == "v":  # s is tied per KV channel: [nh * d] -> [nkv * d]
                d = s.shape[0] // n_heads
                s_prev = s.reshape(n_kv_heads, n_heads // n_kv_heads, d)[:, 0, :].reshape(-1)
                if a.get("v_bias") is not None:
                    a["v_bias"] = a["v_bias"] / s_prev
            a[grp.prev] = a[grp.prev] / s_prev[:, None]
            res.row[grp.prev] = res.row[grp.prev] * s_prev
    return a, res
