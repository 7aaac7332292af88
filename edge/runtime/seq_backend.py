"""SequenceBackend: the engine's execute(StepBatch) over a per-sequence DecoderSession
(add_sequence / prefill / decode / release), for backends that manage their own KV cache
(TensorRT: edge.runtime.trt_session). Untested on TensorRT itself; tested here over ONNX Runtime.

Each engine region (contiguous KV layout) is one live sequence of the session: a row starting at
position 0 opens a fresh sequence in its region; prompt pieces are session.prefill calls; rows
adding one token go through one batched session.decode. Such a session cannot start a sequence
after a cached prefix nor move one to another region, so `prefix_cache` and `copies_blocks` are off.
"""

from __future__ import annotations

import numpy as np

from edge.errors import BackendError
from edge.runtime.step import BackendCaps, StepBatch, StepOutput

BLOCK = 32  # KV accounting granularity (the session owns the memory)


class SequenceBackend:
    def __init__(self, session):
        self.session = session
        self._seq: dict[int, int] = {}  # region -> session sequence id
        self._next = 0
        bps = -(-session.max_context // BLOCK)
        self.caps = BackendCaps(num_blocks=session.max_batch * bps, block_size=BLOCK, max_seqs=session.max_batch,
                                max_context=session.max_context, vocab_size=session.vocab_size,
                                kv_layout="contiguous", prefix_cache=False, copies_blocks=False)

    def execute(self, batch: StepBatch) -> StepOutput:
        if batch.block_copies.size:
            raise BackendError("this backend cannot copy cached prefix blocks")
        bps = -(-self.caps.max_context // BLOCK)
        regions = (batch.block_tables[:, 0] // bps).tolist()
        out = np.empty((batch.num_rows, self.caps.vocab_size), np.float32)
        singles = []
        for r, region in enumerate(regions):
            toks = batch.row_tokens(r)
            start = int(batch.seq_lens[r]) - len(toks)
            if start == 0:  # a new sequence in this region (or a preempted one, recomputed)
                old = self._seq.pop(region, None)
                if old is not None:
                    self.session.release(old)
                self._next += 1
                self._seq[region] = self._next
                self.session.add_sequence(self._next)
            seq = self._seq[region]
            if self.session.length(seq) != start:
                raise BackendError(f"sequence in region {region} holds {self.session.length(seq)} tokens, the step starts at {start}")
            if len(toks) == 1 and start > 0:
                singles.append(r)
            else:
                out[r] = self.session.prefill(seq, toks.astype(np.int64))
        if singles:
            seqs = [self._seq[regions[r]] for r in singles]
            out[singles] = self.session.decode(seqs, batch.token_ids[batch.query_start[singles]].astype(np.int64))
        return StepOutput(np.full(batch.num_rows, -1, np.int32), out)
