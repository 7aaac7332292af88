"""The backend session interface: prefill / decode over a batch of sequences with a KV cache.

The onnxruntime, cuda and tensorrt backends implement it; the generator and the scheduler use
only this. Plain data in and out (numpy), no backend types leak.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class DecoderSession(Protocol):
    """One loaded decoder with a KV cache preallocated for `max_batch` x `max_context`."""

    max_batch: int  # sequences that can be live at once
    max_context: int  # tokens per sequence, prompt + generated
    vocab_size: int

    def add_sequence(self, seq_id: int) -> None:
        """Reserve KV space for a new sequence. Raises if `max_batch` are live."""

    def release(self, seq_id: int) -> None:
        """Free a finished sequence's KV space; others are untouched."""

    def prefill(self, seq_id: int, token_ids: np.ndarray) -> np.ndarray:
        """Append `token_ids` (int, [T]) to the sequence; return the last position's logits
        float32 [vocab]. May be called more than once (chunked prefill / multi-turn)."""

    def decode(self, seq_ids: Sequence[int], token_ids: np.ndarray) -> np.ndarray:
        """One step for several sequences of possibly different lengths: append token_ids[b]
        to seq_ids[b]; return float32 logits [B, vocab]."""

    def length(self, seq_id: int) -> int:
        """Tokens currently cached for the sequence."""

    # Optional: `truncate(seq_id, length)` forgets the sequence's tokens from `length` on (the
    # onnxruntime and cuda sessions have it); the generator uses it to reuse a cached prefix.


class EngineBackend(Protocol):
    """What the engine core (edge.runtime.engine) drives: one step over a StepBatch.

    The engine's BlockManager owns KV allocation; the backend only reads/writes the slots and
    block tables the batch names. Capabilities are declared in `caps` (edge.runtime.step.BackendCaps)
    and read by the engine, never probed."""

    caps: "BackendCaps"

    def execute(self, batch: "StepBatch") -> "StepOutput":
        """Run one step: write every token's K/V at batch.slot_mapping, return for each row with
        logits_rows == 1 its sampled next token (device sampling) or its float32 logits
        (host_sample == 1, or a backend without device_sampling)."""

    # Only when caps.greedy_stream: run_greedy(batch, max_new) -> Iterator[int] continues one
    # greedy sequence on the device for up to max_new tokens (the batch is its first decode step,
    # with the KV slots for all max_new tokens already allocated by the engine); closing the
    # iterator early stops it.


from edge.runtime.step import BackendCaps, StepBatch, StepOutput  # noqa: E402  (names for the annotations above)
