"""GPTQ: error-compensating rounding of int4 block-wise weights (Frantar et al., 2022), in numpy.

Round-to-nearest rounds every weight on its own. GPTQ rounds the columns of W [N, K] one at a
time and spreads each column's rounding error over the columns not yet rounded, weighted by the
inverse Hessian of the layer's output error on calibration inputs X [T, K]:

    H = 2 X^T X / T  (+ 1% of mean(diag H) on the diagonal: X^T X is rank-deficient when T < K)
    U = upper Cholesky factor of H^-1 (float64)
    for column j:   q_j = Q(w_j);   e_j = (w_j - q_j) / U_jj;   w_{j+1:} -= e_j U_{j, j+1:}

done in blocks of 128 columns (the update of the columns after a block is one matmul). Rows are
independent given H, so linears reading the same input (q/k/v, gate/up) are rounded together.

The output is the SAME storage layout as RTN (edge.quant.format: symmetric int4, group g along
K, scale = absmax / 7 in fp16): a group's scale is computed from the current (already
error-updated) weights when the sweep enters that group, times an optional per-group clip ratio
(AWQ's clip search). With `act_order` columns are visited by decreasing diag(H); the group
scales are then fixed up front from the weights before the sweep ("static groups"), so that a
group still covers K-contiguous columns as the format requires.

Used after AWQ's scale search and folding (edge.quant.awq): GPTQ sees the AWQ-scaled weights and
the correspondingly scaled inputs (x / s), so AWQ decides the grid and GPTQ the rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.quant.format import QTensor, pack_int4

BLOCK_SIZE = 128
PERC_DAMP = 0.01


@dataclass(frozen=True)
class GptqConfig:
    block_size: int = BLOCK_SIZE
    perc_damp: float = PERC_DAMP
    act_order: bool = False


def hessian(x: np.ndarray) -> np.ndarray:
    """H = 2 X^T X / T, float64 [K, K], from inputs x [T, K]."""
    x64 = x.astype(np.float64)
    return 2.0 * (x64.T @ x64) / max(1, x.shape[0])


def _group_scale(w: np.ndarray, clip: np.ndarray | None) -> np.ndarray:
    """Scale float32 [N] of one group w [N, g] (same arithmetic as edge.quant.format: fp16, 0 -> 1)."""
    amax = np.abs(w).max(axis=1)
    if clip is not None:
        amax = amax * clip
    s = (amax / 7.0).astype(np.float16)
    return np.where(s == 0, np.float16(1.0), s).astype(np.float32)


def _inv_hessian_chol(h: np.ndarray, perc_damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = H^-1), float64 [K, K]."""
    k = h.shape[0]
    h = h.copy()
    damp = perc_damp * float(np.mean(np.diag(h)))
    if damp <= 0:
        damp = 1e-6
    h[np.diag_indices(k)] += damp
    for _ in range(6):  # escalate damping if H is numerically not positive definite
        try:
            lo = np.linalg.cholesky(h)
            break
        except np.linalg.LinAlgError:
            h[np.diag_indices(k)] += damp
            damp *= 2
    else:
        raise np.linalg.LinAlgError("Hessian not positive definite after damping")
    eye = np.eye(k)
    lo_inv = np.linalg.solve(lo, eye)  # L^-1 (triangular; solve is fast enough at K <= 16k)
    hinv = lo_inv.T @ lo_inv  # H^-1 = L^-T L^-1
    return np.linalg.cholesky(hinv).T


def gptq_quantize(
    w: np.ndarray,
    h: np.ndarray,
    group_size: int,
    *,
    clip: np.ndarray | None = None,
    config: GptqConfig = GptqConfig(),
) -> QTensor:
    """Int4 block-wise GPTQ of w [N, K] with Hessian h [K, K] (see hessian()).

    clip: optional float32 [N, K // g] clip ratios applied to each group's absmax.
    Returns a QTensor in the edge.quant.format int4 layout."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} not divisible by group size {group_size}")
    bs = config.block_size
    if bs % group_size:
        bs = group_size * max(1, bs // group_size)
    ng = k // group_size
    W = np.array(w, dtype=np.float32, copy=True)  # [N, K], updated in place
    h = np.array(h, dtype=np.float64, copy=True)
    dead = np.diag(h) == 0  # inputs that are always 0: any value works, take 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = np.arange(k)
    scales = np.zeros((n, ng), np.float32)
    if config.act_order:  # static groups from the pre-sweep weights, then permute
        for gi in range(ng):
            c = None if clip is None else clip[:, gi]
            scales[:, gi] = _group_scale(W[:, gi * group_size : (gi + 1) * group_size], c)
        perm = np.argsort(-np.diag(h), kind="stable")
        W = W[:, perm]
        h = h[perm][:, perm]
    U = _inv_hessian_chol(h, config.perc_damp).astype(np.float32)  # [K, K] upper
    Q = np.zeros((n, k), np.float32)  # integer values in [-8, 7] (permuted order)
    group_of = perm // group_size  # original group of each permuted column

    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = W[:, i1:i2].copy()  # [N, b]
        Err1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            gi = group_of[col]
            if not config.act_order and col % group_size == 0:  # entering a group: scale from current weights
                c = None if clip is None else clip[:, gi]
                scales[:, gi] = _group_scale(W1[:, j : j + group_size], c)
            s = scales[:, gi]
            wj = W1[:, j]
            qj = np.clip(np.rint(wj / s), -8, 7)
            Q[:, col] = qj
            e = (wj - qj * s) / U1[j, j]  # [N]
            if j + 1 < i2 - i1:
                W1[:, j + 1 :] -= np.outer(e, U1[j, j + 1 :])
            Err1[:, j] = e
        if i2 < k:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if config.act_order:
        inv = np.empty_like(perm)
        inv[perm] = np.arange(k)  # the inverse permutation, exact without a sort
        Q = Q[:, inv]
    q = Q.astype(np.int8)
    return QTensor(pack_int4(q), scales.astype(np.float16), 4, group_size, (n, k))


def gptq_fake_quant(
    w: np.ndarray, h: np.ndarray, group_size: int, *, clip: np.ndarray | None = None, config: GptqConfig = GptqConfig()
) -> np.ndarray:
    """Dequantized float32 [N, K] of gptq_quantize (for error reports and tests)."""
    return gptq_quantize(w, h, group_size, clip=clip, config=config).dequantize()
