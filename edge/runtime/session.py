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
