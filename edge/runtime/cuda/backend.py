"""CudaBackend: the engine's EngineBackend (edge.runtime.session) on the CUDA kernels.

    backend = CudaBackend(bundle)            # KV pool, batch size, context: the manifest's limits
    out = backend.execute(step_batch)        # one engine step -> StepOutput
    for tok in backend.run_greedy(batch, max_new): ...   # one greedy request, host-free

The engine's BlockManager owns the KV blocks; this backend owns only the pool they index
(caps.num_blocks blocks of caps.block_size tokens) and writes each token's K/V at
batch.slot_mapping.

    decode-only step (every row one token)  -> the session's CUDA graph for the batch bucket
                                               (inputs: one int32 block copied to the device)
    launch(batch) -> handle; handle.result()  -> execute() in two halves (caps.async_steps): launch
                                               queues the step and the read-back of its sampled
                                               ids and returns; a row named in batch.prev_rows
                                               takes the previous launch's sampled id on the
                                               device, so the engine plans step N+1 while N runs
    step with prefill chunks                -> every token of the step through the layers at
                                               once (GEMMs over all T tokens); attention per
                                               row: the paged decode kernel for one-token rows,
                                               causal attention over the block table for chunks
    sampling (on the GPU)                   -> argmax for greedy rows; temperature / top-k /
                                               top-p from the row's own uniform otherwise;
                                               only host_sample rows bring logits back
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edge.bundle import Bundle
from edge.errors import BackendError
from edge.runtime.cuda.sampling import sample_rows
from edge.runtime.step import I32, BackendCaps, StepBatch, StepOutput

FP16_BYTES = 2
RING = 3  # pinned input / output buffers per launch in flight (the engine keeps at most 2 unread)

# Row r's input id <- the previous launch's sampled id of row prev[r] (tok[r]: the token index of
# row r's last token; has_tok 0: a decode-only step, row r is token r).
_TAKE_PREV_SRC = r"""
extern "C" __global__ void take_prev_ids(int* ids, const int* tok, int has_tok, const int* prev, const int* last, int rows) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows && prev[r] >= 0) ids[has_tok ? tok[r] : r] = last[prev[r]];
}
"""


def kv_bytes_per_block(spec: Any, block_size: int, kv_dtype: str = "fp16") -> int:
    """K and V of every layer for one block. int8: one fp16 scale per token and KV head (the
    planner's formula, edge.plan.kv_bytes_per_token)."""
    per_token = 2 * spec.n_layers * spec.n_kv_heads * (spec.head_dim * FP16_BYTES if kv_dtype == "fp16" else spec.head_dim + 2)
    return per_token * block_size


def plan_limits(bundle: Bundle) -> dict[str, Any]:
    """What the manifest's limits (edge.bundle.Limits) ask the runtime to allocate."""
    lim = bundle.limits
    return {"max_context": lim.max_context, "max_batch": lim.max_batch, "kv_blocks": lim.kv_blocks,
            "kv_block_size": lim.kv_block_size, "kv_dtype": lim.kv_dtype}


def pool_blocks(spec: Any, lim: dict[str, Any], max_batch: int, max_context: int, block_size: int) -> int:
    """KV blocks this backend allocates for the plan: the manifest's kv_blocks (else every
    sequence at max_context).

    NOTE: int8 KV is not implemented on this backend: a plan that sized the pool for int8 gets
    an fp16 pool of the same bytes (fewer tokens, at least one max_context sequence), so the
    memory plan still holds."""
    one_seq = -(-max_context // block_size)
    if not lim["kv_blocks"]:
        return max_batch * one_seq
    tokens = lim["kv_blocks"] * lim["kv_block_size"]  # the planned pool, whatever block size runs it
    nb = -(-tokens // block_size)
    if lim["kv_dtype"] == "int8":
        nb = nb * kv_bytes_per_block(spec, block_size, "int8") // kv_bytes_per_block(spec, block_size, "fp16")
    return max(one_seq, nb)


class CudaBackend:
    """EngineBackend over a CudaDecoderSession (weights, kernels, graphs, KV pool).

    `CudaBackend.open(bundle)` loads a session sized by the manifest's limits;
    `CudaDecoderSession.caps / execute / run_greedy` delegate to a CudaBackend of itself, so the
    session that open_session() returns is an engine backend as it is."""

    def __init__(self, session: Any, *, batch_invariant: bool = False, async_steps: bool | None = None):
        s = self.session = session
        if async_steps is None:  # EDGE_RAG_CUDA_ASYNC_STEPS=0: the engine runs one step at a time (as before)
            async_steps = os.environ.get("EDGE_RAG_CUDA_ASYNC_STEPS", "1") != "0"
        s._backend = self
        if batch_invariant:
            s.set_batch_invariant(True)
        self.cp = s.cp
        self.caps = BackendCaps(backend="cuda",
            num_blocks=s.blocks.num_blocks, block_size=s.block_size, max_seqs=s.max_batch, max_context=s.max_context,
            vocab_size=s.vocab_size, kv_layout="paged", device_sampling=True, mixed_rows=True, greedy_stream=True,
            kv_dtype="fp32" if s.act_dtype == "float32" else "fp16", kv_bytes=int(s.kv.nbytes), async_steps=async_steps,
        )
        self._ring: list[dict] | None = None  # per launch slot: pinned inputs, pinned sampled ids, event
        self._launches = 0
        self._last_ids = None  # device int32 by row: the last launch's sampled ids (prev_rows read them)

    @classmethod
    def open(cls, bundle: Bundle | str | Path, *, max_batch: int | None = None, max_context: int | None = None,
             device: int = 0, verify: bool = True, batch_invariant: bool = False, precision: str = "auto") -> "CudaBackend":
        """A session with the plan's batch size (unless given), context and KV pool; `precision`
        as edge.runtime.cuda.open_session's (auto: fp32 compute for an fp32 bundle)."""
        from edge.runtime.cuda import open_session

        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, kind="generator", verify=verify)
        mb = int(max_batch or plan_limits(b)["max_batch"])
        return cls(open_session(b, precision=precision, max_batch=mb, max_context=max_context, device=device), batch_invariant=batch_invariant)

    # ---- the step ----------------------------------------------------------------------
    def execute(self, batch: StepBatch) -> StepOutput:
        return self.launch(batch).result()

    def launch(self, batch: StepBatch) -> "_Launched":
        """Queue the step on the session's stream, and the copy of its sampled ids into pinned host
        memory, and return without waiting; result() waits. A row named in batch.prev_rows takes
        the previous launch's sampled id on the device. Read back in launch order; at most
        RING - 1 launches unread (launching past that reads the oldest first)."""
        r = batch.num_rows
        if r > self.caps.max_seqs:
            raise BackendError(f"{r} rows in one step exceed max_seqs {self.caps.max_seqs}")
        if self._ring is None:
            self._alloc_ring()
        slot = self._ring[self._launches % RING]
        if slot["unread"] is not None:  # its pinned buffers are about to be reused
            slot["unread"].result()
        for other in self._ring:  # a host-sampled row's logits live in buffers this step overwrites
            if other["unread"] is not None and other["unread"].host_rows.size:
                other["unread"].result()
        if batch.has_prev_rows and self._last_ids is None:
            raise BackendError("StepBatch.prev_rows names a previous step's ids, but none was launched")
        self._launches += 1
        if r == 0:
            return _Launched(self, slot, r, np.zeros(0, np.int64), np.zeros(0, np.int64), None)
        if len(batch.block_copies):
            self._copy_blocks(batch.block_copies)
        if batch.is_decode_only:
            logits, greedy = self._decode(batch, slot)
            rows = np.arange(r)
        else:
            logits, greedy, rows = self._mixed(batch, slot)
        return self._sample(batch, logits, greedy, rows, slot)

    def _alloc_ring(self) -> None:
        import cupyx

        s, cp = self.session, self.cp
        n = s._inp_host.size + s.max_batch  # the step's int32 inputs, then prev_rows
        self._ring = [{"inp": cupyx.empty_pinned((n,), np.int32), "out": cupyx.empty_pinned((s.max_batch,), np.int32),
                       "ev": cp.cuda.Event(block=False, disable_timing=True), "unread": None} for _ in range(RING)]
        self._prev_d = cp.zeros(s.max_batch, dtype=cp.int32)
        self._take_prev = cp.RawKernel(_TAKE_PREV_SRC, "take_prev_ids")

    def _take_prev_ids(self, b: StepBatch, ids: Any, tok: Any, host: np.ndarray) -> None:
        """On the stream: row r's last token id <- the last launch's sampled id of row prev_rows[r]
        (host: pinned scratch of R ints that stays untouched until the copy has run)."""
        s, r = self.session, b.num_rows
        host[:r] = b.prev_rows
        self._prev_d[:r].set(host[:r], stream=s.stream)
        has_tok = tok is not None
        self._take_prev(((r + 127) // 128,), (128,), (ids, tok if has_tok else self._prev_d, np.int32(has_tok), self._prev_d, self._last_ids, np.int32(r)))

    def _decode(self, b: StepBatch, slot: dict) -> tuple[Any, Any]:
        s = self.session
        mb, r = s.max_batch, b.num_rows
        n_inp = s._inp_host.size
        inp = slot["inp"][:n_inp]  # pinned, so the copy is asynchronous; reused RING launches later
        inp[:] = 0
        inp[2 * mb : 3 * mb] = -1  # padding rows of the bucket write no KV
        inp[:r] = b.token_ids
        inp[mb : mb + r] = b.positions
        inp[2 * mb : 2 * mb + r] = b.slot_mapping
        inp[3 * mb : 3 * mb + r] = b.seq_lens
        w = min(b.block_tables.shape[1], s.max_blocks)
        inp[4 * mb :].reshape(mb, s.max_blocks)[:r, :w] = b.block_tables[:, :w]
        with s.stream:
            s._inp.set(inp, stream=s.stream)
            if b.has_prev_rows:  # the ids input: the first mb ints of _inp
                self._take_prev_ids(b, s._inp, None, slot["inp"][n_inp:])
            s._run_step(s._bucket(r))
        return s._logits[:r], s._next[:r]

    def _mixed(self, b: StepBatch, slot: dict) -> tuple[Any, Any, np.ndarray]:
        """A step with prefill chunks: all T tokens through the layers together."""
        s, cp = self.session, self.cp
        t, qs = b.num_tokens, b.query_start
        n_new = np.diff(qs)
        dec = np.nonzero(n_new == 1)[0]
        pre = np.nonzero(n_new > 1)[0]
        bs = self.caps.block_size
        w = min(b.block_tables.shape[1], s.max_blocks)
        with s.stream:
            d = cp.asarray(np.concatenate([b.token_ids, b.positions, b.slot_mapping]).astype(I32, copy=False))
            ids_d, pos_d, slots_d = d[:t], d[t : 2 * t], d[2 * t :]
            if b.has_prev_rows:  # decode rows behind a launch whose ids are still on the device
                self._take_prev_ids(b, ids_d, cp.asarray((qs[1:] - 1).astype(I32)), slot["inp"][s._inp_host.size :])
            bufs = s._make_bufs(t)
            pre_slots = []
            for r in pre:  # slots of the row's cached positions [0, seq_len), new ones included
                p = np.arange(int(b.seq_lens[r]))
                pre_slots.append(cp.asarray((b.block_tables[r, p // bs] * bs + p % bs).astype(I32)))
            if len(dec):
                bt = np.zeros((len(dec), s.max_blocks), I32)
                bt[:, :w] = np.maximum(b.block_tables[dec, :w], 0)
                dec_tok = cp.asarray(qs[dec].astype(I32))
                bt_d, ctx_d = cp.asarray(bt), cp.asarray(b.seq_lens[dec].astype(I32))
                q_dec = cp.empty((len(dec), s.spec.q_size), dtype=s.act_dtype)
                a_dec = cp.empty_like(q_dec)

            def attend(i, q, kc, vc, out):
                for j, r in enumerate(pre):
                    t0, t1 = int(qs[r]), int(qs[r + 1])
                    s._prefill_attention(q[t0:t1], kc, vc, pre_slots[j], t1 - t0, int(b.seq_lens[r]) - (t1 - t0), out[t0:t1], layer=i)
                if len(dec):
                    cp.take(q, dec_tok, axis=0, out=q_dec)
                    s.decode_attention(q_dec, kc, vc, bt_d, ctx_d, a_dec, len(dec), layer=i)
                    out[dec_tok] = a_dec

            s._layers(t, bufs, ids_d, pos_d, slots_d, attend)
            rows = np.nonzero(b.logits_rows)[0]
            if len(rows) == 0:
                return None, None, rows
            h = cp.take(bufs["h"], cp.asarray((qs[rows + 1] - 1).astype(I32)), axis=0)
            logits = cp.empty((len(rows), s.vocab_size), dtype=cp.float32)
            s.lm_head_logits(h, len(rows), logits)
            greedy = cp.argmax(logits, axis=1).astype(cp.int32)
        return logits, greedy, rows

    def _sample(self, b: StepBatch, logits: Any, greedy: Any, rows: np.ndarray, slot: dict) -> "_Launched":
        """Queue the sampled ids of `rows` (the batch rows whose logits are logits[i]) and their copy
        to the slot's pinned buffer; host-sampled rows' logits are read by result()."""
        cp, s = self.cp, self.session
        if len(rows) == 0:
            return _Launched(self, slot, b.num_rows, rows, rows, None)
        host = b.host_sample[rows] != 0
        dev = (~host) & (b.temperature[rows] > 0)
        with s.stream:
            ids = greedy
            if dev.any():
                i = np.nonzero(dev)[0]
                r = rows[i]
                ids = greedy.copy()
                ids[cp.asarray(i.astype(I32))] = sample_rows(cp, logits[cp.asarray(i.astype(I32))], b.temperature[r], b.top_p[r], b.top_k[r], b.uniform[r])
            if len(rows) == b.num_rows:
                self._last_ids = ids  # by row: what the next launch's prev_rows index
            else:
                last = cp.full(b.num_rows, -1, dtype=cp.int32)
                last[cp.asarray(rows.astype(I32))] = ids
                self._last_ids = last
            ids.get(stream=s.stream, out=slot["out"][: len(rows)], blocking=False)
            slot["ev"].record(s.stream)
        return _Launched(self, slot, b.num_rows, rows, rows[host], logits if host.any() else None)

    def _copy_blocks(self, copies: np.ndarray) -> None:
        """KV of block src -> block dst, every layer (paged engines rarely need it: shared blocks
        are read in place)."""
        s, bs = self.session, self.caps.block_size
        with s.stream:
            for src, dst in np.asarray(copies).reshape(-1, 2):
                s.kv[:, :, int(dst) * bs : (int(dst) + 1) * bs] = s.kv[:, :, int(src) * bs : (int(src) + 1) * bs]

    # ---- the greedy fast path ------------------------------------------------------------
    def run_greedy(self, batch: StepBatch, max_new: int, *, depth: int = 3) -> Iterator[int]:
        """Continue one greedy row on the device: `batch` is its first decode step (one row, one
        token) and its block table already covers max_new tokens. Yields up to max_new tokens
        (fewer where the context ends); closing the iterator stops it. Same tokens as execute()
        step by step."""
        s = self.session
        if batch.num_rows != 1 or batch.num_tokens != 1:
            raise BackendError("run_greedy takes a one-row, one-token decode step")
        pos = int(batch.positions[0])
        n = min(int(max_new), s.max_context - pos)
        if n <= 0:
            return
        table = batch.block_tables[0]
        have = int(np.sum(table >= 0))
        if have * self.caps.block_size < pos + n:
            raise BackendError(f"run_greedy: the block table holds {have} blocks, {pos + n} tokens need more")
        if len(batch.block_copies):
            self._copy_blocks(batch.block_copies)
        mb = s.max_batch
        host = s._inp_host
        host[:] = 0
        host[2 * mb : 3 * mb] = -1
        host[0], host[mb], host[2 * mb], host[3 * mb] = int(batch.token_ids[0]), pos, int(batch.slot_mapping[0]), pos + 1
        w = min(len(table), s.max_blocks)
        host[4 * mb : 4 * mb + w] = table[:w]
        yield from s.stream_steps(pos, n, depth)


class _Launched:
    """A launched step: result() waits for its sampled ids (and reads host-sampled rows' logits)."""

    def __init__(self, backend: CudaBackend, slot: dict, num_rows: int, rows: np.ndarray, host_rows: np.ndarray, logits: Any):
        self.backend, self.slot, self.num_rows = backend, slot, num_rows
        self.rows, self.host_rows, self.logits = rows, host_rows, logits
        self._out: StepOutput | None = None
        slot["unread"] = self

    def result(self) -> StepOutput:
        if self._out is not None:
            return self._out
        be, s = self.backend, self.backend.session
        sampled = np.full(self.num_rows, -1, I32)
        out_logits = None
        if len(self.rows):
            self.slot["ev"].synchronize()
            sampled[self.rows] = self.slot["out"][: len(self.rows)]
            if self.host_rows.size:
                i = np.searchsorted(self.rows, self.host_rows)  # their places among `rows`
                with s.stream:
                    hl = self.logits[be.cp.asarray(i.astype(I32))].get(stream=s.stream)
                s.stream.synchronize()
                out_logits = np.zeros((self.num_rows, s.vocab_size), np.float32)
                out_logits[self.host_rows] = hl
                sampled[self.host_rows] = -1
        self._out = StepOutput(sampled, out_logits)
        self.logits = None
        if self.slot["unread"] is self:
            self.slot["unread"] = None
        return self._out
