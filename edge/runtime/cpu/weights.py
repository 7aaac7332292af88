"""A bundle's linears repacked for the native CPU kernels (csrc/native.c's tile layouts).

    lin = pack_linear(read_linear(w, "model.layers.0.mlp.up_proj"))   # a NativeLinear
    lin.struct                                                         # its abi.Lin (pointers into lin's arrays)

Tiles of 16 output columns x 32 inputs. int4 (any group 32/64/128: scales repeated per 32-block,
the same dequantized values): per tile and block 4 chunks of 64 bytes, chunk i holding for column c
and t = 0..3 the nibble pair (w[32b + 4i + t] low, w[32b + 16 + 4i + t] high), 0..15 with zero
point 8. int8 (per channel): per tile and block 8 groups of 64 bytes, group j holding w[32b + 4j + t]
+ 128. Columns past N (the last tile) are zero-point weights with scale 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.errors import BackendError
from edge.quant.format import BundleLinear, unpack_int4
from edge.runtime.cpu.abi import Lin

NT, QB = 16, 32


@dataclass
class NativeLinear:
    kind: int  # 4 | 8
    n: int
    k: int
    w: np.ndarray  # uint8, the tile layout
    s: np.ndarray  # float32: int4 [tiles, K/32, 16]; int8 [tiles, 16]
    bias: np.ndarray | None = None  # float32 [N]

    @property
    def tiles(self) -> int:
        return -(-self.n // NT)

    @property
    def nbytes(self) -> int:
        return int(self.w.nbytes + self.s.nbytes + (self.bias.nbytes if self.bias is not None else 0))

    @property
    def struct(self) -> Lin:
        return Lin(self.kind, self.n, self.k, self.tiles, self.w.ctypes.data, self.s.ctypes.data,
                   self.bias.ctypes.data if self.bias is not None else None)


def _tiles(rows: np.ndarray) -> np.ndarray:
    """uint32 [tiles * NT rows, groups] (each a row's 4-byte group) -> a [tile, group, row] view: the tile
    layout of native.c, moved as uint32, not byte by byte (3-4x faster: a 1.5B int8 engine's ~1.5 GB of
    linears took ~4 s to repack at load)."""
    return rows.reshape(-1, NT, rows.shape[1]).transpose(0, 2, 1)


def _pad_rows(a: np.ndarray, n: int, value) -> np.ndarray:
    if a.shape[0] == n:
        return a
    pad = np.full((n - a.shape[0],) + a.shape[1:], value, dtype=a.dtype)
    return np.concatenate([a, pad])


def pack_int4(qweight: np.ndarray, scales: np.ndarray, group: int, bias: np.ndarray | None = None) -> NativeLinear:
    """qweight uint8 [N, K/2] (edge.quant.format's int4), scales [N, K/group]."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if k % QB or group % QB:
        raise BackendError(f"int4 linear with in_features {k}, group {group}: the native kernels need multiples of 32",
                           fix="use --backend onnxruntime for this bundle")
    tiles, kb = -(-n // NT), k // QB
    u = (unpack_int4(qweight).astype(np.int16) + 8).astype(np.uint8)  # [N, K] nibbles 0..15
    u = _pad_rows(u, tiles * NT, np.uint8(8))
    u = u.reshape(tiles, NT, kb, 2, 4, 4)  # [tile, c, b, half, i, t]
    packed = (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).astype(np.uint8)  # [tile, c, b, i, t]
    w = np.ascontiguousarray(_tiles(packed.reshape(tiles * NT, kb * 16).view(np.uint32))).view(np.uint8).reshape(-1)  # [tile, b, i, c, t]
    s = np.repeat(scales.astype(np.float32), group // QB, axis=1)  # [N, K/32]
    s = _pad_rows(s, tiles * NT, np.float32(0)).reshape(tiles, NT, kb)
    s = np.ascontiguousarray(s.transpose(0, 2, 1))  # [tile, b, c]
    return NativeLinear(4, n, k, w, s, None if bias is None else np.ascontiguousarray(bias, dtype=np.float32))


def pack_int8(qweight: np.ndarray | list[np.ndarray], scales: np.ndarray | list[np.ndarray], bias: np.ndarray | None = None,
              *, interleave: bool = False) -> NativeLinear:
    """qweight int8 [N, K] (symmetric per channel), scales [N]; or lists of the row blocks of one linear, joined
    (q|k|v) or, with `interleave`, alternated by interleave16 (gate|up), each block copied once straight into
    its tiles: joining them first cost another full-size copy (~1.6 s of a 1.5B int8 engine's load)."""
    qs = list(qweight) if isinstance(qweight, (list, tuple)) else [qweight]
    ss = list(scales) if isinstance(scales, (list, tuple)) else [scales]
    k = qs[0].shape[1]
    if k % QB:
        raise BackendError(f"int8 linear with in_features {k}: the native kernels need a multiple of 32",
                           fix="use --backend onnxruntime for this bundle")
    if interleave:
        scale = interleave16(*ss)
        n = 2 * qs[0].shape[0]
    else:
        scale = np.concatenate(ss) if len(ss) > 1 else ss[0]
        n = sum(q.shape[0] for q in qs)
        if any(q.shape[0] % NT for q in qs[:-1]):  # a block that ends inside a tile: join the rows first
            qs = [np.concatenate(qs)]
    tiles, groups = -(-n // NT), k // 4  # groups: the 4-byte (t) groups of a row, b and j together
    out = np.empty((tiles, groups, NT), np.uint32)  # [tile, (b, j), c] of 4 bytes
    if interleave:
        pairs = out.reshape(tiles // 2, 2, groups, NT)  # tiles alternate: gate's, up's
        for j, q in enumerate(qs):
            pairs[:, j] = _tiles(_rows_u32(q))
    else:
        t = 0
        for q in qs:
            tq = -(-q.shape[0] // NT)
            out[t:t + tq] = _tiles(_pad_rows(_rows_u32(q), tq * NT, np.uint32(0)))
            t += tq
    w = out.view(np.uint8).reshape(-1)  # [tile, b, j, c, t]
    np.bitwise_xor(w, np.uint8(0x80), out=w)  # x + 128 for an int8 x, in place
    s = np.ascontiguousarray(_pad_rows(scale.astype(np.float32), tiles * NT, np.float32(0)).reshape(tiles, NT))
    return NativeLinear(8, n, k, w, s, None if bias is None else np.ascontiguousarray(bias, dtype=np.float32))


def _rows_u32(q: np.ndarray) -> np.ndarray:
    """int8 [N, K] as uint32 [N, K/4]: each row's 4-byte groups, without a copy where q is contiguous."""
    return np.ascontiguousarray(q, dtype=np.int8).view(np.uint32)


def quantize_float_int8(w: np.ndarray, rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """A float [N, K] weight (fp16 / fp32 bundles, a tied head) as symmetric per-channel int8 (edge.quant.format's
    rule), `rows` rows at a time: each row's scale is its own, so the values are one call's; the float32 temporaries
    are a slice's (a tied 49,152 x 576 head: ~9 MB each, not 113)."""
    from edge.quant.format import quantize_int8_rtn

    parts = [quantize_int8_rtn(np.asarray(w[r:r + rows], dtype=np.float32)) for r in range(0, w.shape[0], rows)]
    return np.concatenate([p.qweight for p in parts]), np.concatenate([p.scales for p in parts])


def pack_linear(lins: list[BundleLinear], biases: list[np.ndarray | None] | None = None) -> NativeLinear:
    """One NativeLinear from one or more bundle linears of the same kind, their outputs concatenated
    (q|k|v, gate|up). Float linears (fp16 / fp32 bundles) become per-channel int8."""
    kinds = {(x.kind, x.group_size, x.k) for x in lins}
    if len(kinds) != 1:
        raise BackendError(f"{lins[0].name}: fused linears of mixed kinds {sorted(kinds)}", fix="rebuild the bundle with one recipe")
    bias = None
    if biases is not None and any(b is not None for b in biases):
        bias = np.concatenate([np.zeros(x.n, np.float32) if b is None else np.asarray(b, np.float32) for x, b in zip(lins, biases)])
    kind = lins[0].kind
    if kind == "int4":
        return pack_int4(np.concatenate([x.qweight for x in lins]), np.concatenate([x.scales for x in lins]), lins[0].group_size, bias)
    if kind == "int8":
        return pack_int8([x.qweight for x in lins], [x.scales for x in lins], bias)
    # float linears: their stored arrays (fp16 / fp32), concatenated only when fused, read in slices as float32
    q, s = quantize_float_int8(lins[0].weight if len(lins) == 1 else np.concatenate([x.weight for x in lins]))
    return pack_int8(q, s, bias)


def interleave16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows of a and b (the same count, a multiple of 32) alternating in runs of 16: a[0:16], b[0:16],
    a[16:32], ... The gate|up linear's order: a thread that computes 4 tiles holds the gate and
    up values of 32 intermediate features, one whole quantization block of down's input."""
    n = a.shape[0]
    return np.stack([a.reshape(n // NT, NT, *a.shape[1:]), b.reshape(n // NT, NT, *b.shape[1:])], axis=1).reshape(2 * n, *a.shape[1:])


def pack_gate_up(gate: BundleLinear, up: BundleLinear) -> NativeLinear:
    """The MLP's gate and up projections as one linear, rows interleaved by interleave16."""
    if gate.n % QB or gate.n != up.n:
        raise BackendError(f"{gate.name}: gate/up of {gate.n} / {up.n} features: the native kernels need equal multiples of 32",
                           fix="use --backend onnxruntime for this bundle")
    kinds = {(x.kind, x.group_size, x.k) for x in (gate, up)}
    if len(kinds) != 1:
        raise BackendError(f"{gate.name}: fused linears of mixed kinds {sorted(kinds)}", fix="rebuild the bundle with one recipe")
    if gate.kind == "int4":
        return pack_int4(interleave16(gate.qweight, up.qweight), interleave16(gate.scales, up.scales), gate.group_size)
    if gate.kind == "int8":
        return pack_int8([gate.qweight, up.qweight], [gate.scales, up.scales], interleave=True)
    q, s = quantize_float_int8(interleave16(gate.dequantize(), up.dequantize()))
    return pack_int8(q, s)


def dequantized(lin: NativeLinear) -> np.ndarray:
    """float32 [N, K]: the weights the kernel multiplies by (tests' numpy reference)."""
    tiles, kb = lin.tiles, lin.k // QB
    if lin.kind == 4:
        p = lin.w.reshape(tiles, kb, 4, NT, 4)  # [tile, b, i, c, t]
        lo, hi = (p & 15).astype(np.float32) - 8, (p >> 4).astype(np.float32) - 8
        v = np.stack([lo, hi], axis=2)  # [tile, b, half, i, c, t]
        v = v.transpose(0, 4, 1, 2, 3, 5).reshape(tiles * NT, lin.k)
        s = np.repeat(lin.s.transpose(0, 2, 1).reshape(tiles * NT, kb), QB, axis=1)
        return (v * s)[: lin.n]
    p = lin.w.reshape(tiles, kb, 8, NT, 4).astype(np.float32) - 128  # [tile, b, j, c, t]
    v = p.transpose(0, 3, 1, 2, 4).reshape(tiles * NT, lin.k)
    return (v * lin.s.reshape(-1)[:, None])[: lin.n]
