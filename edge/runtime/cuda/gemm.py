"""Launching the tensor-core small-batch GEMM (csrc/gemm_tc.cu) for a Linear.

    plan_tc(lin, sms)                  -> sets lin.tc_splits (0: this shape cannot use it)
    split_candidates(lin)              -> the K splits the load-time autotuner times
    TcWorkspace.for_linears(cp, lins)  split-K partials + ticket counters, allocated once
    launch_tc(k, lin, x, m, y, ws, out_f32)   y[:m] = x[:m] @ W.T (+ bias), any m (row chunks)
    async_smem(lin, stages, splits)    dynamic shared memory of the cp.async-ring kernels ("_a4", "_a8")

The split count depends on the weight's shape alone (never on M), and the m16-tiles per warp
(lin.tc_mt, by M bucket) only group rows: a row's result is the same whatever else is in the
batch. The engine's batched == alone equality rests on that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.runtime.cuda.layout import Linear

GEMM_WARPS = 4  # as in gemm_tc.cu
GEMM_NT = 4  # n8-tiles per warp (GEMM_TC_INSTANCE)
COLS_PER_BLOCK = GEMM_WARPS * GEMM_NT * 8
KJ = {"int4": 128, "int8": 64}  # K per warp iteration
MAX_SPLITS = 16
CHUNK_ROWS = 64  # rows per launch (bounds the split-K workspace; prefill past 64 rows is cuBLAS)
MAX_SPLIT_COLS = 1 << 17  # splits x N at most: the workspace stays <= 32 MiB
M_TILES = (1, 2, 4)  # compiled MT (m16-tiles per warp)
DEPTHS = (2, 4)  # weight iterations in flight per warp; 4 is compiled for MT = 1 only ("_d4")
KB_NT = (2, 4)  # gemm_*_tc_kb{NT}: K split across KB_WARPS warps of a block on NT n8-tiles; one block split
KB_WARPS = 8  # as in gemm_tc.cu
ASYNC_STAGES = (4, 8)  # MT = 1 kernels with a per-warp shared-memory ring of this many iterations ("_a4", "_a8")


def tc_ok(lin: Linear) -> bool:
    """Can the tensor-core kernel run this linear? (int4 groups >= 32, K a multiple of the iteration)"""
    if lin.kind not in KJ or lin.k % KJ[lin.kind]:
        return False
    return lin.kind != "int4" or (1 << lin.gshift) >= 32


def plan_tc(lin: Linear, sms: int) -> None:
    """lin.tc_splits: K splits so that short-N layers still launch about four blocks per SM."""
    if not tc_ok(lin):
        lin.tc_splits = 0
        return
    blocks = -(-lin.n // COLS_PER_BLOCK)
    want = -(-4 * sms // blocks)
    lin.tc_splits = max(s for s in split_candidates(lin) if s <= want or s == 1)


def split_candidates(lin: Linear) -> list[int]:
    """K splits worth timing: powers of two with >= 2 iterations per split, workspace bounded."""
    iters = lin.k // KJ[lin.kind]
    return [s for s in (1, 2, 4, 8, 16) if s == 1 or (s <= MAX_SPLITS and iters // s >= 2 and s * lin.n <= MAX_SPLIT_COLS)]


@dataclass
class TcWorkspace:
    partials: Any  # float32, >= splits * CHUNK_ROWS * N for every planned linear
    tickets: Any  # uint32, one per (column block, row tile) of a launch; reset by the kernel

    @classmethod
    def for_linears(cls, cp: Any, lins: list[Linear], rows: int = CHUNK_ROWS, splits: int | None = None) -> "TcWorkspace":
        """Sized for each linear's tc_splits (or `splits` for all, the autotuner's trials)."""
        need = max([(splits or lin.tc_splits) * lin.n for lin in lins if (splits or lin.tc_splits) > 1] or [1]) * min(rows, CHUNK_ROWS)
        blocks = max([-(-lin.n // COLS_PER_BLOCK) for lin in lins if lin.tc_splits] or [1])
        tiles = -(-min(rows, CHUNK_ROWS) // 16)  # row tiles of a launch (MT = 1: 16 rows each)
        return cls(cp.zeros(need, dtype=cp.float32), cp.zeros(blocks * tiles, dtype=cp.uint32))


def async_smem(lin: Linear, stages: int, splits: int | None = None) -> int:
    """Bytes of dynamic shared memory of gemm_{kind}_tc_m1_a{stages} for this linear at `splits`
    K splits (its tc_splits by default), as gemm_tc.cu lays it out: per warp and stage a 16-byte
    weight chunk per lane and n8-tile and (int4) a 4-byte scale word, then the block's X, 16 rows
    of its K range (the longest split's) + 8 halves."""
    kj = KJ[lin.kind]
    kmax = -(-(lin.k // kj) // (splits or lin.tc_splits or 1)) * kj
    ring = GEMM_WARPS * stages * GEMM_NT * 32 * (16 + (4 if lin.kind == "int4" else 0))
    return ring + 16 * (kmax + 8) * 2


def async_fits(k: Any, lin: Linear, stages: int, splits: int | None = None) -> bool:
    """Does the cp.async-ring kernel's shared memory fit this GPU's per-block limit (k.smem_optin)?"""
    return async_smem(lin, stages, splits) <= k.smem_optin


FORCE_MT: int | None = None  # benchmarks: every launch with this many m16-tiles per warp


def _mt(m: int, lin: Linear) -> int:
    """m16-tiles per warp for a launch of m rows: 1 up to 16 rows, then the linear's timed pick."""
    if FORCE_MT is not None:
        return FORCE_MT
    if m <= 16:
        return 1
    return lin.tc_mt[0 if m <= 32 else 1]


def launch_tc(k: Any, lin: Linear, x: Any, m: int, y: Any, ws: TcWorkspace, out_f32: bool = False, ldy: int | None = None) -> None:
    """y[:m] = x[:m] @ W.T (+ bias) through gemm_{int4,int8}_tc_m{1,2,4}[_d4 | _a4 | _a8] or _tc_kb{2,4}; y's row stride is ldy (N)."""
    ldy = lin.n if ldy is None else ldy
    null = np.uint64(0)
    bias = lin.bias if lin.bias is not None else null
    for r0 in range(0, m, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, m - r0)
        if lin.tc_kb:  # K split inside the block: 16-row tiles, no workspace
            xs = x[r0 : r0 + rows] if r0 else x
            ys = y[r0 : r0 + rows] if r0 else y
            k[f"gemm_{lin.kind}_tc_kb{lin.tc_kb}"]((-(-lin.n // (8 * lin.tc_kb)), 1, -(-rows // 16)), (32 * KB_WARPS,), (
                lin.q, lin.s, xs, bias, ys, ws.partials, ws.tickets, np.int32(rows), np.int32(lin.n), np.int32(lin.k),
                np.int32(lin.gshift), np.int32(ldy), np.int32(1 if out_f32 else 0)))
            continue
        mt = _mt(rows, lin)
        grid = (-(-lin.n // COLS_PER_BLOCK), lin.tc_splits, -(-rows // (16 * mt)))
        xs = x[r0 : r0 + rows] if r0 else x
        ys = y[r0 : r0 + rows] if r0 else y
        args = (lin.q, lin.s, xs, bias, ys, ws.partials, ws.tickets, np.int32(rows), np.int32(lin.n), np.int32(lin.k),
                np.int32(lin.gshift), np.int32(ldy), np.int32(1 if out_f32 else 0))
        if mt == 1 and lin.tc_async and async_fits(k, lin, lin.tc_async):  # the same sums as every other MT = 1 kernel
            k[f"gemm_{lin.kind}_tc_m1_a{lin.tc_async}"](grid, (32 * GEMM_WARPS,), args, shared_mem=async_smem(lin, lin.tc_async))
            continue
        deep = "_d4" if mt == 1 and lin.tc_depth == 4 else ""  # the same sums at either depth
        k[f"gemm_{lin.kind}_tc_m{mt}{deep}"](grid, (32 * GEMM_WARPS,), args)
