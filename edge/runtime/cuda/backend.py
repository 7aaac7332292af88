"""CudaBackend: the engine's EngineBackend (edge.runtime.session) on the CUDA kernels.

    backend = CudaBackend(bundle)            # KV pool, batch size, context: the manifest's limits
    out = backend.execute(step_batch)        # one engine step -> StepOutput
    for tok in backend.run_greedy(batch, max_new): ...   # one greedy request, host-free

The engine's BlockManager owns the KV blocks; this backend owns only the pool they index
(caps.num_blocks blocks of caps.block_size tokens) and writes each token's K/V at
batch.slot_mapping.

    decode-only step (every row one token)  -> the session's CUDA graph for the batch bucket
                                               (inputs: one int32 block copied to the device)
    step with prefill chunks                -> every token of the step through the layers at
                                               once (GEMMs over all T tokens); attention per
                                               row: the paged decode kernel for one-token rows,
                                               causal attention over the block table for chunks
    sampling (on the GPU)                   -> argmax for greedy rows; temperature / top-k /
                                               top-p from the row's own uniform otherwise;
                                               only host_sample rows bring logits back
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edge.bundle import Bundle
from edge.errors import BackendError
from edge.runtime.cuda.sampling import sample_rows
from edge.runtime.step import I32, BackendCaps, StepBatch, StepOutput

FP16_BYTES = 2


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

    def __init__(self, session: Any, *, batch_invariant: bool = False):
        s = self.session = session
        s._backend = self
        if batch_invariant:
            s.set_batch_invariant(True)
        self.cp = s.cp
        self.caps = BackendCaps(
            num_blocks=s.blocks.num_blocks, block_size=s.block_size, max_seqs=s.max_batch, max_context=s.max_context,
            vocab_size=s.vocab_size, kv_layout="paged", device_sampling=True, mixed_rows=True, greedy_stream=True,
            kv_dtype="fp32" if s.act_dtype == "float32" else "fp16", kv_bytes=int(s.kv.nbytes),
        )

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
        r = batch.num_rows
        if r == 0:
            return StepOutput(np.zeros(0, I32))
        if r > self.caps.max_seqs:
            raise BackendError(f"{r} rows in one step exceed max_seqs {self.caps.max_seqs}")
        if len(batch.block_copies):
            self._copy_blocks(batch.block_copies)
        if batch.is_decode_only:
            logits, greedy = self._decode(batch)
            rows = np.arange(r)
        else:
            logits, greedy, rows = self._mixed(batch)
        return self._sample(batch, logits, greedy, rows)

    def _decode(self, b: StepBatch) -> tuple[Any, Any]:
        s = self.session
        mb, r = s.max_batch, b.num_rows
        host = s._inp_host
        host[:] = 0
        host[2 * mb : 3 * mb] = -1  # padding rows of the bucket write no KV
        host[:r] = b.token_ids
        host[mb : mb + r] = b.positions
        host[2 * mb : 2 * mb + r] = b.slot_mapping
        host[3 * mb : 3 * mb + r] = b.seq_lens
        w = min(b.block_tables.shape[1], s.max_blocks)
        host[4 * mb :].reshape(mb, s.max_blocks)[:r, :w] = b.block_tables[:, :w]
        with s.stream:
            s._inp.set(host, stream=s.stream)
            s._run_step(s._bucket(r))
        return s._logits[:r], s._next[:r]

    def _mixed(self, b: StepBatch) -> tuple[Any, Any, np.ndarray]:
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

    def _sample(self, b: StepBatch, logits: Any, greedy: Any, rows: np.ndarray) -> StepOutput:
        """Sampled ids for `rows` (the batch rows whose logits are logits[i]); -1 elsewhere."""
        cp, s = self.cp, self.session
        sampled = np.full(b.num_rows, -1, I32)
        if len(rows) == 0:
            return StepOutput(sampled)
        host = b.host_sample[rows] != 0
        dev = (~host) & (b.temperature[rows] > 0)
        with s.stream:
            ids = greedy
            if dev.any():
                i = np.nonzero(dev)[0]
                r = rows[i]
                ids = greedy.copy()
                ids[cp.asarray(i.astype(I32))] = sample_rows(cp, logits[cp.asarray(i.astype(I32))], b.temperature[r], b.top_p[r], b.top_k[r], b.uniform[r])
            got = ids.get(stream=s.stream)
            out_logits = None
            if host.any():
                hl = logits[cp.asarray(np.nonzero(host)[0].astype(I32))].get(stream=s.stream)
                out_logits = np.zeros((b.num_rows, s.vocab_size), np.float32)
                out_logits[rows[host]] = hl
        s.stream.synchronize()
        sampled[rows] = got
        sampled[rows[host]] = -1
        return StepOutput(sampled, out_logits)

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
        mb = s.max_batch
        host = s._inp_host
        host[:] = 0
        host[2 * mb : 3 * mb] = -1
        host[0], host[mb], host[2 * mb], host[3 * mb] = int(batch.token_ids[0]), pos, int(batch.slot_mapping[0]), pos + 1
        w = min(len(table), s.max_blocks)
        host[4 * mb : 4 * mb + w] = table[:w]
        yield from s.stream_steps(pos, n, depth)
