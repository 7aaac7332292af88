"""The quantized-weight format: the contract between quantizers, graph builders and backends.

Weights keep Hugging Face names and orientation: a linear weight is W [N, K] (out, in), y = x @ W.T.
In the bundle's `weights.safetensors` a linear layer `L` (e.g. `model.layers.3.self_attn.q_proj`)
is stored as one of:

  fp16      L.weight   float16 [N, K]
  int8      L.qweight  int8    [N, K]          symmetric per output channel
            L.scales   float16 [N]             w ~= q * scale[n]
  int4      L.qweight  uint8   [N, K // 2]     symmetric block-wise along K, group g
            L.scales   float16 [N, K // g]     w ~= (nibble - 8) * scale[n, k // g]
            nibble of element k: byte k // 2, low 4 bits for even k, high 4 bits for odd k.

The int4 layout is exactly ONNX Runtime MatMulNBits' B ([N, K/g, g/2] bytes, default zero
point 8) and, after subtracting 8, ONNX INT4 packing (first element in the low nibble).
Non-linear tensors (norms, biases, embeddings unless the policy says otherwise) are float16
under their HF names. Reference builds (recipe "fp32", correctness tests) store every
tensor, linear weights included, as float32 under its HF name (`L.weight` float32 [N, K]). The group size and recipe live in manifest.json, never in names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT4_GROUP_SIZES = (32, 64, 128)


@dataclass
class QTensor:
    """One quantized linear weight. `bits` 4 or 8; `group_size` 0 means per-channel."""

    qweight: np.ndarray
    scales: np.ndarray
    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K) of the dequantized weight

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales, self.group_size)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], shape [N, K] (K even) -> uint8 [N, K // 2]."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K // 2] -> int8 [N, K] in [-8, 7]."""
    lo = (packed & 0x0F).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int8)
    out[:, 0::2] = lo
    out[:, 1::2] = hi
    return out


def dequantize_int4(qweight: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    q = unpack_int4(qweight).astype(np.float32)
    n, k = q.shape
    s = scales.astype(np.float32).reshape(n, k // group_size, 1)
    return (q.reshape(n, k // group_size, group_size) * s).reshape(n, k)


def dequantize_int8(qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return qweight.astype(np.float32) * scales.astype(np.float32)[:, None]


def quantize_int8_rtn(w: np.ndarray) -> QTensor:
    """Per-output-channel symmetric round-to-nearest."""
    w = w.astype(np.float32)
    scale = np.abs(w).max(axis=1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
    q = np.clip(np.rint(w / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    return QTensor(q, scale, 8, 0, w.shape)


def quantize_int4_rtn(w: np.ndarray, group_size: int) -> QTensor:
    """Block-wise symmetric round-to-nearest along K: scale = absmax / 7, q in [-8, 7]."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group size {group_size} not in {INT4_GROUP_SIZES}")
    w = w.astype(np.float32)
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} not divisible by group size {group_size}")
    g = w.reshape(n, k // group_size, group_size)
    scale = (np.abs(g).max(axis=2) / 7.0).astype(np.float16)
    scale = np.where(scale == 0, np.float16(1.0), scale)
    q = np.clip(np.rint(g / scale.astype(np.float32)[..., None]), -8, 7).astype(np.int8).reshape(n, k)
    return QTensor(pack_int4(q), scale, 4, group_size, (n, k))


# ---- reading a linear back (the one reader every lowering uses) --------------------------------


@dataclass
class BundleLinear:
    """Linear `name` as stored: kind "fp" (weight float [N, K]), "int8" (qweight int8 [N, K],
    scales [N]) or "int4" (qweight uint8 [N, K/2], scales [N, K/g]); shapes checked on read."""

    name: str
    kind: str
    n: int
    k: int
    weight: np.ndarray | None = None
    qweight: np.ndarray | None = None
    scales: np.ndarray | None = None
    group_size: int = 0

    def dequantize(self) -> np.ndarray:
        """float32 [N, K] (the stored array itself for float32 weights)."""
        if self.kind == "fp":
            return np.asarray(self.weight, dtype=np.float32)
        if self.kind == "int8":
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales, self.group_size)


def has_linear(weights, name: str) -> bool:
    return f"{name}.weight" in weights or f"{name}.qweight" in weights


def read_linear(weights, name: str) -> BundleLinear:
    """Linear `name` (HF module name, e.g. `model.layers.0.mlp.up_proj` or `lm_head`) from
    float or bundle-form weights; a one-line BundleError when absent or malformed."""
    from edge.errors import BundleError

    if f"{name}.weight" in weights:
        w = weights[f"{name}.weight"]
        if w.ndim != 2:
            raise BundleError(f"{name}.weight has shape {tuple(w.shape)}, expected [N, K]", fix="rebuild the bundle")
        return BundleLinear(name, "fp", w.shape[0], w.shape[1], weight=w)
    if f"{name}.qweight" not in weights or f"{name}.scales" not in weights:
        raise BundleError(f"weights lack {name}.weight / {name}.qweight + .scales", fix="rebuild the bundle")
    q, s = weights[f"{name}.qweight"], weights[f"{name}.scales"]
    if q.dtype == np.int8:
        if q.ndim != 2 or s.shape != (q.shape[0],):
            raise BundleError(f"{name}: int8 qweight {tuple(q.shape)} with scales {tuple(s.shape)}, expected [N, K] and [N]", fix="rebuild the bundle")
        return BundleLinear(name, "int8", q.shape[0], q.shape[1], qweight=q, scales=s)
    n, k = q.shape[0], 2 * q.shape[1]
    if q.dtype != np.uint8 or s.ndim != 2 or s.shape[0] != n or k % s.shape[1]:
        raise BundleError(f"{name}: int4 qweight {q.dtype} {tuple(q.shape)} with scales {tuple(s.shape)} do not match", fix="rebuild the bundle")
    return BundleLinear(name, "int4", n, k, qweight=q, scales=s, group_size=k // s.shape[1])  # group from the scales
