"""CudaDecoderSession: the DecoderSession protocol on our own CUDA kernels (no PyTorch).

Per decoder layer, M rows (M = batch in decode, prompt tokens in prefill):

    res (float [M, H]) --add_rmsnorm--> h --linear qkv (+bias)--> qkv --rope_cache--> q, KV pool
      q --attention (paged decode kernel | cuBLAS QK^T, causal softmax, PV in prefill)--> a
      a --linear o--> res += o, h = rmsnorm --linear gate|up--> silu_mul --linear down--> res += ...

Linears: M <= 16 runs the fused-dequant GEMV kernels; larger M (prefill) dequantizes the layer's
weight to fp16 and calls cuBLAS. Decode steps are captured as one CUDA graph per batch bucket
(1, 2, 4, 8, 16, ...); a step copies one small int32 block (ids, positions, slots, lengths, block
tables) to the device, replays the graph and reads back logits or sampled ids.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge.build.bundle import Bundle
from edge.errors import BackendError
from edge.runtime.cuda import kernels as kmod
from edge.runtime.cuda.paged_kv import BlockManager, pool_blocks
from edge.runtime.cuda.reference import rope_tables

GEMV_ROWS_PER_BLOCK = 8  # warps per 256-thread GEMV block (each takes R rows, kernels.GEMV_ROWS_PER_WARP)
MAX_GEMV_M = 16  # above this, prefill linears go through dequant + cuBLAS
ATTN_THREADS = 256
PREFILL_Q_CHUNK = 512  # prefill attention in query chunks: chunk c skips keys after its last query


def _i32(v: int) -> np.int32:
    return np.int32(v)


NULL = np.uint64(0)


@dataclass
class Linear:
    """One (possibly fused) linear layer on the GPU. kind: int4 | int8 | fp16; y = x @ W.T."""

    kind: str
    n: int
    k: int
    q: Any  # int4: uint32 [N, K/8] repacked; int8: int8 [N, K]; fp16: half [N, K]
    s: Any  # scales half [N, K/g] or [N]; None for fp16
    gshift: int = 0  # log2(group) for int4
    bias: Any = None  # half [N]
    m1: tuple[str, int, int] | None = None  # int4 M = 1 GEMV variant picked for this shape at load

    @property
    def shape_key(self) -> str:
        return f"{self.kind}[{self.n}x{self.k}]g{1 << self.gshift if self.kind == 'int4' else 0}"

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + (self.s.nbytes if self.s is not None else 0) + (self.bias.nbytes if self.bias is not None else 0))


def _buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


class CudaDecoderSession:
    """A generator bundle loaded on the GPU with a paged KV cache for `max_batch` x `max_context`."""

    # int4 GEMV at M = 1: (kernel, rows per warp R, warps per block); autotuned per weight shape
    # at load (see _autotune_int4_m1). The default is what a Linear without a pick uses.
    _int4_m1: tuple[str, int, int] = ("gemv_int4_m1", 1, GEMV_ROWS_PER_BLOCK)
    INT4_M1_VARIANTS = (
        ("gemv_int4_m1", 1, 8), ("gemv_int4_m1_r2", 2, 8), ("gemv_int4_m1_r4", 4, 8),
        ("gemv_int4_m1", 1, 4), ("gemv_int4_m1_r2", 2, 4), ("gemv_int4_m1_r4", 4, 4),
        ("gemv_int4_m1_r2", 2, 16),
    )

    def __init__(
        self,
        bundle: Bundle | str | Path,
        *,
        max_batch: int = 8,
        max_context: int | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        use_graphs: bool = True,
        device: int = 0,
        verify: bool = True,
    ):
        try:
            import cupy as cp
        except ImportError as e:
            raise BackendError("the cuda backend needs cupy", fix="pip install 'edge-rag[cuda]'") from e
        self.cp = cp
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, kind="generator", verify=verify)
        self.bundle = b
        self.spec = spec = b.spec
        limits = b.manifest.get("limits", {}) or {}
        self.max_batch = int(max_batch)
        self.max_context = int(max_context or min(limits.get("max_context", 4096), spec.max_position))
        self.vocab_size = spec.vocab_size
        self.block_size = block_size
        self.use_graphs = use_graphs
        self.device = cp.cuda.Device(device)
        self.device.use()
        self.k = kmod.load(device)
        if spec.head_dim % 16 or ATTN_THREADS % (spec.head_dim // 2) or spec.head_dim > 256:
            raise BackendError(f"head_dim {spec.head_dim} is not supported by the cuda backend", fix="use --backend onnxruntime")
        self.stream = cp.cuda.Stream(non_blocking=True)
        t0 = time.perf_counter()
        with self.stream:
            self._load_weights(b.load_weights())
            cos, sin = rope_tables(spec, self.max_context)
            self.cos, self.sin = cp.asarray(cos), cp.asarray(sin)
            nb = int(num_blocks or limits.get("kv_blocks") or pool_blocks(self.max_batch, self.max_context, block_size))
            self.blocks = BlockManager(nb, block_size, max_context=self.max_context, max_seqs=self.max_batch)
            # KV pool: [layers, 2 (k, v), slots, Hkv, D]
            self.kv = cp.zeros((spec.n_layers, 2, nb * block_size, spec.n_kv_heads, spec.head_dim), dtype=cp.float16)
            self._alloc_decode_buffers()
        self.stream.synchronize()
        self.load_s = time.perf_counter() - t0
        # paged_attn_decode's dynamic shared memory (4-byte words): scores, q, reduction,
        # per-thread V accumulators (8 each), block-table copy
        smem = 4 * (self.max_context + spec.head_dim + 32 + 8 * ATTN_THREADS + self.max_blocks)
        if smem > 48 * 1024:  # opt in to more than 48 KB of dynamic shared memory
            for name in ("paged_attn_decode", "paged_attn_decode_d64", "paged_attn_decode_d128"):
                cp.cuda.driver.funcSetAttribute(self.k[name].ptr, 8, smem)  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        self._attn_smem = smem
        self._graphs: dict[int, Any] = {}
        # one block per row: enough threads that each does a few elements (latency, not bandwidth)
        self._norm_threads = max(128, min(1024, spec.hidden_size // 4 // 32 * 32))
        self.int4_m1_us = self._autotune_int4_m1()

    @staticmethod
    def variant_name(v: tuple[str, int, int]) -> str:
        return f"{v[0]}_w{v[2]}"

    def _autotune_int4_m1(self) -> dict[str, dict[str, float]]:
        """Time the M = 1 int4 GEMV variants on each distinct int4 weight shape; keep the fastest per shape.

        The best variant depends on the shape: a short-K layer (o, qkv) wants many small blocks,
        a long-K one (down, K = 14336) few long-lived warps. Every variant computes a row with the
        same per-lane order and warp reduction (tests/test_cuda_gpu.py checks they agree bit for bit)."""
        cp = self.cp
        lins = [L[k] for L in self.layers for k in ("qkv", "o", "gu", "down")] + [self.lm_head]
        by_shape: dict[str, list[Linear]] = {}
        for lin in lins:
            if lin.kind == "int4":
                by_shape.setdefault(lin.shape_key, []).append(lin)
        if not by_shape:
            return {}
        s0, e0 = cp.cuda.Event(), cp.cuda.Event()
        times: dict[str, dict[str, float]] = {}
        largest, largest_bytes = None, -1
        with self.stream:
            for key, group in by_shape.items():
                lin = group[0]
                x = cp.ones((1, lin.k), dtype=cp.float16)
                y = cp.empty((1, lin.n), dtype=cp.float16)
                t: dict[tuple[str, int, int], float] = {}
                for variant in self.INT4_M1_VARIANTS:
                    lin.m1 = variant
                    self.linear(lin, x, 1, y)
                    ts = []
                    for _ in range(5):
                        s0.record(self.stream)
                        for _ in range(10):
                            self.linear(lin, x, 1, y)
                        e0.record(self.stream)
                        e0.synchronize()
                        ts.append(cp.cuda.get_elapsed_time(s0, e0) * 100)  # us per launch
                    t[variant] = sorted(ts)[len(ts) // 2]
                best = min(self.INT4_M1_VARIANTS, key=lambda v: t[v])
                for other in group:
                    other.m1 = best
                times[key] = {self.variant_name(v): us for v, us in t.items()}
                if lin.nbytes > largest_bytes:
                    largest, largest_bytes = best, lin.nbytes
        self._int4_m1 = largest  # the default for int4 Linears made later (none in a loaded model)
        return times

    # ---- weights ----------------------------------------------------------------------
    def _load_weights(self, w: dict[str, np.ndarray]) -> None:
        cp, spec = self.cp, self.spec
        self.weight_bytes = 0

        def h(name: str) -> Any:
            return cp.asarray(w[name].astype(np.float16, copy=False))

        def linear(names: list[str], bias_names: list[str] | None = None) -> Linear:
            parts = [_host_linear(w, n) for n in names]
            kinds = {(p[0], p[3]) for p in parts}
            if len(kinds) != 1:
                raise BackendError(f"{names}: mixed precisions {sorted(kinds)} cannot be fused", fix="rebuild the bundle with one recipe")
            kind, k, g = parts[0][0], parts[0][4], parts[0][3]
            q = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
            s = (np.concatenate([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]) if kind != "fp16" else None
            n = q.shape[0]
            if kind == "int4":
                if k % 32:
                    raise BackendError(f"{names[0]}: in_features {k} not a multiple of 32")
                raw = cp.asarray(q).view(cp.uint32)  # [N, K/8]
                qd = cp.empty_like(raw)
                cnt = raw.size
                self.k["repack_int4"](((cnt + 255) // 256,), (256,), (raw, qd, np.int64(cnt)))
                del raw
                lin = Linear("int4", n, k, qd, cp.asarray(s), int(math.log2(g)))
            elif kind == "int8":
                if k % 16:
                    raise BackendError(f"{names[0]}: in_features {k} not a multiple of 16")
                lin = Linear("int8", n, k, cp.asarray(q), cp.asarray(s))
            else:
                if k % 8:
                    raise BackendError(f"{names[0]}: in_features {k} not a multiple of 8")
                lin = Linear("fp16", n, k, cp.asarray(q.astype(np.float16, copy=False)), None)
            if bias_names and all(bn in w for bn in bias_names):
                lin.bias = cp.asarray(np.concatenate([w[bn] for bn in bias_names]).astype(np.float16))
            self.weight_bytes += lin.nbytes
            return lin

        self.embed = h("model.embed_tokens.weight")
        self.layers = []
        for i in range(spec.n_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(
                {
                    "ln1": h(p + "input_layernorm.weight"),
                    "ln2": h(p + "post_attention_layernorm.weight"),
                    "qkv": linear([a + "q_proj", a + "k_proj", a + "v_proj"], [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]),
                    "o": linear([a + "o_proj"]),
                    "gu": linear([p + "mlp.gate_proj", p + "mlp.up_proj"]),
                    "down": linear([p + "mlp.down_proj"]),
                }
            )
        self.norm = h("model.norm.weight")
        if "lm_head.qweight" in w or "lm_head.weight" in w:
            self.lm_head = linear(["lm_head"])
        else:  # tied, fp16 recipe: the embedding table is the head
            self.lm_head = Linear("fp16", spec.vocab_size, spec.hidden_size, self.embed, None)
            self.weight_bytes += int(self.embed.nbytes)
        self.weight_bytes += 2 * (2 * spec.n_layers + 1) * spec.hidden_size

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

    def _make_bufs(self, m: int) -> dict[str, Any]:
        cp, s = self.cp, self.spec
        f16 = cp.float16
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
        """y[:m] = x[:m] @ W.T (+ bias); y has row stride lin.n. GEMV for m <= 16."""
        if m > MAX_GEMV_M:
            return self._linear_cublas(lin, x, m, y)
        t = self.k.gemv_tile(m)
        warps = GEMV_ROWS_PER_BLOCK
        if t == 1 and lin.kind == "int4":
            name, r, warps = lin.m1 or self._int4_m1
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

    def dequantize(self, lin: Linear) -> Any:
        """half [N, K] copy of the layer's weight (prefill path)."""
        cp = self.cp
        if lin.kind == "fp16":
            return lin.q
        out = cp.empty((lin.n, lin.k), dtype=cp.float16)
        words = lin.q.size
        grid = ((words + 255) // 256,)
        if lin.kind == "int4":
            self.k["dequant_int4"](grid, (256,), (lin.q, lin.s, out, _i32(lin.n), _i32(lin.k), _i32(lin.gshift)))
        else:
            self.k["dequant_int8"](grid, (256,), (lin.q.view(cp.uint32), lin.s, out, _i32(lin.n), _i32(lin.k)))
        return out

    def _linear_cublas(self, lin: Linear, x: Any, m: int, y: Any) -> None:
        cp = self.cp
        w = self.dequantize(lin)
        cp.matmul(x[:m], w.T, out=y[:m])  # y rows are contiguous: cuBLAS writes in place
        if lin.bias is not None:
            y[:m] += lin.bias

    def _add_rmsnorm(self, res: Any, x: Any, w: Any, out: Any, m: int) -> None:
        self.k["add_rmsnorm"]((m,), (self._norm_threads,), (res, x if x is not None else NULL, w, out, _i32(self.spec.hidden_size), np.float32(self.spec.rms_eps)))

    def _layers(self, m: int, bufs: dict[str, Any], ids: Any, pos: Any, slots: Any, attend) -> None:
        """Embedding -> all layers -> final norm into bufs['h'] (rows [0, m))."""
        k, s = self.k, self.spec
        self.k["embed"]((m,), (256,), (ids, self.embed, bufs["res"], _i32(s.hidden_size)))
        self._add_rmsnorm(bufs["res"], None, self.layers[0]["ln1"], bufs["h"], m)
        rope_threads = 128
        rope_blocks = -(-((s.n_heads + s.n_kv_heads) * s.head_dim // 2 + s.kv_size) // rope_threads)
        for i, L in enumerate(self.layers):
            kc, vc = self.kv[i, 0], self.kv[i, 1]
            self.linear(L["qkv"], bufs["h"], m, bufs["qkv"])
            k["rope_cache"]((m, rope_blocks), (rope_threads,), (bufs["qkv"], pos, slots, self.cos, self.sin, bufs["q"], kc, vc, _i32(s.n_heads), _i32(s.n_kv_heads), _i32(s.head_dim)))
            attend(i, bufs["q"], kc, vc, bufs["a"])
            self.linear(L["o"], bufs["a"], m, bufs["o"])
            self._add_rmsnorm(bufs["res"], bufs["o"], L["ln2"], bufs["h"], m)
            self.linear(L["gu"], bufs["h"], m, bufs["gu"])
            n = m * s.intermediate_size
            k["silu_mul"](((n + 255) // 256,), (256,), (bufs["gu"], bufs["act"], _i32(m), _i32(s.intermediate_size)))
            self.linear(L["down"], bufs["act"], m, bufs["o"])
            nxt = self.layers[i + 1]["ln1"] if i + 1 < len(self.layers) else self.norm
            self._add_rmsnorm(bufs["res"], bufs["o"], nxt, bufs["h"], m)

    # ---- decode -----------------------------------------------------------------------
    def _decode_graph_body(self, bsz: int) -> None:
        s, bufs = self.spec, self._bufs
        ids, pos, slots, ctx, bt = self._inputs()

        attn = {64: "paged_attn_decode_d64", 128: "paged_attn_decode_d128"}.get(s.head_dim, "paged_attn_decode")

        def attend(i, q, kc, vc, out):
            self.k[attn](
                (s.n_heads, bsz), (ATTN_THREADS,),
                (q, kc, vc, bt, ctx, out, _i32(s.n_heads), _i32(s.n_kv_heads), _i32(s.head_dim), _i32(self.block_size),
                 _i32(self.max_blocks), _i32(self.max_context), np.float32(1.0 / math.sqrt(s.head_dim))),
                shared_mem=self._attn_smem,
            )

        self._layers(bsz, bufs, ids, pos, slots, attend)
        self.linear(self.lm_head, bufs["h"], bsz, self._logits, out_f32=True)
        self.k["argmax_rows"]((bsz,), (1024,), (self._logits, self._next, _i32(s.vocab_size)))

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
        mb, host = self.max_batch, self._inp_host
        host[:] = 0
        host[2 * mb : 3 * mb] = -1  # padding rows write no KV
        for r, (sid, tok) in enumerate(zip(seq_ids, token_ids)):
            slot = self.blocks.append(sid, 1)[0]
            length = self.blocks.length(sid)
            table = self.blocks.table(sid)
            host[r] = int(tok)
            host[mb + r] = length - 1
            host[2 * mb + r] = slot
            host[3 * mb + r] = length
            off = 4 * mb + r * self.max_blocks
            host[off : off + len(table)] = table
        with self.stream:
            self._inp.set(host, stream=self.stream)
            if self.use_graphs:
                g = self._graphs.get(bsz)
                if g is None:
                    g = self._capture(bsz)
                g.launch(self.stream)
            else:
                self._decode_graph_body(bsz)
        return bsz

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

    def decode_sample(self, seq_ids: Sequence[int], token_ids: np.ndarray, *, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> np.ndarray:
        """One step with temperature / top-p sampling on the GPU: int32 next ids [B]."""
        self._step(seq_ids, np.asarray(token_ids))
        with self.stream:
            n = len(seq_ids)
            rng = self.cp.random.default_rng(seed)
            u = rng.random((n,), dtype=self.cp.float32)
            ids = sample_top_p(self.cp, self._logits[:n], temperature, top_p, u)
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
                self._prefill_attention(q, kc, vc, all_slots, t, p0, out)

            self._layers(t, bufs, ids_d, pos_d, slots_d, attend)
            logits = cp.empty((1, s.vocab_size), dtype=cp.float32)
            self.linear(self.lm_head, bufs["h"][t - 1 :], 1, logits, out_f32=True)
        return logits

    def _prefill_attention(self, q: Any, kc: Any, vc: Any, all_slots: Any, t: int, p0: int, out: Any) -> None:
        """Causal attention of t new queries over the sequence's p0 + t cached keys (cuBLAS).

        Queries go in chunks of PREFILL_Q_CHUNK: chunk [t0, t1) only multiplies keys
        [0, p0 + t1), so a long prompt does about half the work of a full square."""
        cp, s = self.cp, self.spec
        hkv, g, d = s.n_kv_heads, s.n_heads // s.n_kv_heads, s.head_dim
        # queries grouped by kv head: [T, Hkv, G, D] -> [Hkv, G, T, D], pre-scaled by 1/sqrt(D)
        qh = q[:t].reshape(t, hkv, g, d).transpose(1, 2, 0, 3) * np.float16(1.0 / math.sqrt(d))
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
            self.k["causal_softmax"]((hkv * g * tc,), (256,), (sc, _i32(lc), _i32(tc), _i32(p0 + t0)))
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

    # ---- sequences --------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        self.blocks.add(seq_id)

    def release(self, seq_id: int) -> None:
        self.blocks.release(seq_id)

    def length(self, seq_id: int) -> int:
        return self.blocks.length(seq_id)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def generate_greedy(self, prompt: np.ndarray, max_new_tokens: int, seq_id: int = -1) -> list[int]:
        """Greedy tokens for one prompt (a convenience for tests and benchmarks; no stop tokens)."""
        self.add_sequence(seq_id)
        try:
            tok = self.prefill_greedy(seq_id, prompt)
            out = [tok]
            for _ in range(max_new_tokens - 1):
                tok = int(self.decode_greedy([seq_id], np.array([tok]))[0])
                out.append(tok)
            return out
        finally:
            self.release(seq_id)


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


def _host_linear(w: dict[str, np.ndarray], name: str) -> tuple[str, np.ndarray, np.ndarray | None, int, int]:
    """(kind, q, scales, group, K) of linear `name` in the bundle layout."""
    if f"{name}.qweight" in w:
        q, s = w[f"{name}.qweight"], w[f"{name}.scales"]
        if q.dtype == np.uint8:
            k = 2 * q.shape[1]
            return "int4", q, s.astype(np.float16, copy=False), k // s.shape[1], k
        return "int8", q, s.astype(np.float16, copy=False), 0, q.shape[1]
    if f"{name}.weight" in w:
        q = w[f"{name}.weight"]
        return "fp16", q, None, 0, q.shape[1]
    raise BackendError(f"bundle lacks weights for {name}", fix="rebuild the bundle")
