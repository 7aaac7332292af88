"""Round-to-nearest quantization of whole linear layers into the bundle format, and back.

`quantize_linear(w, precision)` returns the bundle tensors of one linear (edge.quant.format);
`dequantize_tensors(tensors)` turns a bundle's tensors back into float32 HF weights (the
numpy reference forward runs on those: perplexity, oracle comparisons).
"""

from __future__ import annotations

import numpy as np

from edge.quant.format import QTensor, dequantize_int4, dequantize_int8, quantize_int4_rtn, quantize_int8_rtn
from edge.quant.policy import Precision


def quantize_int4_clipped(w: np.ndarray, group_size: int, clip: np.ndarray | None = None) -> QTensor:
    """Block-wise symmetric int4 with per-group clipping: scale = clip * absmax / 7.

    clip float32 [N, K // g] in (0, 1] (AWQ's clip search); None is plain RTN."""
    if clip is None:
        return quantize_int4_rtn(w, group_size)
    from edge.quant.format import pack_int4

    w = w.astype(np.float32)
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    scale = (np.abs(g).max(axis=2) * clip / 7.0).astype(np.float16)
    scale = np.where(scale == 0, np.float16(1.0), scale)
    q = np.clip(np.rint(g / scale.astype(np.float32)[..., None]), -8, 7).astype(np.int8).reshape(n, k)
    return QTensor(pack_int4(q), scale, 4, group_size, (n, k))


def fake_quant(w: np.ndarray, prec: Precision, clip: np.ndarray | None = None) -> np.ndarray:
    """Quantize then dequantize: the float32 [N, K] weight the engine will effectively use."""
    if prec.kind == "fp32":
        return w.astype(np.float32)
    if prec.kind == "fp16":
        return w.astype(np.float16).astype(np.float32)
    if prec.kind == "int8":
        return quantize_int8_rtn(w).dequantize()
    # int4 without packing (the search loops call this often); same arithmetic as the format's.
    n, k = w.shape
    g = w.astype(np.float32).reshape(n, k // prec.group_size, prec.group_size)
    amax = np.abs(g).max(axis=2)
    if clip is not None:
        amax = amax * clip
    scale = (amax / 7.0).astype(np.float16)
    scale = np.where(scale == 0, np.float16(1.0), scale).astype(np.float32)[..., None]
    return (np.clip(np.rint(g / scale), -8, 7) * scale).reshape(n, k)


def quantize_linear(module: str, w: np.ndarray, prec: Precision, clip: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Bundle tensors for linear `module` (HF name without `.weight`)."""
    if prec.kind == "fp32":
        return {module + ".weight": np.ascontiguousarray(w, dtype=np.float32)}
    if prec.kind == "fp16":
        return {module + ".weight": w.astype(np.float16)}
    qt = quantize_int8_rtn(w) if prec.kind == "int8" else quantize_int4_clipped(w, prec.group_size, clip)
    return {module + ".qweight": qt.qweight, module + ".scales": qt.scales}


def dequantize_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bundle tensors -> float32 HF weights. The layout is read from dtypes and shapes alone:
    int8 qweight -> per-channel int8; uint8 qweight [N, K/2] with scales [N, K/g] -> int4."""
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        if name.endswith(".scales"):
            continue
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            s = tensors[base + ".scales"]
            if t.dtype == np.int8:
                out[base + ".weight"] = dequantize_int8(t, s)
            else:
                k = t.shape[1] * 2
                out[base + ".weight"] = dequantize_int4(t, s, k // s.shape[1])
        else:
            out[name] = t.astype(np.float32)
    return out


def weight_precision_summary(tensors: dict[str, np.ndarray]) -> dict[str, int]:
    """Count of linear layers per stored kind (int4 / int8 / fp16 / fp32), for reports."""
    counts: dict[str, int] = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            kind = "int8" if t.dtype == np.int8 else "int4"
        elif name.endswith("_proj.weight") or name == "lm_head.weight":
            kind = "fp16" if t.dtype == np.float16 else "fp32"
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    return counts
