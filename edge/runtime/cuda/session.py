"""CudaDecoderSession: the DecoderSession protocol on our own CUDA kernels (no PyTorch).

One job per module, joined here as mixins of the one session class (the fp32 mode,
fp32.Fp32DecoderSession, overrides a few of their methods):

    session.py   load the bundle (weights.py), plan the KV pool, autotune (autotune.py), sequences,
                 the engine's backend (backend.CudaBackend)
    linears.py   how a linear runs at M rows: GEMV (M = 1, fused epilogues), tensor-core GEMM
                 (M = 2..64, gemm.py), dequantize + cuBLAS (prefill, dequant_ring.py, blas.py)
    layers.py    the transformer block as kernel launches, shared by decode and prefill
    decode.py    decode steps: inputs, one CUDA graph per batch bucket, paged attention, the
                 host-free greedy stream, sampling
    prefill.py   a prompt through every layer at once, flash / cuBLAS prefill attention

The architecture's features (edge.models.arch) become kernel arguments and a few small kernels,
all read from the spec in `_block_params` and `load_weights`; nothing here tests an architecture's
name. Gemma's (1 + w) norms and Phi-3's fused qkv / gate_up are already folded / split by the
readers; the embedding scale is applied in the gather (a tied table stays the head's weights);
sliding layers (per layer: the last `sliding_window` keys, their own RoPE base) and score
soft-capping are arguments of the attention kernels (0: off).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edge.bundle import Bundle
from edge.errors import BackendError
from edge.runtime.cuda import kernels as kmod
from edge.runtime.cuda.autotune import autotune_int4_m1, autotune_tc, refine_int4_m1_in_step
from edge.runtime.cuda.backend import CudaBackend, plan_limits
from edge.runtime.cuda.backend import pool_blocks as plan_pool_blocks
from edge.runtime.cuda.blas import CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT, CUDA_R_16F, gemm_ex, gemm_f16  # noqa: F401 (re-exported)
from edge.runtime.cuda.decode import (  # noqa: F401 (re-exported)
    ARGMAX_BLOCKS, ATTN_MAX_SPLITS, ATTN_MIN_SPLIT, ATTN_THREADS, MAX_STREAM_DEPTH, DecodeSteps, _buckets, lr_smem)
from edge.runtime.cuda.gemm import TcWorkspace, plan_tc
from edge.runtime.cuda.kernels import NULL  # noqa: F401 (re-exported)
from edge.runtime.cuda.kernels import i32 as _i32  # noqa: F401 (re-exported)
from edge.runtime.cuda.layers import EMBED_THREADS, LayerPass  # noqa: F401 (re-exported)
from edge.runtime.cuda.layout import Linear  # noqa: F401 (tests import it from here)
from edge.runtime.cuda.linears import GEMV_ROWS_PER_BLOCK, MAX_GEMV_M, LinearDispatch  # noqa: F401 (re-exported)
from edge.runtime.cuda.prefill import FLASH_VARIANTS, LOG2E, PREFILL_Q_CHUNK, PrefillPass, flash_prefill_smem  # noqa: F401 (re-exported)
from edge.runtime.cuda.pdl import available as pdl_available
from edge.runtime.kv import BlockManager
from edge.runtime.cuda.sampling import sample_top_p  # noqa: F401 (tests import it from here)
from edge.runtime.cuda.weights import load_weights

# block features (edge.models.arch.block_features) these kernels lower; a model with any other is refused by name
CUDA_FEATURES = ("sandwich_norms", "qk_norm", "activation", "embed_scale", "attn_scale", "attn_softcap", "final_softcap",
                 "layer_types", "rope_local_theta")


class CudaDecoderSession(LinearDispatch, LayerPass, DecodeSteps, PrefillPass):
    """A generator bundle loaded on the GPU with a paged KV cache for `max_batch` x `max_context`.

    The jobs live in mixins, one module each: linears.py (how a linear runs at M rows),
    layers.py (the block as kernel launches), decode.py (steps, graphs, greedy stream,
    sampling), prefill.py; this class loads the bundle, owns the buffers' sizes, and is the
    engine's backend and the sequences' owner."""

    _backend: CudaBackend | None = None
    act_dtype = "float16"  # activations, KV cache, weights of fp linears (edge.runtime.cuda.fp32: "float32")
    use_pdl = True  # decode graphs with programmatic dependent launch where available (pdl.py; sm_90+)
    pdl_error: str | None = None  # why PDL capture failed and was turned off, if it did
    refine_in_step = True  # M = 1 picks re-timed in the whole b1 step at load (autotune.refine_int4_m1_in_step)

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
        self.pdl = type(self).use_pdl and pdl_available(self.k.cc)
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
            for name in ("paged_attn_decode", "paged_attn_decode_d64", "paged_attn_decode_d128", "paged_attn_split_d64", "paged_attn_split_d128", "paged_attn_split_tk_d64", "paged_attn_split_tk_d128",
                         "paged_attn_split_tk0_d64", "paged_attn_split_tk0_d128", "paged_attn_split_tk1_d64", "paged_attn_split_tk1_d128"):
                self.k[name].max_dynamic_shared_size_bytes = smem
        self._attn_smem = smem
        if spec.head_dim == 128 and lr_smem(128) > 48 * 1024:
            for name in ("paged_attn_lr_d128", "paged_attn_lc8_d128"):
                self.k[name].max_dynamic_shared_size_bytes = lr_smem(128)
        self._setup_gqa_attention()
        if spec.head_dim in (64, 128) and flash_prefill_smem(spec.head_dim) > 48 * 1024:
            prefixes = ["flash_prefill_cap_"] + [v[0] for v in FLASH_VARIANTS.values() if spec.head_dim in v[3]]
            for prefix in prefixes:
                self.k[f"{prefix}d{spec.head_dim}"].max_dynamic_shared_size_bytes = flash_prefill_smem(spec.head_dim)
        self._graphs: dict[int, Any] = {}
        self._pipe: list | None = None  # greedy_stream's pinned read-back buffers and events
        self._side = None  # greedy_stream's read-back stream
        self._sample_rng: np.random.Generator | None = None  # decode_sample without caller uniforms
        # one block per row: enough threads that each does a few elements (latency, not bandwidth)
        self._norm_threads = max(128, min(1024, spec.hidden_size // 4 // 32 * 32))
        self.int4_m1_us = autotune_int4_m1(self)
        self.tc_us = autotune_tc(self)
        # the few best per shape re-timed in the whole b1 step (models too big for the L2); the
        # autotuner's own picks kept for bench_step_ab's A/B
        self.int4_m1_tuned = {f"{lin.shape_key}|{lin.role}": (lin.m1, lin.fused) for L in self.layers for lin in L.values()
                              if isinstance(lin, Linear) and lin.kind == "int4"}
        self.int4_m1_step_ms = refine_int4_m1_in_step(self, self.int4_m1_us) if self.refine_in_step else {}

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

    def launch(self, batch):
        return self.engine_backend.launch(batch)

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
