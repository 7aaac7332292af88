"""Paged KV cache bookkeeping (pure Python, no GPU): fixed-size blocks from one pool.

The GPU holds K and V as [num_blocks * block_size, n_kv_heads, head_dim] (one pool per layer);
a sequence owns a list of block ids (its block table) and its token t lives in slot
`table[t // block_size] * block_size + t % block_size`. Blocks are taken lazily as a sequence
grows and returned when it is released, so sequences of different lengths share the pool and
join or leave between steps without moving anything.

    pool = BlockManager(num_blocks=64, block_size=16)
    pool.add(7); slots = pool.append(7, 20)   # 20 new tokens -> 2 blocks taken
    pool.table(7)                              # [0, 1]
    pool.release(7)                            # both back in the free list
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.errors import BackendError, ContextLengthError


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold `tokens` tokens."""
    return -(-tokens // block_size)


def pool_blocks(max_batch: int, max_context: int, block_size: int) -> int:
    """Blocks for the worst case: every live sequence at max_context (the memory plan may give fewer)."""
    return max_batch * blocks_for(max_context, block_size)


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    length: int = 0


class BlockManager:
    """Allocates KV blocks to sequences. `max_context` caps one sequence's tokens."""

    def __init__(self, num_blocks: int, block_size: int = 16, max_context: int | None = None, max_seqs: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_context = max_context if max_context is not None else num_blocks * block_size
        self.max_seqs = max_seqs
        # NOTE: free list is a stack; pop() from the end hands out low ids first after reversal.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._seqs: dict[int, _Seq] = {}

    # ---- sequences ------------------------------------------------------------------
    def add(self, seq_id: int) -> None:
        if seq_id in self._seqs:
            raise BackendError(f"sequence {seq_id} is already live")
        if self.max_seqs is not None and len(self._seqs) >= self.max_seqs:
            raise BackendError(f"{self.max_seqs} sequences are already live (max_batch)", fix="release a finished sequence first")
        self._seqs[seq_id] = _Seq()

    def release(self, seq_id: int) -> None:
        s = self._seqs.pop(self._check(seq_id))
        self._free.extend(reversed(s.blocks))

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    @property
    def live(self) -> list[int]:
        return list(self._seqs)

    # ---- growth ---------------------------------------------------------------------
    def can_append(self, seq_id: int, n: int) -> bool:
        s = self._seqs[self._check(seq_id)]
        need = blocks_for(s.length + n, self.block_size) - len(s.blocks)
        return s.length + n <= self.max_context and need <= len(self._free)

    def append(self, seq_id: int, n: int) -> list[int]:
        """Reserve `n` more tokens for the sequence; return their slots (positions length..length+n-1)."""
        s = self._seqs[self._check(seq_id)]
        if s.length + n > self.max_context:
            raise ContextLengthError(
                f"sequence {seq_id}: {s.length} + {n} tokens exceed the context of {self.max_context}",
                fix="shorten the prompt or build the engine with a larger --max-context",
            )
        need = blocks_for(s.length + n, self.block_size) - len(s.blocks)
        if need > len(self._free):
            raise BackendError(
                f"KV cache pool exhausted: sequence {seq_id} needs {need} more blocks, {len(self._free)} free",
                fix="lower the batch size or the context, or give the KV cache more memory",
            )
        for _ in range(need):
            s.blocks.append(self._free.pop())
        bs = self.block_size
        slots = [s.blocks[t // bs] * bs + t % bs for t in range(s.length, s.length + n)]
        s.length += n
        return slots

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget the sequence's tokens from `length` on (their KV is overwritten later); blocks no
        longer needed go back to the pool."""
        s = self._seqs[self._check(seq_id)]
        if not 0 <= length <= s.length:
            raise BackendError(f"sequence {seq_id}: cannot truncate {s.length} tokens to {length}")
        keep = blocks_for(length, self.block_size)
        self._free.extend(reversed(s.blocks[keep:]))
        del s.blocks[keep:]
        s.length = length

    def slots(self, seq_id: int, start: int = 0, stop: int | None = None) -> list[int]:
        """Slots of cached positions [start, stop)."""
        s = self._seqs[self._check(seq_id)]
        stop = s.length if stop is None else stop
        bs = self.block_size
        return [s.blocks[t // bs] * bs + t % bs for t in range(start, stop)]

    # ---- views ----------------------------------------------------------------------
    def table(self, seq_id: int) -> list[int]:
        return list(self._seqs[self._check(seq_id)].blocks)

    def length(self, seq_id: int) -> int:
        return self._seqs[self._check(seq_id)].length

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def max_blocks_per_seq(self) -> int:
        return blocks_for(self.max_context, self.block_size)

    def _check(self, seq_id: int) -> int:
        if seq_id not in self._seqs:
            raise BackendError(f"unknown sequence {seq_id}", fix="call add_sequence first")
        return seq_id
