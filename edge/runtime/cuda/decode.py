"""Decode steps (a mixin of CudaDecoderSession): the step's inputs, one CUDA graph per batch
bucket (1, 2, 4, ..., max_batch), decode attention, the host-free greedy stream and sampling.

A step copies one small int32 block (ids, positions, slots, lengths, block tables) to the device,
replays the bucket's graph and reads back logits or sampled ids.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from edge.errors import BackendError
from edge.runtime.cuda.kernels import i32 as _i32
from edge.runtime.cuda.pdl import PdlKernels
from edge.runtime.cuda.sampling import sample_top_p

ATTN_THREADS = 256
LR_THREADS = 64  # paged_attn_lr: tokens a tile = threads a block (attention.cu LR_TT)
# paged_attn_lc8: paged_attn_lr's blocks as one thread-block cluster per (head, sequence), merged
# through distributed shared memory (sm_90+); grid z = the cluster's blocks = the most splits
CLUSTER_SPLITS = {"paged_attn_lc8": 8}
ARGMAX_BLOCKS = 64  # blocks per row of the decode step's argmax
ATTN_MAX_SPLITS = 8  # decode attention: at most this many blocks per (head, sequence)
MAX_STREAM_DEPTH = 16  # greedy_stream: most steps queued ahead of the host
ATTN_MIN_SPLIT = 128  # ... and at least this many tokens per block (bench/bench_attention.py)
GQA_MIN_BLOCKS = 64  # decode attention per kv head (paged_attn_gqa*) once rows x kv heads reach this many blocks


def lr_smem(head_dim: int) -> int:
    """paged_attn_lr's dynamic shared memory, bytes: two stages of K and V tiles (half), q and a
    tile's probabilities (float), 32 floats of reduction."""
    return 2 * 2 * LR_THREADS * head_dim * 2 + 4 * (head_dim + LR_THREADS + 32)


def _buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


class DecodeSteps:
    """The decode side of the session: buffers, graphs per bucket, attention, greedy stream, sampling."""

    gqa_attention = True  # batched steps: one attention block per kv head for all its query heads
    # the split decode attention (+ _d64 / _d128); None: split_kernel() decides. "paged_attn_lr" (64
    # threads, K / V through shared memory: resident beside the qkv GEMV; head_dim 128 only),
    # "paged_attn_lc8" (lr's blocks, 8 splits as one cluster merged in shared memory; sm_90+),
    # "paged_attn_split_tk" (256 threads), "paged_attn_split_tk0" / "_tk1" (tk before session 12)
    attn_split_kernel: str | None = None
    attn_min_split_b1: int | None = None  # tokens per attention split at one row (None: attn_min_split_rows(1))
    gqa_min_blocks = GQA_MIN_BLOCKS
    _gqa: tuple[str, int] | None = None  # (kernel, dynamic shared memory) when this model can use it

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

    def _inputs(self) -> tuple[Any, Any, Any, Any, Any]:
        mb, i = self.max_batch, self._inp
        return i[0:mb], i[mb : 2 * mb], i[2 * mb : 3 * mb], i[3 * mb : 4 * mb], i[4 * mb :]

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

    def _setup_gqa_attention(self) -> None:
        """Pick paged_attn_gqa{4,8}_d{64,128} for this model (query heads per kv head <= 8, head_dim
        64 / 128) and raise its shared-memory limit; none when it does not fit the GPU's."""
        s = self.spec
        g = s.n_heads // s.n_kv_heads
        if s.head_dim not in (64, 128) or s.n_heads % s.n_kv_heads or not 1 < g <= 8:
            return
        gm = 4 if g <= 4 else 8
        words = gm * self.max_context + gm * s.head_dim + 32 * gm + (ATTN_THREADS // 32) * gm * s.head_dim + self.max_blocks
        smem = 4 * words
        limit = int(self.cp.cuda.runtime.deviceGetAttribute(97, self.device.id))  # cudaDevAttrMaxSharedMemoryPerBlockOptin
        if smem > limit:
            return
        name = f"paged_attn_gqa{gm}_d{s.head_dim}"
        if smem > 48 * 1024:
            self.k[name].max_dynamic_shared_size_bytes = smem
        self._gqa = (name, smem)

    def attn_gqa(self, rows: int) -> bool:
        """Does a decode step of `rows` sequences run attention per kv head? When the grid has
        enough blocks (at one row the per-query-head kernel's wider grid is faster: bench_cuda's
        b1 figures), and never in batch_invariant mode (one kernel at every batch size)."""
        return (self._gqa is not None and self.gqa_attention and not self.batch_invariant
                and rows * self.spec.n_kv_heads >= self.gqa_min_blocks)

    def attn_gqa_splits(self, rows: int) -> int:
        """Split blocks per (kv head, sequence): about two blocks per SM in all (a sequence still
        uses at most one per ATTN_MIN_SPLIT tokens), at most _attn_splits (the partials' room)."""
        return max(1, min(self._attn_splits, -(-2 * self.sms // (self.spec.n_kv_heads * rows))))

    def attn_grid_splits(self, rows: int) -> int:
        """Split blocks per (head, sequence) of a decode step of `rows` sequences: about two blocks
        per SM in all, at most _attn_splits. A wider grid only adds blocks that return at once (a
        sequence uses one split per ATTN_MIN_SPLIT tokens): at 16 rows of Llama-3.2-1B, 8 splits
        made 4,096 blocks, 42 us a layer, for 512 that work. batch_invariant keeps _attn_splits at
        every batch size, so a row's sums never depend on the rest of its batch."""
        if self.batch_invariant:
            return self._attn_splits
        return max(1, min(self._attn_splits, -(-2 * self.sms // (self.spec.n_heads * rows))))

    def attn_min_split_rows(self, rows: int) -> int:
        """Fewest tokens per attention split in a step of `rows` sequences: attn_min_split, and at
        one row attn_min_split_b1, or attn_min_split counted in head_dim-64 tokens (the same K / V
        bytes per split: 64 tokens at head_dim 128). One row's step measured on the H200 (bench_cuda
        bk_ab, ~190 tokens, replay ms): Llama-3-8B 1.946 at 64 against 1.977 at 128 and 2.009 at 256;
        Llama-3.2-1B 0.531 at 128 against 0.536 at 64 and 0.545 at 256 (bench/CUDA_NOTES.md session 8).
        With paged_attn_lc8 (its merge in shared memory is cheaper) half that: 32 tokens at head_dim 128
        (session 13, Llama-3-8B, ~256 tokens, one process: 1.6232 ms at 64 -> 1.5864 at 32).
        batch_invariant: attn_min_split at every batch size (a row's splits never depend on its batch)."""
        if rows != 1 or self.batch_invariant:
            return self.attn_min_split
        if self.attn_min_split_b1:
            return self.attn_min_split_b1
        tokens = 32 if self.split_kernel(1) in CLUSTER_SPLITS else 64
        return max(1, self.attn_min_split * tokens // self.spec.head_dim)

    def split_kernel(self, rows: int = 1) -> str:
        """The split decode attention kernel of a step of `rows` sequences (less its _d suffix):
        attn_split_kernel if set; at head_dim 128 paged_attn_lc8 for one row on sm_90+ (session 13,
        H200, same process: Llama-3-8B step 1.661 -> 1.627 ms against lr at lr's splits of 64 tokens
        or more, 1.586 at 32: attn_min_split_rows; measured at one row only,
        and batch_invariant keeps one kernel at every batch size) and paged_attn_lr otherwise (session
        12: 1.700 -> 1.668 ms against paged_attn_split_tk); paged_attn_split_tk at head_dim 64 (lr's
        head_dim-64 form made the Llama-3.2-1B step slower, 0.478 -> 0.524 ms, and is not built)."""
        if self.attn_split_kernel:
            return self.attn_split_kernel
        if self.spec.head_dim != 128:
            return "paged_attn_split_tk"
        if rows == 1 and self.k.cc >= 90 and not self.batch_invariant:
            return "paged_attn_lc8"
        return "paged_attn_lr"

    def decode_attention(self, q: Any, kc: Any, vc: Any, bt: Any, ctx: Any, out: Any, rows: int, *, layer: int) -> None:
        """One query per row over its paged cache: q, out half [rows, Hq*D]; bt int32
        [rows, max_blocks]; ctx int32 [rows] cached tokens (0: a padding row). `layer`: whose
        sliding window applies."""
        s = self.spec
        scale = self.attn_scale
        feats = (self.layers[layer]["window"], self.attn_softcap)
        min_split = self.attn_min_split_rows(rows)
        if self.attn_gqa(rows):  # P blocks per (kv head, sequence), each for all its query heads
            name, smem = self._gqa
            self.k[name](
                (s.n_kv_heads, rows, self.attn_gqa_splits(rows)), (ATTN_THREADS,),
                (q, kc, vc, bt, ctx, out, self._attn_part_o, self._attn_part_ml, self._attn_tickets, _i32(s.n_heads),
                 _i32(s.n_kv_heads), _i32(self.block_size), _i32(self.max_blocks), _i32(self.max_context), scale,
                 _i32(min_split), *feats),
                shared_mem=smem,
            )
        elif s.head_dim in (64, 128):  # split-sequence kernel, P blocks per (head, sequence)
            name = self.split_kernel(rows)
            cluster = CLUSTER_SPLITS.get(name, 0)
            lr = name == "paged_attn_lr" or cluster > 0
            if lr and s.head_dim != 128:
                raise BackendError(f"{name} is built for head_dim 128 only")
            if cluster and self.k.cc < 90:
                raise BackendError(f"{name} needs thread-block clusters (compute capability 9.0+), not {self.k.cc / 10:.1f}")
            self.k[f"{name}_d{s.head_dim}"](
                (s.n_heads, rows, cluster or self.attn_grid_splits(rows)), (LR_THREADS if lr else ATTN_THREADS,),
                (q, kc, vc, bt, ctx, out, self._attn_part_o, self._attn_part_ml, self._attn_tickets, _i32(s.n_heads),
                 _i32(s.n_kv_heads), _i32(self.block_size), _i32(self.max_blocks), _i32(self.max_context), scale,
                 _i32(min_split), *feats),
                shared_mem=lr_smem(s.head_dim) if lr else self._attn_smem,
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
        """The decode step of bucket bsz as one CUDA graph, its kernels launched programmatically
        (pdl.py) where the device and driver can; if that capture fails, once without."""
        real = self.k
        if self.pdl:
            self.k = PdlKernels(real, self.cp)
        try:
            self.stream.begin_capture()
            try:
                self._decode_graph_body(bsz)
            finally:
                g = self.stream.end_capture()
        except Exception as e:  # noqa: BLE001 (any capture or launch failure: the plain graph is the fallback)
            if not self.pdl:
                raise
            self.pdl, self.pdl_error = False, f"{type(e).__name__}: {e}"
            self.k = real
            return self._capture(bsz)
        finally:
            self.k = real
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
