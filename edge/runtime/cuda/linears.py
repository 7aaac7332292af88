"""How a CudaDecoderSession runs a linear at M rows (a mixin of CudaDecoderSession).

    M = 1        fused-dequant GEMV (int4: the autotuned variant, block-K kernels with fused epilogues)
    M = 2..64    tensor-core GEMM with dequantization in registers (gemm.py), from each linear's
                 timed pick (tc_from); GEMV where the shape cannot run there
    M > 64       dequantize the weight to fp16 (ahead, on a side stream: dequant_ring.py) + cuBLAS

`batch_invariant` sends every M through the tensor-core GEMM. Reads the session's `k` (kernels),
`cp`, `spec`, `layers`, `lm_head`, `_graphs` (dropped when a pick changes).
"""

from __future__ import annotations

from typing import Any

from edge.errors import BackendError
from edge.runtime.cuda import kernels as kmod
from edge.runtime.cuda.blas import gemm_f16
from edge.runtime.cuda.dequant_ring import DequantRing
from edge.runtime.cuda.gemm import TcWorkspace, launch_tc
from edge.runtime.cuda.kernels import NULL
from edge.runtime.cuda.kernels import i32 as _i32
from edge.runtime.cuda.kernels_src import bk_bases
from edge.runtime.cuda.layout import Linear

GEMV_ROWS_PER_BLOCK = 8  # warps per 256-thread GEMV block (each takes R rows, kernels.GEMV_ROWS_PER_WARP)
MAX_GEMV_M = 16  # above this, prefill linears go through dequant + cuBLAS


class LinearDispatch:
    """Linear launches: path by M, GEMV variants, the fused block-K epilogues, prefill dequantization."""

    # int4 GEMV at M = 1: (kernel, rows per warp or block R, warps per block | threads per block);
    # autotuned per weight shape at load (see autotune.autotune_int4_m1). "gemv_int4_bk_*" are the block-K
    # kernels whose fused epilogues (RoPE + KV write, SiLU.mul, residual + RMSNorm) the decode step
    # uses; the warp-per-row kernels stay candidates and then run with the separate small kernels.
    _int4_m1: tuple[str, int, int] = ("gemv_int4_m1", 1, GEMV_ROWS_PER_BLOCK)
    tc_min_m: int | None = None  # smallest M on the tensor-core GEMM; None: each linear's timed pick (tc_from)
    tc_max_m = 64  # above: dequantize + cuBLAS (prefill)
    batch_invariant = False  # every M through the tensor-core GEMM, no M = 1 fused GEMVs
    prefill_overlap = True  # long prefills: dequantize linear i + 1 on a side stream during GEMM i (dequant_ring.py)
    _ring: DequantRing | None = None
    _ring_parts: tuple | None = None  # (two fp16 buffers, side stream, events), made at the first long prefill
    _tc: TcWorkspace | None = None
    INT4_M1_VARIANTS = (
        ("gemv_int4_m1", 1, 8), ("gemv_int4_m1_r2", 2, 8), ("gemv_int4_m1_r4", 4, 8),
        ("gemv_int4_m1", 1, 4), ("gemv_int4_m1_r2", 2, 4), ("gemv_int4_m1_r4", 4, 4),
        ("gemv_int4_m1_r2", 2, 16),
        *bk_bases(),
    )

    @staticmethod
    def variant_name(v: tuple[str, int, int]) -> str:
        return v[0] if v[0].startswith("gemv_int4_bk_") else f"{v[0]}_w{v[2]}"

    @staticmethod
    def is_bk(v: tuple[str, int, int] | None) -> bool:
        return v is not None and v[0].startswith("gemv_int4_bk_")

    @classmethod
    def _cand_name(cls, cand: tuple[tuple[str, int, int], bool]) -> str:
        return cls.variant_name(cand[0]) + ("+fused" if cand[1] else "")

    def linears(self) -> list[Linear]:
        return [L[k] for L in self.layers for k in ("qkv", "o", "gu", "down")] + [self.lm_head]

    def set_batch_invariant(self, on: bool = True) -> None:
        """Run every linear through the tensor-core GEMM, whatever M (drops captured graphs)."""
        odd = [lin.shape_key for lin in self.linears() if not lin.tc_splits]
        if on and odd:
            raise BackendError(f"batch_invariant needs every linear on the tensor-core GEMM; {odd[0]} cannot run there",
                               fix="use the default mode (same tokens to rounding)")
        self.batch_invariant = bool(on)
        self._graphs.clear()

    def set_int4_m1(self, variant: tuple[str, int, int], fused: bool = True) -> None:
        """Run every int4 linear's M = 1 GEMV with `variant`, with the fused epilogue where it
        can (tests; drops captured graphs)."""
        for lin in [L[k] for L in self.layers for k in ("qkv", "o", "gu", "down")] + [self.lm_head]:
            if lin.kind == "int4":
                lin.m1, lin.fused = variant, fused and self._fusable(variant, lin.role, lin)
        self._graphs.clear()

    def linear(self, lin: Linear, x: Any, m: int, y: Any, out_f32: bool = False) -> None:
        """y[:m] = x[:m] @ W.T (+ bias); y has row stride lin.n. GEMV for m = 1 (and m <= 16
        where the tensor-core GEMM cannot run the shape), tensor cores for m = 2..64."""
        path = self._path(lin, m)
        if path == "tc":
            launch_tc(self.k, lin, x, m, y, self._tc, out_f32)
            return
        if path == "cublas":
            return self._linear_cublas(lin, x, m, y, out_f32)
        t = self.k.gemv_tile(m)
        warps = GEMV_ROWS_PER_BLOCK
        if t == 1 and lin.kind == "int4":
            name, r, warps = lin.m1 or self._int4_m1
            if self.is_bk(lin.m1 or self._int4_m1):
                bias = lin.bias if lin.bias is not None else NULL
                self.k[name + "_st"](((lin.n + r - 1) // r,), (warps,), (lin.q, lin.s, x, bias, y, _i32(lin.n), _i32(lin.k), _i32(lin.gshift), _i32(out_f32)))
                return
        else:
            name, r = f"gemv_{lin.kind}_m{t}", (kmod.GEMV_ROWS_PER_WARP[t] if lin.kind != "fp16" else 1)
        rows = warps * r
        grid = ((lin.n + rows - 1) // rows, (m + t - 1) // t)
        bias = lin.bias if lin.bias is not None else NULL
        common = (_i32(m), _i32(lin.n), _i32(lin.k))
        if lin.kind == "int4":
            args = (lin.q, lin.s, x, bias, y, *common, _i32(lin.gshift), _i32(lin.n), _i32(out_f32))
        elif lin.kind == "int8":
            args = (lin.q, lin.s, x, bias, y, *common, _i32(lin.n), _i32(out_f32))
        else:
            args = (lin.q, x, bias, y, *common, _i32(lin.n), _i32(out_f32))
        self.k[name](grid, (32 * warps,), args)

    def _path(self, lin: Linear, m: int) -> str:
        """How linear() runs this linear at M = m: "tc" (tensor-core GEMM), "gemv" or "cublas"."""
        lo = lin.tc_from if self.tc_min_m is None else self.tc_min_m
        if self._tc is not None and lin.tc_splits and (self.batch_invariant or lo <= m <= self.tc_max_m):
            return "tc"
        return "cublas" if m > MAX_GEMV_M else "gemv"

    def dequantize(self, lin: Linear, out: Any = None) -> Any:
        """half [N, K] copy of the layer's weight (prefill path), into `out` (a reused buffer of at
        least N * K halves) when given."""
        cp = self.cp
        if lin.kind == "fp16":
            return lin.q
        out = cp.empty((lin.n, lin.k), dtype=cp.float16) if out is None else out[: lin.n * lin.k].reshape(lin.n, lin.k)
        words = lin.q.size
        if lin.kind == "int4":  # one word a thread: 1.20 ms for the 1B's 64 linears (kernels of 4 words a thread: 1.20, 1.56)
            self.k["dequant_int4"](((words + 255) // 256,), (256,), (lin.q, lin.s, out, _i32(lin.n), _i32(lin.k), _i32(lin.gshift)))
        else:
            self.k["dequant_int8"](((words + 255) // 256,), (256,), (lin.q.view(cp.uint32), lin.s, out, _i32(lin.n), _i32(lin.k)))
        return out

    def _dequant_workspace(self, lin: Linear) -> Any:
        """One half buffer, reused by every prefill linear in stream order, sized for the largest
        layer linear (the LM head, which prefill runs at M = 1, is not among them)."""
        ws = getattr(self, "_deq_ws", None)
        if ws is None or ws.size < lin.n * lin.k:
            size = max([lin.n * lin.k] + [x.n * x.k for L in getattr(self, "layers", ()) for x in L.values() if isinstance(x, Linear)])
            self._deq_ws = ws = self.cp.empty(size, dtype=self.cp.float16)
        return ws

    def _linear_cublas(self, lin: Linear, x: Any, m: int, y: Any, out_f32: bool = False) -> None:
        cp = self.cp
        if out_f32:  # logits rows: half product, float out
            w = self.dequantize(lin)
            o = cp.matmul(x[:m], w.T)
            if lin.bias is not None:
                o += lin.bias
            y[:m] = o.astype(cp.float32)
            return
        ring = self._ring
        if ring is not None and ring.expects(lin):  # dequantized ahead on the side stream
            gemm_f16(cp, x, ring.take(lin), y, m)
            ring.release()
        else:
            w = self.dequantize(lin, None if lin.kind == "fp16" else self._dequant_workspace(lin))
            gemm_f16(cp, x, w, y, m)
        if lin.bias is not None:
            y[:m] += lin.bias

    def _prefill_ring(self, m: int) -> DequantRing | None:
        """The dequantization ring for a pass of m rows whose layer linears go through cuBLAS, in
        the order _layers runs them (None when none does, or prefill_overlap is off)."""
        if not self.prefill_overlap:
            return None
        order = [L[k] for L in self.layers for k in ("qkv", "o", "gu", "down")]
        order = [lin for lin in order if lin.kind != "fp16" and self._path(lin, m) == "cublas"]
        if not order:
            return None
        if self._ring_parts is None:
            cp = self.cp
            size = max(lin.n * lin.k for lin in order)
            bufs = (cp.empty(size, dtype=cp.float16), cp.empty(size, dtype=cp.float16))
            side = cp.cuda.Stream(non_blocking=True)  # (at the highest stream priority: no faster, bench_prefill.py)
            events = {key: [cp.cuda.Event(block=False, disable_timing=True) for _ in range(2)] for key in ("ready", "free")}
            self._ring_parts = (bufs, side, events)
        bufs, side, events = self._ring_parts
        return DequantRing(self, order, bufs, side, events)

    def _fused(self, lin: Linear, m: int) -> bool:
        """Does this linear run through a block-K kernel with a fused epilogue at this M?"""
        return self.fuse and m == 1 and lin.fused and self.is_bk(lin.m1) and not self.batch_invariant

    def _fusable(self, variant: tuple[str, int, int], role: str, lin: Linear) -> bool:
        """Can `variant` run `role`'s fused epilogue for this linear? (pairs must stay in a block / head)"""
        if not self.is_bk(variant) or lin.kind != "int4":
            return False
        f = self.spec.features  # the epilogues implement the Llama block's step after each linear
        if (role == "rope" and f.qk_norm) or (role == "glu" and f.activation != "silu") or (role == "res" and f.sandwich_norms):
            return False
        r = variant[1]
        if role == "rope":
            return r % 2 == 0 and self.spec.head_dim % r == 0
        if role == "glu":
            return r % 2 == 0
        return role == "res" and lin.n % 4 == 0

    def _bk(self, lin: Linear, epi: str, *args: Any) -> None:
        name, r, nt = lin.m1
        bias = lin.bias if lin.bias is not None else NULL
        self.k[f"{name}_{epi}"](((lin.n + r - 1) // r,), (nt,), (lin.q, lin.s, *args[:1], bias, *args[1:]))
