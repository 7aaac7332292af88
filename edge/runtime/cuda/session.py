"""CudaDecoderSession: the DecoderSession protocol on our own CUDA kernels (no PyTorch).

Per decoder layer, M rows (M = batch in decode, prompt tokens in prefill):

    res (float [M, H]) --add_rmsnorm--> h --linear qkv (+bias)--> qkv [--qk_rmsnorm--] --rope_cache--> q, KV pool
      q --attention (paged decode kernel | flash / cuBLAS + causal softmax in prefill)--> a
      a --linear o--> res += o [normed first: sandwich], h = rmsnorm --linear gate|up--> silu_mul | gelu_tanh_mul
        --linear down--> res += ... [normed first: sandwich]
    logits = lm_head(h) [--softcap_f32--]

The architecture's features (edge.models.arch) become kernel arguments and a few small kernels,
all read from the spec in `_block_params` and `load_weights`; nothing here tests an architecture's
name. Gemma's (1 + w) norms and Phi-3's fused qkv / gate_up are already folded / split by the
readers; the embedding scale is applied in the gather (a tied table stays the head's weights);
sliding layers (per layer: the last `sliding_window` keys, their own RoPE base) and score
soft-capping are arguments of the attention kernels (0: off).

Linears: M = 1 runs the fused-dequant GEMV kernels (with fused epilogues), M = 2..64 the
tensor-core GEMM with dequantization in registers (gemm.py), larger M (prefill) dequantizes the
layer's weight to fp16 and calls cuBLAS. `batch_invariant` sends every M through the tensor-core
GEMM (a row's numbers then do not depend on the batch it is in). Decode steps are captured as one CUDA graph per batch bucket
(1, 2, 4, 8, 16, ...); a step copies one small int32 block (ids, positions, slots, lengths, block
tables) to the device, replays the graph and reads back logits or sampled ids.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edge.bundle import Bundle
from edge.errors import BackendError
from edge.runtime.cuda import kernels as kmod
from edge.runtime.cuda.autotune import autotune_int4_m1, autotune_tc
from edge.runtime.cuda.backend import CudaBackend, plan_limits
from edge.runtime.cuda.backend import pool_blocks as plan_pool_blocks
from edge.runtime.cuda.dequant_ring import DequantRing
from edge.runtime.cuda.gemm import TcWorkspace, launch_tc, plan_tc
from edge.runtime.cuda.layout import Linear
from edge.runtime.kv import BlockManager
from edge.runtime.cuda.reference import rope_tables
from edge.runtime.cuda.sampling import sample_top_p  # noqa: F401 (tests import it from here)
from edge.runtime.cuda.weights import load_weights

GEMV_ROWS_PER_BLOCK = 8  # warps per 256-thread GEMV block (each takes R rows, kernels.GEMV_ROWS_PER_WARP)


def gemm_f16(cp: Any, x: Any, w: Any, y: Any, m: int) -> None:
    """y[:m] = x[:m] @ w.T through cuBLAS directly (fp16 in / out, fp32 compute, tensor cores), on
    the current stream. x [>= m, K] and y [>= m, N] with contiguous rows (any row stride), w [N, K]
    contiguous. cp.matmul does the same product with ~10x the host time per call, which a prefill
    of 64 GEMMs felt (the GPU waited on Python)."""
    n, k = w.shape
    if not (x.dtype == y.dtype == w.dtype == cp.float16 and x.strides[1] == 2 and y.strides[1] == 2
            and w.flags.c_contiguous and x.shape[1] == k and y.shape[1] == n):
        cp.matmul(x[:m], w.T, out=y[:m])
        return
    gemm_ex(cp, x, w, y, m, CUDA_R_16F, CUBLAS_COMPUTE_32F)


def gemm_ex(cp: Any, x: Any, w: Any, y: Any, m: int, data_type: int, compute_type: int) -> None:
    """y[:m] = x[:m] @ w.T by cublasGemmEx on the current stream, operands of one `data_type`
    already checked by the caller (contiguous rows of any stride, w [N, K] contiguous)."""
    from cupy_backends.cuda.libs import cublas

    n, k = w.shape
    elem = x.itemsize
    h = cp.cuda.device.get_cublas_handle()
    cublas.setStream(h, cp.cuda.get_current_stream().ptr)
    mode = cublas.getPointerMode(h)
    cublas.setPointerMode(h, cublas.CUBLAS_POINTER_MODE_HOST)
    try:  # column-major: y^T [n, m] = (w [k, n])^T . x^T [k, m]
        cublas.gemmEx(h, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, m, k, _ONE.ctypes.data, w.data.ptr, data_type, k,
                      x.data.ptr, data_type, x.strides[0] // elem, _ZERO.ctypes.data, y.data.ptr, data_type, y.strides[0] // elem,
                      compute_type, CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(h, mode)


CUDA_R_16F, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT = 2, 68, -1
_ONE, _ZERO = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)


def flash_prefill_smem(head_dim: int) -> int:
    """Dynamic shared memory of flash_prefill_d{64,128}: two stages of K and V tiles of 64 rows
    of head_dim + 8 halves (flash_prefill.cu's flash_prefill_smem)."""
    return 2 * 2 * 64 * (head_dim + 8) * 2


MAX_GEMV_M = 16  # above this, prefill linears go through dequant + cuBLAS
ATTN_THREADS = 256
PREFILL_Q_CHUNK = 512  # prefill attention in query chunks: chunk c skips keys after its last query
ARGMAX_BLOCKS = 64  # blocks per row of the decode step's argmax
EMBED_THREADS = 256  # embed_rmsnorm: rows up to 32 x this
ATTN_MAX_SPLITS = 8  # decode attention: at most this many blocks per (head, sequence)
MAX_STREAM_DEPTH = 16  # greedy_stream: most steps queued ahead of the host
ATTN_MIN_SPLIT = 128  # ... and at least this many tokens per block (bench/bench_attention.py)
LOG2E = 1.4426950408889634
# block features (edge.models.arch.block_features) these kernels lower; a model with any other is refused by name
CUDA_FEATURES = ("sandwich_norms", "qk_norm", "activation", "embed_scale", "attn_scale", "attn_softcap", "final_softcap",
                 "layer_types", "rope_local_theta")


def _i32(v: int) -> np.int32:
    return np.int32(v)


NULL = np.uint64(0)


def _buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


class CudaDecoderSession:
    """A generator bundle loaded on the GPU with a paged KV cache for `max_batch` x `max_context`."""

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
    flash_prefill = True  # prefill attention on the tensor-core flash kernel (head_dim 64 / 128), else cuBLAS
    _tc: TcWorkspace | None = None
    _backend: CudaBackend | None = None
    act_dtype = "float16"  # activations, KV cache, weights of fp linears (edge.runtime.cuda.fp32: "float32")
    INT4_M1_VARIANTS = (
        ("gemv_int4_m1", 1, 8), ("gemv_int4_m1_r2", 2, 8), ("gemv_int4_m1_r4", 4, 8),
        ("gemv_int4_m1", 1, 4), ("gemv_int4_m1_r2", 2, 4), ("gemv_int4_m1_r4", 4, 4),
        ("gemv_int4_m1_r2", 2, 16),
        *((f"gemv_int4_bk_r{r}_t{nt}_u{u}", r, nt) for r, nt, u in kmod.BK_VARIANTS),
    )

    def __init__(
        self,
        bundle: Bundle | str | Path,
        *,
        max_batch: int = 8,
        max_context: int | None = None,
        block_size: int | None = None,
        num_blocks: int | None = None,
        use_graphs: bool = True,
        device: int = 0,
        verify: bool = True,
        fuse: bool = True,
    ):
        try:
            import cupy as cp
        except ImportError as e:
            raise BackendError("the cuda backend needs cupy", fix="pip install 'edge-rag[cuda]'") from e
        self.cp = cp
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, kind="generator", verify=verify)
        self.bundle = b
        self.spec = spec = b.spec
        limits = plan_limits(b)  # the memory plan: context, KV blocks / block size / dtype
        self.max_batch = int(max_batch)
        self.max_context = int(max_context or min(limits["max_context"], spec.max_position))
        self.vocab_size = spec.vocab_size
        self.block_size = block_size = int(block_size or limits["kv_block_size"])
        self.use_graphs = use_graphs
        self.fuse = fuse
        self.device = cp.cuda.Device(device)
        self.device.use()
        self.k = kmod.load(device)
        from edge.models.arch import block_features

        missing = [f for f in block_features(spec) if f not in CUDA_FEATURES]
        if missing:  # declared, not probed
            raise BackendError(f"the cuda backend does not implement {', '.join(missing)} ({spec.arch})",
                               fix="use --backend onnxruntime")
        if spec.head_dim % 16 or ATTN_THREADS % (spec.head_dim // 2) or spec.head_dim > 256:
            raise BackendError(f"head_dim {spec.head_dim} is not supported by the cuda backend", fix="use --backend onnxruntime")
        self.stream = cp.cuda.Stream(non_blocking=True)
        t0 = time.perf_counter()
        with self.stream:
            load_weights(self, b.load_weights())
            self.sms = int(cp.cuda.runtime.getDeviceProperties(self.device.id)["multiProcessorCount"])
            for lin in self.linears():
                plan_tc(lin, self.sms)
            self._tc = TcWorkspace.for_linears(cp, self.linears())
            self._block_params()
            nb = int(num_blocks or plan_pool_blocks(spec, limits, self.max_batch, self.max_context, block_size))
            self.blocks = BlockManager(nb, block_size, max_context=self.max_context, max_seqs=self.max_batch)
            # KV pool: [layers, 2 (k, v), slots, Hkv, D]
            self.kv = cp.zeros((spec.n_layers, 2, nb * block_size, spec.n_kv_heads, spec.head_dim), dtype=self.act_dtype)
            self._alloc_decode_buffers()
        self.stream.synchronize()
        self.load_s = time.perf_counter() - t0
        # paged_attn_decode's dynamic shared memory (4-byte words): scores, q, reduction,
        # per-thread V accumulators (8 each), block-table copy
        smem = 4 * (self.max_context + spec.head_dim + 32 + 8 * ATTN_THREADS + self.max_blocks)
        if smem > 48 * 1024:  # opt in to more than 48 KB of dynamic shared memory
            for name in ("paged_attn_decode", "paged_attn_decode_d64", "paged_attn_decode_d128", "paged_attn_split_d64", "paged_attn_split_d128", "paged_attn_split_tk_d64", "paged_attn_split_tk_d128"):
                self.k[name].max_dynamic_shared_size_bytes = smem
        self._attn_smem = smem
        if spec.head_dim in (64, 128) and flash_prefill_smem(spec.head_dim) > 48 * 1024:
            for cap in ("", "cap_"):
                self.k[f"flash_prefill_{cap}d{spec.head_dim}"].max_dynamic_shared_size_bytes = flash_prefill_smem(spec.head_dim)
        self._graphs: dict[int, Any] = {}
        self._pipe: list | None = None  # greedy_stream's pinned read-back buffers and events
        self._side = None  # greedy_stream's read-back stream
        self._sample_rng: np.random.Generator | None = None  # decode_sample without caller uniforms
        # one block per row: enough threads that each does a few elements (latency, not bandwidth)
        self._norm_threads = max(128, min(1024, spec.hidden_size // 4 // 32 * 32))
        self.int4_m1_us = autotune_int4_m1(self)
        self.tc_us = autotune_tc(self)

    def _block_params(self) -> None:
        """What the architecture's features ask of the kernels, per session and per layer:
        attention scale and soft-cap, embedding scale, final soft-cap, the GLU kernel, and per
        layer its sliding window (0: every earlier key) and RoPE tables (sliding layers of a
        model with rope_local_theta rotate with their own base)."""
        cp, spec, f = self.cp, self.spec, self.spec.features
        self.attn_scale = np.float32(f.attn_scale if f.attn_scale is not None else 1.0 / math.sqrt(spec.head_dim))
        self.attn_softcap = np.float32(f.attn_softcap or 0.0)
        self.final_softcap = np.float32(f.final_softcap or 0.0)
        self.embed_scale = np.float32(f.embed_scale)
        self.glu_kernel = {"silu": "silu_mul", "gelu_tanh": "gelu_tanh_mul"}[f.activation]
        cos, sin = rope_tables(spec, self.max_context)
        self.cos, self.sin = cp.asarray(cos), cp.asarray(sin)
        local = (self.cos, self.sin)
        if f.rope_local_theta is not None:
            cos, sin = rope_tables(spec, self.max_context, local=True)
            local = (cp.asarray(cos), cp.asarray(sin))
        for i, L in enumerate(self.layers):
            sliding = f.sliding(i)
            L["window"] = _i32(spec.sliding_window if sliding else 0)
            L["cos"], L["sin"] = local if sliding else (self.cos, self.sin)

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

    # ---- buffers ----------------------------------------------------------------------
    def _alloc_decode_buffers(self) -> None:
        cp, s, mb = self.cp, self.spec, self.max_batch
        self.max_blocks = self.blocks.max_blocks_per_seq
        self._bufs = self._make_bufs(mb)
        # int32 inputs: ids[mb] pos[mb] slots[mb] ctx[mb] block_tables[mb, max_blocks]
        self._inp_host = np.zeros(4 * mb + mb * self.max_blocks, dtype=np.int32)
        self._inp = cp.zeros(self._inp_host.size, dtype=cp.int32)
        self._logits = cp.zeros((mb, s.vocab_size), dtype=cp.float32)
        self._next = cp.zeros(mb, dtype=cp.int32)
        self._hist = cp.zeros((mb, self.max_context + 1), dtype=cp.int32)  # sampled id by position
        # fused residual + RMSNorm: a ticket counter the finishing block resets to 0
        self._counter = cp.zeros(1, dtype=cp.uint32)
        # multi-block argmax: per-row partials and ticket counters
        self._argmax_parts = max(1, min(ARGMAX_BLOCKS, -(-s.vocab_size // 1024)))
        self._amax_v = cp.zeros((mb, self._argmax_parts), dtype=cp.float32)
        self._amax_i = cp.zeros((mb, self._argmax_parts), dtype=cp.int32)
        self._amax_t = cp.zeros(mb, dtype=cp.uint32)
        # split-sequence decode attention: enough blocks per (head, sequence) to cover the SMs
        # (independent of the batch, so a sequence's numbers do not depend on its batch)
        sms = int(cp.cuda.runtime.getDeviceProperties(self.device.id)["multiProcessorCount"])
        self._attn_splits = max(1, min(ATTN_MAX_SPLITS, -(-2 * sms // s.n_heads)))
        self.attn_min_split = ATTN_MIN_SPLIT
        self._attn_part_o = cp.zeros(mb * s.n_heads * self._attn_splits * s.head_dim, dtype=cp.float32)
        self._attn_part_ml = cp.zeros(mb * s.n_heads * self._attn_splits * 2, dtype=cp.float32)
        self._attn_tickets = cp.zeros(mb * s.n_heads, dtype=cp.uint32)

    def _make_bufs(self, m: int) -> dict[str, Any]:
        cp, s = self.cp, self.spec
        f16 = self.act_dtype
        return {
            "res": cp.empty((m, s.hidden_size), dtype=cp.float32),
            "h": cp.empty((m, s.hidden_size), dtype=f16),
            "qkv": cp.empty((m, s.q_size + 2 * s.kv_size), dtype=f16),
            "q": cp.empty((m, s.q_size), dtype=f16),
            "a": cp.empty((m, s.q_size), dtype=f16),
            "o": cp.empty((m, s.hidden_size), dtype=f16),
            "gu": cp.empty((m, 2 * s.intermediate_size), dtype=f16),
            "act": cp.empty((m, s.intermediate_size), dtype=f16),
        }

    def _inputs(self) -> tuple[Any, Any, Any, Any, Any]:
        mb, i = self.max_batch, self._inp
        return i[0:mb], i[mb : 2 * mb], i[2 * mb : 3 * mb], i[3 * mb : 4 * mb], i[4 * mb :]

    # ---- kernel launches --------------------------------------------------------------
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

    def _add_rmsnorm(self, res: Any, x: Any, w: Any, out: Any, m: int) -> None:
        self.k["add_rmsnorm"]((m,), (self._norm_threads,), (res, x if x is not None else NULL, w, out, _i32(self.spec.hidden_size), np.float32(self.spec.rms_eps)))

    def _layers(self, m: int, bufs: dict[str, Any], ids: Any, pos: Any, slots: Any, attend) -> None:
        """Embedding -> all layers -> final norm into bufs['h'] (rows [0, m))."""
        s = self.spec
        if s.hidden_size % 4 == 0 and s.hidden_size <= 32 * EMBED_THREADS:
            self.k["embed_rmsnorm"]((m,), (EMBED_THREADS,), (ids, self.embed, self.layers[0]["ln1"], bufs["res"], bufs["h"], _i32(s.hidden_size), np.float32(s.rms_eps), self.embed_scale))
        else:
            self.k["embed"]((m,), (256,), (ids, self.embed, bufs["res"], _i32(s.hidden_size), self.embed_scale))
            self._add_rmsnorm(bufs["res"], None, self.layers[0]["ln1"], bufs["h"], m)
        eps = np.float32(s.rms_eps)
        self._ring = self._prefill_ring(m) if m > self.tc_max_m else None
        try:
            for i, L in enumerate(self.layers):
                kc, vc = self.kv[i, 0], self.kv[i, 1]
                self._qkv_rope(L["qkv"], bufs["h"], m, pos, slots, bufs["q"], kc, vc, bufs["qkv"], layer=i)
                attend(i, bufs["q"], kc, vc, bufs["a"])
                self._linear_residual_norm(L["o"], bufs["a"], m, bufs["res"], bufs["o"], L["ln2"], bufs["h"], eps, post=L["post_attn"])
                self._gate_up(L["gu"], bufs["h"], m, bufs["gu"], bufs["act"])
                nxt = self.layers[i + 1]["ln1"] if i + 1 < len(self.layers) else self.norm
                self._linear_residual_norm(L["down"], bufs["act"], m, bufs["res"], bufs["o"], nxt, bufs["h"], eps, post=L["post_mlp"])
        finally:
            self._ring = None

    def lm_head_logits(self, h: Any, m: int, logits: Any) -> None:
        """logits float [m, V] = h[:m] @ head.T, soft-capped when the architecture caps them."""
        self.linear(self.lm_head, h, m, logits, out_f32=True)
        if self.final_softcap:
            n = m * self.vocab_size
            self.k["softcap_f32"](((n + 255) // 256,), (256,), (logits, np.int64(n), self.final_softcap))

    # Each linear of a layer with what follows it: one block-K kernel with the fused epilogue
    # when the linear's autotuned pick says so (M = 1), else the GEMV / cuBLAS and the small kernel.
    def _qkv_rope(self, lin: Linear, x: Any, m: int, pos: Any, slots: Any, q: Any, kc: Any, vc: Any, qkv_buf: Any, layer: int = 0) -> None:
        """qkv = x @ W.T; per-head RMSNorm of q and k (qk_norm); RoPE (the layer's tables) on
        q -> q, on k -> KV cache at slots; v -> KV cache."""
        s, L = self.spec, self.layers[layer]
        heads = (_i32(s.n_heads), _i32(s.n_kv_heads), _i32(s.head_dim))
        if self._fused(lin, m):
            self._bk(lin, "rope", x, pos, slots, L["cos"], L["sin"], q, kc, vc, _i32(lin.n), _i32(lin.k), _i32(lin.gshift), *heads)
            return
        self.linear(lin, x, m, qkv_buf)
        if L["q_norm"] is not None:
            self.k["qk_rmsnorm"]((m, s.n_heads + s.n_kv_heads), (32,), (qkv_buf, L["q_norm"], L["k_norm"], *heads, np.float32(s.rms_eps)))
        threads = 128
        if self.act_dtype == "float16" and s.head_dim % 8 == 0:  # two rotation pairs a thread
            blocks = -(-((s.n_heads + s.n_kv_heads) * s.head_dim // 4 + s.kv_size // 8) // threads)
            self.k["rope_cache_x2"]((m, blocks), (threads,), (qkv_buf, pos, slots, L["cos"], L["sin"], q, kc, vc, *heads))
            return
        blocks = -(-((s.n_heads + s.n_kv_heads) * s.head_dim // 2 + s.kv_size) // threads)
        self.k["rope_cache"]((m, blocks), (threads,), (qkv_buf, pos, slots, L["cos"], L["sin"], q, kc, vc, *heads))

    def _gate_up(self, lin: Linear, x: Any, m: int, gu_buf: Any, act: Any) -> None:
        """act = act(x @ Wg.T) * (x @ Wu.T), act SiLU or GeLU-tanh (gate / up rows interleaved in W)."""
        if self._fused(lin, m):  # the fused epilogue is SiLU's (_fusable)
            self._bk(lin, "glu", x, act, _i32(lin.n), _i32(lin.k), _i32(lin.gshift))
            return
        self.linear(lin, x, m, gu_buf)
        n = m * (lin.n // 2)
        if self.act_dtype == "float16" and n % 4 == 0:  # four (gate, up) pairs a thread: one 16-byte load
            self.k[self.glu_kernel + "_x4"](((n // 4 + 255) // 256,), (256,), (gu_buf, act, _i32(n // 4)))
            return
        self.k[self.glu_kernel](((n + 255) // 256,), (256,), (gu_buf, act, _i32(m), _i32(lin.n // 2)))

    def _linear_residual_norm(self, lin: Linear, x: Any, m: int, res: Any, o_buf: Any, norm_w: Any, h: Any, eps: np.float32,
                              counter: Any = None, post: Any = None) -> None:
        """res += x @ W.T (normed by `post` first: sandwich norms); h = RMSNorm(res) * norm_w."""
        if post is not None:
            self.linear(lin, x, m, o_buf)
            self.k["norm_add_rmsnorm"]((m,), (self._norm_threads,), (res, o_buf, post, norm_w, h, _i32(self.spec.hidden_size), eps))
            return
        if self._fused(lin, m):
            counter = self._counter if counter is None else counter
            self._bk(lin, "res", x, res, norm_w, h, counter, _i32(lin.n), _i32(lin.k), _i32(lin.gshift), eps)
            return
        self.linear(lin, x, m, o_buf)
        self._add_rmsnorm(res, o_buf, norm_w, h, m)

    # ---- decode -----------------------------------------------------------------------
    def _decode_graph_body(self, bsz: int) -> None:
        s, bufs = self.spec, self._bufs
        ids, pos, slots, ctx, bt = self._inputs()

        def attend(i, q, kc, vc, out):
            self.decode_attention(q, kc, vc, bt, ctx, out, bsz, layer=i)

        self._layers(bsz, bufs, ids, pos, slots, attend)
        self.lm_head_logits(bufs["h"], bsz, self._logits)
        # the sampled ids also land in the ids input: greedy_stream's next step reads them there
        self.k["argmax_rows_mb"]((self._argmax_parts, bsz), (256,), (self._logits, self._next, ids, self._hist, pos, _i32(self._hist.shape[1]), self._amax_v, self._amax_i, self._amax_t, _i32(s.vocab_size)))
        # inputs of the next step, for a stream that runs without the host (greedy_stream)
        self.k["advance_inputs"]((1,), (max(32, -(-bsz // 32) * 32),), (self._inp, _i32(self.max_batch), _i32(self.max_blocks), _i32(self.block_size), _i32(bsz)))

    def attn_grid_splits(self, rows: int) -> int:
        """Split blocks per (head, sequence) of a decode step of `rows` sequences: about two blocks
        per SM in all, at most _attn_splits. A wider grid only adds blocks that return at once (a
        sequence uses one split per ATTN_MIN_SPLIT tokens): at 16 rows of Llama-3.2-1B, 8 splits
        made 4,096 blocks, 42 us a layer, for 512 that work. batch_invariant keeps _attn_splits at
        every batch size, so a row's sums never depend on the rest of its batch."""
        if self.batch_invariant:
            return self._attn_splits
        return max(1, min(self._attn_splits, -(-2 * self.sms // (self.spec.n_heads * rows))))

    def decode_attention(self, q: Any, kc: Any, vc: Any, bt: Any, ctx: Any, out: Any, rows: int, *, layer: int) -> None:
        """One query per row over its paged cache: q, out half [rows, Hq*D]; bt int32
        [rows, max_blocks]; ctx int32 [rows] cached tokens (0: a padding row). `layer`: whose
        sliding window applies."""
        s = self.spec
        scale = self.attn_scale
        feats = (self.layers[layer]["window"], self.attn_softcap)
        if s.head_dim in (64, 128):  # split-sequence kernel, P blocks per (head, sequence)
            self.k[f"paged_attn_split_tk_d{s.head_dim}"](
                (s.n_heads, rows, self.attn_grid_splits(rows)), (ATTN_THREADS,),
                (q, kc, vc, bt, ctx, out, self._attn_part_o, self._attn_part_ml, self._attn_tickets, _i32(s.n_heads),
                 _i32(s.n_kv_heads), _i32(self.block_size), _i32(self.max_blocks), _i32(self.max_context), scale,
                 _i32(self.attn_min_split), *feats),
                shared_mem=self._attn_smem,
            )
        else:
            self.k["paged_attn_decode"](
                (s.n_heads, rows), (ATTN_THREADS,),
                (q, kc, vc, bt, ctx, out, _i32(s.n_heads), _i32(s.n_kv_heads), _i32(s.head_dim), _i32(self.block_size),
                 _i32(self.max_blocks), _i32(self.max_context), scale, *feats),
                shared_mem=self._attn_smem,
            )

    def _bucket(self, n: int) -> int:
        for b in _buckets(self.max_batch):
            if n <= b:
                return b
        raise BackendError(f"{n} sequences in one step exceed max_batch {self.max_batch}")

    def _step(self, seq_ids: Sequence[int], token_ids: np.ndarray) -> int:
        """Append one token to each sequence and run the decode step; returns the bucket size."""
        n = len(seq_ids)
        if n == 0 or len(token_ids) != n:
            raise BackendError("decode needs one token id per sequence")
        if len(set(seq_ids)) != n:
            raise BackendError("a sequence appears twice in one decode step")
        bsz = self._bucket(n)
        for sid in seq_ids:  # check all before changing any (no half-applied step)
            if not self.blocks.can_append(sid, 1):
                self.blocks.append(sid, 1)  # raises the precise error
        host = self._inp_host
        self._fill_inputs(host, seq_ids, token_ids)
        with self.stream:
            self._inp.set(host, stream=self.stream)
            self._run_step(bsz)
        return bsz

    def _fill_inputs(self, host: np.ndarray, seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """Append one token to each sequence and write the step's int32 inputs into `host`."""
        mb = self.max_batch
        host[:] = 0
        host[2 * mb : 3 * mb] = -1  # padding rows write no KV
        for r, sid in enumerate(seq_ids):
            slot = self.blocks.append(sid, 1)[0]
            length = self.blocks.length(sid)
            table = self.blocks.table(sid)
            host[r] = int(token_ids[r])
            host[mb + r] = length - 1
            host[2 * mb + r] = slot
            host[3 * mb + r] = length
            off = 4 * mb + r * self.max_blocks
            host[off : off + len(table)] = table

    def _graph_safe(self, bsz: int) -> bool:
        """Can a decode step of this bucket be captured? Not when a linear goes through cuBLAS
        (dequantization buffers are allocated per call)."""
        return all(self._path(lin, bsz) != "cublas" for lin in self.linears())

    def _run_step(self, bsz: int) -> None:
        if self.use_graphs and self._graph_safe(bsz):
            g = self._graphs.get(bsz)
            if g is None:
                g = self._capture(bsz)
            g.launch(self.stream)
        else:
            self._decode_graph_body(bsz)

    def greedy_stream(self, seq_id: int, token: int, max_new: int, *, depth: int = 3) -> Iterator[int]:
        """Greedy tokens after `token` (the last one sampled, not yet cached), up to `max_new`
        and the context's room, with up to `depth` steps queued on the GPU ahead of the host.

        The stream's KV blocks are reserved up front and its inputs copied once; after that each
        step is one graph replay: the step's argmax writes the next input id, and the graph's
        last kernel (advance_inputs) moves position, slot and length on, so consecutive steps
        run back to back with no host copy between them. Each token is read back on a second
        stream from its own slot of a by-position history (never overwritten by later steps).
        Tokens are identical to decode_greedy's. Stopping early (closing the iterator) rolls the
        sequence back to the tokens actually returned, as if each had been decoded alone."""
        mb = self.max_batch
        n = min(int(max_new), self.max_context - self.blocks.length(seq_id))
        if n <= 0:
            return
        start = self.blocks.length(seq_id)
        slots = self.blocks.append(seq_id, n)  # reserve every step's slot (raises if the pool is short)
        host = self._inp_host
        host[:] = 0
        host[2 * mb : 3 * mb] = -1
        host[0], host[mb], host[2 * mb], host[3 * mb] = int(token), start, slots[0], start + 1
        table = self.blocks.table(seq_id)
        host[4 * mb : 4 * mb + len(table)] = table
        done = 0  # tokens handed to the caller
        try:
            for tok in self.stream_steps(start, n, depth):
                done += 1
                yield tok
        finally:
            if seq_id in self.blocks and self.blocks.length(seq_id) > start + done:
                self.blocks.truncate(seq_id, start + done)

    def stream_steps(self, start: int, n: int, depth: int = 3) -> Iterator[int]:
        """The host-free greedy loop over row 0 of `_inp_host` (already filled: token, position
        `start`, its slot, length, a block table covering all n steps): n graph replays queued up
        to `depth` ahead, each token read back from the by-position history on a side stream."""
        cp = self.cp
        if self._pipe is None:
            import cupyx

            self._side = cp.cuda.Stream(non_blocking=True)
            self._pipe = [(cupyx.empty_pinned((1,), np.int32), cp.cuda.Event(block=False, disable_timing=True), cp.cuda.Event(block=False, disable_timing=True)) for _ in range(MAX_STREAM_DEPTH)]
        depth = max(1, min(int(depth), len(self._pipe)))
        try:
            with self.stream:
                self._inp.set(self._inp_host, stream=self.stream)
            for i in range(n + depth):
                if i < n:
                    h_out, ev_main, ev_side = self._pipe[i % len(self._pipe)]
                    with self.stream:
                        self._run_step(1)
                        ev_main.record(self.stream)
                    with self._side:  # read step i's id from its history slot, off the main stream
                        self._side.wait_event(ev_main)
                        self._hist[0, start + i + 1 : start + i + 2].get(stream=self._side, out=h_out, blocking=False)
                        ev_side.record(self._side)
                j = i - depth + 1  # the step whose token is handed over now
                if 0 <= j < n:
                    h_out, _, ev_side = self._pipe[j % len(self._pipe)]
                    ev_side.synchronize()
                    yield int(h_out[0])
        finally:
            self.stream.synchronize()
            if self._side is not None:
                self._side.synchronize()

    def _capture(self, bsz: int) -> Any:
        self.stream.begin_capture()
        try:
            self._decode_graph_body(bsz)
        finally:
            g = self.stream.end_capture()
        self._graphs[bsz] = g
        return g

    def decode(self, seq_ids: Sequence[int], token_ids: np.ndarray) -> np.ndarray:
        """One step for several sequences: float32 logits [B, vocab]."""
        self._step(seq_ids, np.asarray(token_ids))
        out = self._logits[: len(seq_ids)].get(stream=self.stream)
        self.stream.synchronize()
        return out

    def decode_greedy(self, seq_ids: Sequence[int], token_ids: np.ndarray) -> np.ndarray:
        """One step with argmax sampled on the GPU: int32 next ids [B] (only B ints cross PCIe)."""
        self._step(seq_ids, np.asarray(token_ids))
        out = self._next[: len(seq_ids)].get(stream=self.stream)
        self.stream.synchronize()
        return out

    def decode_sample(self, seq_ids: Sequence[int], token_ids: np.ndarray, *, temperature: float = 1.0, top_p: float = 1.0,
                      u: np.ndarray | None = None, seed: int | None = None) -> np.ndarray:
        """One step with temperature / top-p sampling on the GPU: int32 next ids [B].

        `u`: one uniform [0, 1) per sequence (the caller's RNG, so a seeded generation is
        reproducible); without it they come from a session RNG seeded once with `seed`. Only the
        B uniforms go to the device and B ids come back (no logits cross PCIe)."""
        n = len(seq_ids)
        if u is None:
            if self._sample_rng is None:
                self._sample_rng = np.random.default_rng(seed)
            u = self._sample_rng.random(n, dtype=np.float32)
        u = np.asarray(u, dtype=np.float32).reshape(-1)
        if u.size != n:
            raise BackendError(f"decode_sample needs {n} uniforms, got {u.size}")
        self._step(seq_ids, np.asarray(token_ids))
        with self.stream:
            ids = sample_top_p(self.cp, self._logits[:n], temperature, top_p, self.cp.asarray(u))
            out = ids.get(stream=self.stream)
        self.stream.synchronize()
        return out

    # ---- prefill ----------------------------------------------------------------------
    def _prefill(self, seq_id: int, token_ids: np.ndarray) -> Any:
        cp, s = self.cp, self.spec
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        t = len(ids)
        if t == 0:
            raise BackendError("prefill needs at least one token")
        slots = self.blocks.append(seq_id, t)
        length = self.blocks.length(seq_id)
        p0 = length - t
        with self.stream:
            ids_d = cp.asarray(ids)
            pos_d = cp.arange(p0, length, dtype=cp.int32)
            slots_d = cp.asarray(np.asarray(slots, dtype=np.int32))
            all_slots = cp.asarray(np.asarray(self.blocks.slots(seq_id), dtype=np.int32))
            bufs = self._make_bufs(t)

            def attend(i, q, kc, vc, out):
                self._prefill_attention(q, kc, vc, all_slots, t, p0, out, layer=i)

            self._layers(t, bufs, ids_d, pos_d, slots_d, attend)
            logits = cp.empty((1, s.vocab_size), dtype=cp.float32)
            self.lm_head_logits(bufs["h"][t - 1 :], 1, logits)
        return logits

    def _prefill_attention(self, q: Any, kc: Any, vc: Any, all_slots: Any, t: int, p0: int, out: Any, *, layer: int) -> None:
        """Causal attention of t new queries over the sequence's p0 + t cached keys (the last
        sliding_window of them on a sliding `layer`): the tensor-core flash kernel for head_dim
        64 / 128 (flash_prefill), else cuBLAS."""
        s = self.spec
        window = self.layers[layer]["window"]
        if self.flash_prefill and s.head_dim in (64, 128):
            scale_log2 = np.float32(LOG2E * float(self.attn_scale))
            cap = "cap_" if self.attn_softcap > 0 else ""
            self.k[f"flash_prefill_{cap}d{s.head_dim}"](
                (-(-t // 64), s.n_heads), (128,),
                (q, kc, vc, all_slots, out, _i32(t), _i32(p0 + t), _i32(s.n_heads), _i32(s.n_kv_heads), scale_log2,
                 window, self.attn_softcap),
                shared_mem=flash_prefill_smem(s.head_dim))
            return
        self._prefill_attention_cublas(q, kc, vc, all_slots, t, p0, out, window)

    def _prefill_attention_cublas(self, q: Any, kc: Any, vc: Any, all_slots: Any, t: int, p0: int, out: Any, window: np.int32) -> None:
        """Causal attention of t new queries over the sequence's p0 + t cached keys (cuBLAS;
        causal_softmax masks the sliding window and soft-caps).

        Queries go in chunks of PREFILL_Q_CHUNK: chunk [t0, t1) only multiplies keys
        [0, p0 + t1), so a long prompt does about half the work of a full square."""
        cp, s = self.cp, self.spec
        hkv, g, d = s.n_kv_heads, s.n_heads // s.n_kv_heads, s.head_dim
        # queries grouped by kv head: [T, Hkv, G, D] -> [Hkv, G, T, D], pre-scaled (1/sqrt(D) or the architecture's)
        qh = q[:t].reshape(t, hkv, g, d).transpose(1, 2, 0, 3) * np.float16(self.attn_scale)
        k = kc[all_slots].transpose(1, 2, 0)  # [Hkv, D, L]
        v = vc[all_slots].transpose(1, 0, 2)  # [Hkv, L, D]
        k, v = cp.ascontiguousarray(k), cp.ascontiguousarray(v)
        o = cp.empty((t, hkv, g, d), dtype=cp.float16)
        for t0 in range(0, t, PREFILL_Q_CHUNK):
            t1 = min(t, t0 + PREFILL_Q_CHUNK)
            tc, lc = t1 - t0, p0 + t1
            qc = qh[:, :, t0:t1].reshape(hkv, g * tc, d)
            sc = cp.matmul(qc, k[:, :, :lc])  # [Hkv, G*Tc, Lc] half
            sc = cp.ascontiguousarray(sc)
            self.k["causal_softmax"]((hkv * g * tc,), (256,), (sc, _i32(lc), _i32(tc), _i32(p0 + t0), window, self.attn_softcap))
            oc = cp.matmul(sc, v[:, :lc])  # [Hkv, G*Tc, D]
            o[t0:t1] = oc.reshape(hkv, g, tc, d).transpose(2, 0, 1, 3)
        out[:t] = o.reshape(t, s.q_size)

    def prefill(self, seq_id: int, token_ids: np.ndarray) -> np.ndarray:
        """Append token_ids to the sequence; float32 logits [vocab] of the last position."""
        logits = self._prefill(seq_id, token_ids)
        out = logits[0].get(stream=self.stream)
        self.stream.synchronize()
        return out

    def prefill_greedy(self, seq_id: int, token_ids: np.ndarray) -> int:
        """Prefill, then argmax on the GPU: the first generated token id."""
        logits = self._prefill(seq_id, token_ids)
        with self.stream:
            self.k["argmax_rows"]((1,), (1024,), (logits, self._next, _i32(self.vocab_size)))
            out = int(self._next[:1].get(stream=self.stream)[0])
        self.stream.synchronize()
        return out

    # ---- the engine's backend (edge.runtime.step): see backend.CudaBackend ------------------
    @property
    def engine_backend(self) -> CudaBackend:
        if self._backend is None:
            self._backend = CudaBackend(self)
        return self._backend

    @property
    def caps(self):
        return self.engine_backend.caps

    def execute(self, batch):
        return self.engine_backend.execute(batch)

    def run_greedy(self, batch, max_new: int, *, depth: int = 3) -> Iterator[int]:
        return self.engine_backend.run_greedy(batch, max_new, depth=depth)

    # ---- sequences --------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        self.blocks.add(seq_id)

    def release(self, seq_id: int) -> None:
        self.blocks.release(seq_id)

    def length(self, seq_id: int) -> int:
        return self.blocks.length(seq_id)

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget the sequence's tokens from `length` on (later writes overwrite their slots)."""
        self.stream.synchronize()  # nothing queued may still write past `length`
        self.blocks.truncate(seq_id, length)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def generate_greedy(self, prompt: np.ndarray, max_new_tokens: int, seq_id: int = -1, *, pipelined: bool = True) -> list[int]:
        """Greedy tokens for one prompt (a convenience for tests and benchmarks; no stop tokens)."""
        self.add_sequence(seq_id)
        try:
            tok = self.prefill_greedy(seq_id, prompt)
            out = [tok]
            if pipelined:
                out.extend(self.greedy_stream(seq_id, tok, max_new_tokens - 1))
                return out
            for _ in range(max_new_tokens - 1):
                tok = int(self.decode_greedy([seq_id], np.array([tok]))[0])
                out.append(tok)
            return out
        finally:
            self.release(seq_id)
