"""Host-side layout of the CUDA backend's weights: which kind each linear is in a bundle, how
fused linears' output rows are ordered on the GPU, and the Linear record the kernels launch on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np



@dataclass
class Linear:
    """One (possibly fused) linear layer on the GPU. kind: int4 | int8 | fp16 | fp32 (the fp32
    compute mode's, edge.runtime.cuda.fp32); y = x @ W.T."""

    kind: str
    n: int
    k: int
    q: Any  # int4: uint32 [N, K/8] repacked; int8: int8 [N, K]; fp16: half [N, K]; fp32: float [N, K]
    s: Any  # scales half [N, K/g] or [N]; None for fp16
    gshift: int = 0  # log2(group) for int4
    bias: Any = None  # half [N]
    m1: tuple[str, int, int] | None = None  # int4 M = 1 GEMV variant picked for this shape at load
    role: str = "st"  # what follows it in a layer: rope (qkv), res (o, down), glu (gate|up), st
    fused: bool = False  # at M = 1, run m1 with the role's fused epilogue (the autotuner decides)
    tc_splits: int = 0  # tensor-core GEMM (M >= 2): K splits; 0 = this shape cannot use it (edge.runtime.cuda.gemm)
    tc_from: int = 2  # smallest M run on the tensor-core GEMM (timed against the GEMV at load)
    tc_mt: tuple[int, int] = (2, 4)  # m16-tiles per warp for 17..32 and 33..64 rows (timed at load)
    tc_depth: int = 2  # weight iterations in flight per warp of the one-m16-tile launches: 2 or 4 (timed at load)
    tc_async: int = 0  # one-m16-tile launches through the cp.async shared-memory ring of this many stages (4, 8); 0: tc_depth's register ring
    tc_kb: int = 0  # n8-tiles per warp of the kernel that splits K across a block's warps (gemm_*_tc_kb{2,4}); 0: off (then tc_splits / tc_depth / tc_async)

    @property
    def shape_key(self) -> str:
        return f"{self.kind}[{self.n}x{self.k}]g{1 << self.gshift if self.kind == 'int4' else 0}"

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + (self.s.nbytes if self.s is not None else 0) + (self.bias.nbytes if self.bias is not None else 0))


def head_pair_order(d: int) -> np.ndarray:
    """Order of one q / k head's D values on the GPU: position 2i holds value i and 2i + 1
    value i + D/2 (the two halves RoPE rotates together sit next to each other)."""
    half = d // 2
    head = np.empty(d, dtype=np.int64)
    head[0::2] = np.arange(half)
    head[1::2] = np.arange(half) + half
    return head


def qkv_row_order(hq: int, hkv: int, d: int) -> np.ndarray:
    """Row order of the fused qkv weight on the GPU: every q and k head in head_pair_order (so
    one GEMV block can rotate a pair); v rows keep their order."""
    head = head_pair_order(d)
    qk = (np.arange(hq + hkv)[:, None] * d + head[None, :]).ravel()
    return np.concatenate([qk, np.arange((hq + hkv) * d, (hq + 2 * hkv) * d)])


def gu_row_order(inter: int) -> np.ndarray:
    """Row order of the fused gate|up weight on the GPU: row 2j = gate_j, 2j + 1 = up_j."""
    out = np.empty(2 * inter, dtype=np.int64)
    out[0::2] = np.arange(inter)
    out[1::2] = np.arange(inter) + inter
    return out


def host_linear(w: dict[str, np.ndarray], name: str) -> tuple[str, np.ndarray, np.ndarray | None, int, int]:
    """(kind, q, scales, group, K) of linear `name` in the bundle layout (edge.quant.format.read_linear)."""
    from edge.quant.format import read_linear

    lin = read_linear(w, name)  # BundleError when absent or malformed
    if lin.kind == "fp":
        return "fp16", lin.weight, None, 0, lin.k
    return lin.kind, lin.qweight, lin.scales.astype(np.float16, copy=False), lin.group_size, lin.k
