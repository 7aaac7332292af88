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
