"""KV block manager with a prefix cache: one for every backend (pure Python, no numerics).

K/V live in `num_blocks` blocks of `block_size` tokens; a sequence owns a block table and its
token t lives in slot `table[t // block_size] * block_size + t % block_size`. A full block is
named by a hash chained over the token ids before it and in it (block_hashes), so two prompts
that start with the same system prompt and passages name the same blocks: a new sequence takes
the cached ones and computes only the rest (vLLM's automatic prefix caching).

Two physical layouts (BackendCaps.kv_layout):

- "paged" (cuda): any block anywhere; a cached block is shared by reference (ref counts).
- "contiguous" (onnxruntime's GroupQueryAttention cache rows): sequence i owns region r, the
  blocks r * blocks_per_seq + j for j = 0, 1, ... in order. A prefix found in the sequence's own
  region is kept in place; one found in another region is copied (copies(), executed by the
  backend before the next step). `num_blocks` is then a budget on the blocks in use, which is
  what the plan sized (the backend's rows are virtual memory until written).

Partial hits (paged layout, `partial=True`: a backend that copies blocks): past the last whole cached
block, a cached block that starts with the same tokens (a child of the same parent hash) is copied
into the sequence's next block, and the tokens they share count as cached too. A RAG system prompt
rarely ends on a block boundary: without this each question recomputes its tail (up to
block_size - 1 tokens), and a repeated question its last partial block.

Freed blocks keep their hash and stay findable until reused (least recently freed first,
the tail of a sequence before its head, which other prompts are likelier to share).
In the contiguous layout, the rows of a free region past its findable blocks hold nothing anyone
can use; released() names them so that the backend can give their memory back (an aborted
request's output is not kept findable: its client never saw it whole, no later prompt repeats it).

    kv = BlockManager(num_blocks=64, block_size=16, max_context=256)
    hit = kv.admit(7, block_hashes(prompt, 16))   # tokens already cached (0 on a cold cache)
    kv.grow(7, len(prompt))                        # False: no room now (the caller preempts)
    kv.cache_full_blocks(7, hashes, computed, tokens)  # after the step: full blocks become findable
    kv.free(7)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from edge.errors import BackendError, ContextLengthError


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold `tokens` tokens."""
    return -(-tokens // block_size)


def pool_blocks(max_batch: int, max_context: int, block_size: int) -> int:
    """Blocks for the worst case: every live sequence at max_context (the memory plan may give fewer)."""
    return max_batch * blocks_for(max_context, block_size)


def block_hashes(token_ids, block_size: int, start: list[int] | None = None) -> list[int]:
    """Chained hashes of the full blocks of `token_ids`; `start` (hashes of a prefix already
    hashed) is extended, not recomputed. Python's tuple hash: stable within a process, which is
    the cache's lifetime."""
    out = list(start or [])
    parent = out[-1] if out else 0
    for b in range(len(out), len(token_ids) // block_size):
        parent = hash((parent, tuple(token_ids[b * block_size:(b + 1) * block_size])))
        out.append(parent)
    return out


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens reserved (their slots may be written by the next step)
    region: int = -1  # contiguous layout only
    cached: int = 0  # leading blocks already registered in the prefix cache


class BlockManager:
    """Allocates KV blocks to sequences; `max_context` caps one sequence's tokens."""

    def __init__(self, num_blocks: int, block_size: int = 16, *, max_context: int | None = None,
                 layout: str = "paged", max_seqs: int | None = None, prefix_cache: bool = True, movable: bool = True,
                 partial: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        if layout not in ("paged", "contiguous"):
            raise ValueError(f"unknown KV layout {layout!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_context = max_context if max_context is not None else num_blocks * block_size
        self.layout = layout
        self.prefix_cache = prefix_cache
        self.movable = movable  # contiguous: the backend copies blocks, so compact() may move sequences
        # paged: a block's leading tokens may be copied into a new block (admit's partial hits)
        self.partial = partial and prefix_cache and layout == "paged" and movable
        self._kids: dict[int, dict[int, tuple[int, ...]]] = {}  # parent hash -> {cached block: its tokens} (partial)
        self._parent_of: dict[int, int] = {}  # cached block -> the key of its _kids entry
        self.blocks_per_seq = blocks_for(self.max_context, block_size)
        if layout == "contiguous":
            if max_seqs is None:
                raise ValueError("the contiguous layout needs max_seqs (one region per sequence)")
            self._free_regions: OrderedDict[int, None] = OrderedDict((r, None) for r in range(max_seqs))
        self.max_seqs = max_seqs
        self._seqs: dict[int, _Seq] = {}
        self._ref = [0] * (max_seqs * self.blocks_per_seq if layout == "contiguous" else num_blocks)
        self._hash_of: dict[int, int] = {}  # block -> hash (full, computed blocks)
        self._by_hash: dict[int, int] = {}  # hash -> block
        # paged: free blocks in eviction order (front first); cached ones keep their hash
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks)) if layout == "paged" else OrderedDict()
        self._used = 0  # blocks referenced by live sequences
        self._copies: list[tuple[int, int]] = []
        # contiguous: blocks of each region written since its rows were last released (released())
        self._high = [0] * (max_seqs or 0) if layout == "contiguous" else []
        self.hits = 0  # prefix-cache statistics: tokens found / tokens asked for at admission
        self.queries = 0

    # ---- admission ------------------------------------------------------------------
    def admit(self, seq_id: int, hashes: list[int], num_tokens: int, tokens=None) -> int | None:
        """Start a sequence of `num_tokens` known tokens whose full blocks hash to `hashes`;
        returns how many leading tokens are already cached (always < num_tokens, so one is left
        to compute the next token from), or None when no sequence slot is free. Blocks for the
        rest are taken by grow(). tokens: the known token ids (a partial hit compares them)."""
        if seq_id in self._seqs:
            raise BackendError(f"sequence {seq_id} is already live")
        if self.max_seqs is not None and len(self._seqs) >= self.max_seqs:
            return None
        s = _Seq()
        if self.layout == "paged":
            hit = self._longest_hit(hashes) if self.prefix_cache else []
            hit = self._leave_one(hit, num_tokens)
            for b in hit:
                self._take(b)
            s.blocks = hit
        else:
            s.region = region = self._pick_region(hashes)
            base = region * self.blocks_per_seq
            hit = []
            for j, h in enumerate(hashes if self.prefix_cache else []):
                b = base + j if self._hash_of.get(base + j) == h else self._by_hash.get(h)
                if b is None:
                    break
                hit.append(b)
            hit = self._leave_one(hit, num_tokens)
            if len(hit) > self._available():
                hit = []
            in_place = sum(1 for j, b in enumerate(hit) if b == base + j)  # always a prefix of hit
            self._forget_region(region, keep=in_place)
            for j, src in enumerate(hit):
                dst = base + j
                if src != dst:
                    self._copies.append((src, dst))
                    self._register(dst, hashes[j])
                self._ref[dst] += 1
            self._used += len(hit)
            self._high[region] = max(self._high[region], len(hit))
            hit = [base + j for j in range(len(hit))]
            s.blocks = hit
        s.length = len(hit) * self.block_size
        s.cached = len(hit)
        if self.partial and tokens is not None:
            s.length += self._partial_hit(s, hashes, tokens, num_tokens)
        self._seqs[seq_id] = s
        self.queries += num_tokens
        self.hits += s.length
        return s.length

    def _leave_one(self, hit: list[int], num_tokens: int) -> list[int]:
        """Keep at least the last known token to compute (its logits give the next one)."""
        while hit and len(hit) * self.block_size >= num_tokens:
            hit = hit[:-1]
        return hit

    def _partial_hit(self, s: _Seq, hashes: list[int], tokens, num_tokens: int) -> int:
        """Tokens past s's whole cached blocks found at the start of a cached block that follows
        the same parent: that block is copied into a new block of s (copies(), before the next
        step), whose rows past the shared tokens the sequence then overwrites. 0: none found, or
        no free block. Looks at the 32 blocks of that parent cached last."""
        bs, j = self.block_size, len(s.blocks)
        kids = self._kids.get(hashes[j - 1] if j else 0)
        start = j * bs
        limit = min(bs, num_tokens - 1 - start)  # leave one token to compute
        if not kids or limit < 1 or not self._free:
            return 0
        want = tuple(tokens[start:start + limit])
        best, n = -1, 0
        for k, (b, have) in enumerate(reversed(kids.items())):
            if k == 32:
                break
            m = 0
            while m < limit and have[m] == want[m]:
                m += 1
            if m > n:
                best, n = b, m
        if n == 0:
            return 0
        dst = next(iter(self._free))  # least recently freed, as grow() takes it
        self._unregister(dst)  # its rows past the shared tokens will be overwritten
        self._take(dst)
        if dst != best:
            self._copies.append((best, dst))
        s.blocks.append(dst)
        return n

    def _longest_hit(self, hashes: list[int]) -> list[int]:
        out = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def _pick_region(self, hashes: list[int]) -> int:
        """contiguous: the lowest free region, always. Running sequences then sit in neighbouring
        regions and batch into one backend call per step (onnxruntime binds a run of consecutive
        slots); a prefix held by another free region is copied in (admit), once: about 1.5 MB per
        32-token block on SmolLM2, ~0.3 ms, against one more call per step (~7 ms) for the whole
        life of a request placed out of line, which picking the region holding the prefix did."""
        best = min(self._free_regions)
        del self._free_regions[best]
        return best

    def _forget_region(self, region: int, keep: int) -> None:
        """The region's blocks from `keep` on will be overwritten: no longer findable."""
        base = region * self.blocks_per_seq
        for j in range(keep, self.blocks_per_seq):
            self._unregister(base + j)

    # ---- growth ---------------------------------------------------------------------
    def grow(self, seq_id: int, length: int) -> bool:
        """Reserve slots so the sequence holds `length` tokens; False (nothing changed) when the
        pool has too few free blocks. Raises past max_context."""
        s = self._seqs.get(seq_id) or self._seq(seq_id)
        if length > self.max_context:
            raise BackendError(f"sequence {seq_id}: {length} tokens exceed the context of {self.max_context}")
        need = -(-length // self.block_size) - len(s.blocks)
        if need <= 0:
            s.length = max(s.length, length)
            return True
        if need > self._available():
            return False
        for _ in range(need):
            if self.layout == "paged":
                b = next(iter(self._free))  # least recently freed: its cached content is evicted
                self._unregister(b)
                self._take(b)
            else:
                b = s.region * self.blocks_per_seq + len(s.blocks)
                self._unregister(b)
                self._ref[b] += 1
                self._used += 1
            s.blocks.append(b)
        if self.layout == "contiguous":
            self._high[s.region] = max(self._high[s.region], len(s.blocks))
        s.length = length
        return True

    def can_grow(self, seq_id: int, length: int) -> bool:
        s = self._seq(seq_id)
        return length <= self.max_context and blocks_for(length, self.block_size) - len(s.blocks) <= self._available()

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget the sequence's tokens from `length` on; blocks no longer needed are freed."""
        s = self._seq(seq_id)
        if not 0 <= length <= s.length:
            raise BackendError(f"sequence {seq_id}: cannot truncate {s.length} tokens to {length}")
        keep = blocks_for(length, self.block_size)
        for b in reversed(s.blocks[keep:]):
            self._unregister(b)  # partly overwritten content must not be found
            self._drop(b)
        del s.blocks[keep:]
        s.cached = min(s.cached, length // self.block_size)
        s.length = length

    def cache_full_blocks(self, seq_id: int, hashes: list[int], computed: int, tokens=None) -> None:
        """Make the sequence's full blocks whose tokens are all computed findable by hash (and,
        with `tokens`, the sequence's token ids, findable by partial hits too)."""
        if not self.prefix_cache:
            return
        s = self._seq(seq_id)
        bs = self.block_size
        n = min(computed // bs, len(hashes), len(s.blocks))
        for j in range(s.cached, n):
            b = s.blocks[j]
            if hashes[j] not in self._by_hash and b not in self._hash_of:
                self._register(b, hashes[j])
                have = tuple(tokens[j * bs:(j + 1) * bs]) if self.partial and tokens is not None else ()
                if len(have) == bs:  # (a token not read back yet, async steps, leaves it out)
                    parent = hashes[j - 1] if j else 0
                    self._kids.setdefault(parent, {})[b] = have
                    self._parent_of[b] = parent
        s.cached = max(s.cached, n)

    def free(self, seq_id: int, keep_tokens: int | None = None) -> None:
        """Release a finished / aborted / preempted sequence. Its cached blocks stay findable,
        only those within the first `keep_tokens` tokens when given (an aborted request: its prompt)."""
        s = self._seqs.pop(self._check(seq_id))
        for b in reversed(s.blocks):
            self._drop(b)
        if keep_tokens is not None:
            for b in s.blocks[keep_tokens // self.block_size:]:
                if self._ref[b] == 0:
                    self._unregister(b)
        if self.layout == "contiguous":
            self._free_regions[s.region] = None

    def compact(self) -> int:
        """contiguous: move the sequences of the highest regions down into free lower ones until
        the live sequences sit in regions 0..n-1 (copies(), done by the backend before the next
        step). A sequence that ends mid-batch otherwise splits the others into two runs of slots
        and every later step into two backend calls (~7 ms more per step on SmolLM2 / 2 cores,
        against ~0.1 ms per 32-token block copied once). Returns the sequences moved."""
        if self.layout != "contiguous" or not self.movable or not self._seqs:
            return 0
        by_region = {s.region: s for s in self._seqs.values()}
        moved = 0
        while self._free_regions and min(self._free_regions) < max(by_region):
            f, top = min(self._free_regions), max(by_region)
            s = by_region.pop(top)
            base = f * self.blocks_per_seq
            dst = [base + j for j in range(len(s.blocks))]
            for src, d in zip(s.blocks, dst):
                self._unregister(d)  # overwritten (blocks of f past the move stay findable)
                self._copies.append((src, d))
                self._ref[d] += 1
                self._ref[src] -= 1  # the old rows stay findable as a free region's content
                if src in self._hash_of:
                    self._register(d, self._hash_of[src])
            del self._free_regions[f]
            self._free_regions[top] = None
            self._high[f] = max(self._high[f], len(dst))
            s.blocks, s.region = dst, f
            by_region[f] = s
            moved += 1
        return moved

    def released(self) -> list[tuple[int, int]]:
        """contiguous: block ranges [first, stop), one per free region, whose rows were written
        but hold nothing findable now (the backend may drop their memory; the caller must do so
        before anything else is admitted). Each is returned once."""
        out = []
        for r in self._free_regions if self.layout == "contiguous" else ():
            # NOTE: up to the last findable block, not the first gap: a block whose hash was already
            # cached elsewhere is not registered, and blocks after it may be
            base, high = r * self.blocks_per_seq, self._high[r]
            keep = high
            while keep > 0 and base + keep - 1 not in self._hash_of:
                keep -= 1
            if keep < high:
                out.append((base + keep, base + high))
                self._high[r] = keep
        return out

    def copies(self) -> list[tuple[int, int]]:
        """Block copies (src, dst) planned since the last call (contiguous layout)."""
        out, self._copies = self._copies, []
        return out

    # ---- the per-sequence API of a session that allocates for itself (cuda's add_sequence /
    # prefill / decode path): no prefix hashes, errors raised instead of False ------------------
    def add(self, seq_id: int) -> None:
        if self.admit(seq_id, [], 1) is None:
            raise BackendError(f"{self.max_seqs} sequences are already live (max_batch)", fix="release a finished sequence first")

    def append(self, seq_id: int, n: int) -> list[int]:
        """Reserve `n` more tokens; their slots (positions length .. length + n - 1)."""
        s = self._seq(seq_id)
        start = s.length
        if start + n > self.max_context:
            raise ContextLengthError(f"sequence {seq_id}: {start} + {n} tokens exceed the context of {self.max_context}",
                                     fix="shorten the prompt or build the engine with a larger --max-context")
        if not self.grow(seq_id, start + n):
            need = blocks_for(start + n, self.block_size) - len(s.blocks)
            raise BackendError(f"KV cache pool exhausted: sequence {seq_id} needs {need} more blocks, {self.num_free} free",
                               fix="lower the batch size or the context, or give the KV cache more memory")
        return self.slots(seq_id, start, start + n)

    def can_append(self, seq_id: int, n: int) -> bool:
        return self.can_grow(seq_id, self._seq(seq_id).length + n)

    release = free

    @property
    def max_blocks_per_seq(self) -> int:
        return self.blocks_per_seq

    # ---- views ----------------------------------------------------------------------
    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def table(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).blocks)

    def length(self, seq_id: int) -> int:
        return self._seq(seq_id).length

    def blocks_of(self, seq_id: int) -> list[int]:
        """The sequence's block table itself (read-only: the step builder copies it out)."""
        return (self._seqs.get(seq_id) or self._seq(seq_id)).blocks

    def slots(self, seq_id: int, start: int = 0, stop: int | None = None) -> list[int]:
        """Slots of positions [start, stop)."""
        s = self._seq(seq_id)
        stop = s.length if stop is None else stop
        bs = self.block_size
        return [s.blocks[t // bs] * bs + t % bs for t in range(start, stop)]

    @property
    def live(self) -> list[int]:
        return list(self._seqs)

    @property
    def num_used(self) -> int:
        """Blocks referenced by live sequences (what /health reports as in use)."""
        return self._used

    @property
    def num_free(self) -> int:
        return self._available()

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash (in use or free-but-kept)."""
        return len(self._by_hash)

    # ---- internals ------------------------------------------------------------------
    def _available(self) -> int:
        return self.num_blocks - self._used

    def _take(self, b: int) -> None:
        if self._ref[b] == 0:
            del self._free[b]
            self._used += 1
        self._ref[b] += 1

    def _drop(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            self._used -= 1
            if self.layout == "paged":
                self._free[b] = None  # back of the eviction queue

    def _register(self, b: int, h: int) -> None:
        self._unregister(b)
        self._hash_of[b] = h
        self._by_hash.setdefault(h, b)

    def _unregister(self, b: int) -> None:
        h = self._hash_of.pop(b, None)
        if h is not None and self._by_hash.get(h) == b:
            del self._by_hash[h]
        parent = self._parent_of.pop(b, None)
        if parent is not None:
            kids = self._kids[parent]
            del kids[b]
            if not kids:
                del self._kids[parent]

    def _seq(self, seq_id: int) -> _Seq:
        return self._seqs[self._check(seq_id)]

    def _check(self, seq_id: int) -> int:
        if seq_id not in self._seqs:
            raise BackendError(f"unknown sequence {seq_id}")
        return seq_id
