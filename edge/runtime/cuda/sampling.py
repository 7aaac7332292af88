"""Sampling on the device for the CUDA backend (greedy argmax is a kernel, see csrc/sampling.cu)."""

from __future__ import annotations

from typing import Any

import numpy as np


def sample_top_p(cp: Any, logits: Any, temperature: float, top_p: float, u: Any) -> Any:
    """Temperature + nucleus sampling on the device. logits float [B, V], u uniform [B] -> int32 [B].

    Keeps the smallest prefix of tokens sorted by probability whose mass reaches top_p (the
    first token always), renormalises, and inverts the CDF at u."""
    if temperature <= 0:
        return cp.argmax(logits, axis=1).astype(cp.int32)
    x = logits / np.float32(temperature)
    x = x - x.max(axis=1, keepdims=True)
    p = cp.exp(x)
    p /= p.sum(axis=1, keepdims=True)
    order = cp.argsort(-p, axis=1)
    ps = cp.take_along_axis(p, order, axis=1)
    before = cp.cumsum(ps, axis=1) - ps
    ps = cp.where(before < np.float32(top_p), ps, np.float32(0))
    cdf = cp.cumsum(ps, axis=1)
    cdf /= cdf[:, -1:]
    idx = (cdf < u[:, None]).sum(axis=1)
    idx = cp.minimum(idx, logits.shape[1] - 1)
    return cp.take_along_axis(order, idx[:, None], axis=1)[:, 0].astype(cp.int32)


def sample_rows(cp: Any, logits: Any, temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray, u: np.ndarray) -> Any:
    """Per-row temperature / top-k / top-p sampling on the device: logits float [B, V], the
    rest host arrays [B] (temperature > 0; top_k <= 0 means off) -> int32 [B] on the device.

    Row b: probabilities sorted in decreasing order (ties: lower id first), cut to the top_k
    first, renormalised, cut to the smallest prefix whose mass reaches top_p (the first token
    always stays), renormalised, and the inverse CDF taken at u[b]: the rule of sample_top_p,
    with each row's own parameters, so a row samples what it would sample alone."""
    b, v = logits.shape
    t = cp.asarray(np.asarray(temperature, np.float32).reshape(b, 1))
    x = logits / t
    x = x - x.max(axis=1, keepdims=True)
    p = cp.exp(x)
    p /= p.sum(axis=1, keepdims=True)
    order = cp.argsort(-p, axis=1)
    ps = cp.take_along_axis(p, order, axis=1)
    k = np.asarray(top_k, np.int64)
    if (k > 0).any():
        kk = cp.asarray(np.where(k > 0, k, v).reshape(b, 1))
        ps = cp.where(cp.arange(v)[None, :] < kk, ps, np.float32(0))
        ps /= ps.sum(axis=1, keepdims=True)
    before = cp.cumsum(ps, axis=1) - ps
    ps = cp.where(before < cp.asarray(np.asarray(top_p, np.float32).reshape(b, 1)), ps, np.float32(0))
    cdf = cp.cumsum(ps, axis=1)
    cdf /= cdf[:, -1:]
    idx = (cdf < cp.asarray(np.asarray(u, np.float32).reshape(b, 1))).sum(axis=1)
    idx = cp.minimum(idx, v - 1)
    return cp.take_along_axis(order, idx[:, None], axis=1)[:, 0].astype(cp.int32)
