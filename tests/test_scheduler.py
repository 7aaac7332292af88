"""Scheduler + KV block manager + engine loop with a fake backend (vLLM tests/v1/core style):
exact block counts, prefix-cache hits, the token budget, preemption and abort.

FakeBackend is a toy language model whose next token is a hash of the whole context it reads
back *through the block tables* (its KV cache stores token ids at slots). A wrong slot, a stale
block, a missed copy or a shared block overwritten changes the context it reads and so the tokens,
and it asserts the context it reads is exactly the row's tokens."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge.runtime.engine import Engine
from edge.runtime.kv import BlockManager, block_hashes
from edge.runtime.request import Request
from edge.runtime.sampler import SamplingParams
from edge.runtime.scheduler import Scheduler
from edge.runtime.step import BackendCaps, StepOutput

V = 50


class FakeBackend:
    def __init__(self, num_blocks=32, block_size=4, max_seqs=4, max_context=64, layout="paged", device_sampling=False,
                 releases_kv=False, copies_blocks=True, partial_prefix=False):
        self.caps = BackendCaps(num_blocks=num_blocks, block_size=block_size, max_seqs=max_seqs, max_context=max_context,
                                vocab_size=V, kv_layout=layout, device_sampling=device_sampling, releases_kv=releases_kv,
                                copies_blocks=copies_blocks, prefix_cache=copies_blocks or layout == "paged",
                                partial_prefix=partial_prefix)
        self.released = []
        n_slots = (max_seqs * -(-max_context // block_size) if layout == "contiguous" else num_blocks) * block_size
        self.kv = np.full(n_slots, -1, np.int64)
        self.batches = []
        self.gate = threading.Event()  # execute waits for it: tests submit everything first
        self.gate.set()
        self.pause_at = None  # the execute that clears the gate itself (the engine stops there, whatever the load)

    def execute(self, b):
        if self.pause_at is not None and len(self.batches) + 1 == self.pause_at:
            self.gate.clear()
        self.gate.wait(10)
        b.validate()
        assert self.caps.copies_blocks or not b.block_copies.size, "block copies sent to a backend that cannot copy"
        self.batches.append(b)
        bs = b.block_size
        for src, dst in b.block_copies.tolist():
            self.kv[dst * bs:(dst + 1) * bs] = self.kv[src * bs:(src + 1) * bs]
        self.kv[b.slot_mapping] = b.token_ids
        logits = np.zeros((b.num_rows, V), np.float32)
        sampled = np.full(b.num_rows, -1, np.int32)
        for r in range(b.num_rows):
            n = int(b.seq_lens[r])
            table = b.block_tables[r]
            ctx = [int(self.kv[table[t // bs] * bs + t % bs]) for t in range(n)]
            assert -1 not in ctx, "a row read a slot nobody wrote"
            logits[r] = np.random.default_rng(abs(hash(tuple(ctx))) % 2**32).standard_normal(V)
            if self.caps.device_sampling and b.logits_rows[r] and not b.host_sample[r] and b.temperature[r] == 0:
                sampled[r] = int(np.argmax(logits[r]))
        return StepOutput(sampled, logits)

    def release_kv(self, blocks):
        """Wipe the released rows: a row that later reads one (live or findable) fails the assert."""
        bs = self.caps.block_size
        for first, stop in blocks:
            assert first // (self.caps.max_context // bs) == (stop - 1) // (self.caps.max_context // bs)  # one region
            self.kv[first * bs:stop * bs] = -1
            self.released.append((first, stop))


class AsyncFakeBackend(FakeBackend):
    """caps.async_steps as the CUDA backend has them: launch() returns a handle at once, the
    'device' keeps each launch's sampled ids, and a row named in StepBatch.prev_rows takes its
    token from the previous launch's ids (token_ids holds -1 there). Temperature rows are sampled
    here too (inverse CDF at the row's uniform), so every non-host row is device-sampled."""

    def __init__(self, **kw):
        super().__init__(device_sampling=True, **kw)
        from dataclasses import replace

        self.caps = replace(self.caps, async_steps=True)
        self.last = None  # the previous launch's sampled ids (the device's copy)
        self.pending = []  # launched, result() not called yet
        self.prev_launches = 0  # launches that took an id from the previous one
        self.most_pending = 0

    def launch(self, b):
        b.validate()
        if b.has_prev_rows:
            self.prev_launches += 1
            assert self.last is not None
            rows = np.nonzero(b.prev_rows >= 0)[0]
            assert (b.token_ids[b.query_start[rows + 1] - 1] == -1).all()  # the host did not know them
            ids = b.token_ids.copy()
            ids[b.query_start[rows + 1] - 1] = self.last[b.prev_rows[rows]]
            b.token_ids = ids
        assert (b.token_ids >= 0).all()
        out = self.execute(b)
        for r in range(b.num_rows):
            if b.logits_rows[r] and not b.host_sample[r] and b.temperature[r] > 0:
                p = np.exp((out.logits[r] - out.logits[r].max()) / b.temperature[r])
                cdf = np.cumsum(p) / p.sum()
                out.sampled[r] = min(int((cdf < b.uniform[r]).sum()), V - 1)
        self.last = out.sampled.copy()
        self.pending.append(out)
        self.most_pending = max(self.most_pending, len(self.pending))
        backend = self

        class Handle:
            def result(self):
                assert backend.pending[0] is out, "results read out of launch order"
                return backend.pending.pop(0)

        return Handle()


def run_alone(prompt, params, backend=None, overlap=True, **kw):
    with Engine(backend or FakeBackend(**kw), eos_ids=(), overlap=overlap) as e:
        s = e.submit(prompt, params, detokenize=False)
        list(s)
        return s.request.output_ids


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0)


# ---- block manager -------------------------------------------------------------------------------
def test_blocks_admit_grow_finish_and_prefix_hit_counts():
    kv = BlockManager(16, 4, max_context=64)
    p = list(range(10))
    h = block_hashes(p, 4)
    assert len(h) == 2  # full blocks only
    assert kv.admit(1, h, len(p)) == 0
    assert kv.grow(1, 10) and kv.num_used == 3 and kv.table(1) == [0, 1, 2]
    kv.cache_full_blocks(1, h, 10)
    assert kv.num_cached == 2
    assert kv.grow(1, 12) and kv.num_used == 3  # block 2 fills up
    assert kv.grow(1, 13) and kv.num_used == 4
    # a second prompt sharing the first 8 tokens takes both cached blocks by reference
    q = p[:8] + [40, 41, 42]
    assert kv.admit(2, block_hashes(q, 4), len(q)) == 8
    assert kv.table(2)[:2] == [0, 1] and kv.num_used == 4  # shared, not new
    assert kv.grow(2, 11) and kv.num_used == 5
    kv.free(1)
    assert kv.num_used == 3  # blocks 0, 1 still held by request 2, plus its own third
    kv.free(2)
    assert kv.num_used == 0 and kv.num_free == 16 and kv.num_cached == 2
    # a prompt that is entirely cached still leaves its last block to compute
    assert kv.admit(3, block_hashes(p[:8], 4), 8) == 4


def test_partial_hits_copy_the_shared_rows_of_a_cached_block():
    kv = BlockManager(16, 4, max_context=64, partial=True)
    p = list(range(10))
    h = block_hashes(p, 4)
    assert kv.admit(1, h, 10, p) == 0 and kv.grow(1, 10) and kv.table(1) == [0, 1, 2]
    kv.cache_full_blocks(1, h, 10, p)
    # 6 shared tokens: block 0 by reference, tokens 4-5 copied out of block 1 into a new block
    q = p[:6] + [40, 41, 42]
    assert kv.admit(2, block_hashes(q, 4), len(q), q) == 6
    assert kv.table(2) == [0, 3] and kv.copies() == [(1, 3)] and kv.num_used == 3 + 1
    assert kv.grow(2, 9) and kv.table(2) == [0, 3, 4] and kv.num_used == 5
    kv.cache_full_blocks(2, block_hashes(q, 4), 9, q)
    assert kv.num_cached == 3  # block 3 holds q's own second block now
    # a prompt cached whole: all but its last token (block 1 copied: 3 of its 4 rows)
    assert kv.admit(3, block_hashes(p[:8], 4), 8, p[:8]) == 7 and kv.table(3) == [0, 5] and kv.copies() == [(1, 5)]
    # no token shared past the whole blocks, or tokens not given: whole blocks only, nothing copied
    r = p[:4] + [44, 45, 46]
    assert kv.admit(4, block_hashes(r, 4), 7, r) == 4 and kv.table(4) == [0] and kv.copies() == []
    assert kv.admit(5, h, 10) == 8 and kv.copies() == []
    for sid in (1, 2, 3, 4, 5):
        kv.free(sid)
    assert kv.num_used == 0 and kv.num_free == 16
    # a block registered with too few known tokens (an id not read back yet) is no partial candidate
    kv2 = BlockManager(16, 4, max_context=64, partial=True)
    assert kv2.admit(1, h, 10) == 0 and kv2.grow(1, 10)
    kv2.cache_full_blocks(1, h, 10, p[:7])
    assert kv2.num_cached == 2 and kv2.admit(2, block_hashes(q, 4), len(q), q) == 4 and kv2.copies() == []


def test_partial_hits_need_the_flag_a_paged_layout_and_a_free_block():
    p = list(range(10))
    h = block_hashes(p, 4)
    for kw in ({}, {"movable": False}, {"layout": "contiguous", "max_seqs": 2}):
        kv = BlockManager(8 if kw else 16, 4, max_context=16 if "max_seqs" in kw else 64, partial=True, **kw)
        assert kv.partial == (not kw)
    kv = BlockManager(4, 4, max_context=16, partial=True)  # 4 blocks
    assert kv.admit(1, h, 10, p) == 0 and kv.grow(1, 10)
    kv.cache_full_blocks(1, h, 10, p)
    assert kv.admit(2, [], 4) == 0 and kv.grow(2, 4) and kv.num_free == 0
    q = p[:6] + [40]
    assert kv.admit(3, block_hashes(q, 4), 7, q) == 4 and kv.copies() == []  # no block to copy into
    # a reused (overwritten) block is no longer found by partial hits
    kv.free(1)
    kv.free(2)
    kv.free(3)
    assert kv.admit(4, [], 16) == 0 and kv.grow(4, 16)  # takes every block: the cached ones are evicted
    kv.free(4)
    assert kv.admit(5, block_hashes(q, 4), 7, q) == 0 and kv.copies() == []


def test_partial_prefix_hits_give_the_same_tokens_as_alone():
    """Prompts sharing a prefix that ends inside a block: the later ones start after every shared
    token (their first block copied), read the copied rows through the fake's KV, and give the
    tokens each gives alone; only their own tokens run."""
    shared = list(range(10))  # 2 whole blocks of 4 and 2 tokens of a third
    prompts = [shared + [30, 31, 32], shared + [40, 41], shared[:9] + [45, 46, 47, 48]]
    want = [run_alone(p, greedy(6), num_blocks=64) for p in prompts]
    be = FakeBackend(num_blocks=64, partial_prefix=True)
    with Engine(be, eos_ids=()) as e:
        got = []
        for p in prompts:
            s = e.submit(p, greedy(6), detokenize=False)
            list(s)
            got.append(s.request)
        assert e.kv.partial
    assert [r.output_ids for r in got] == want
    assert [r.stats.cached_tokens for r in got] == [0, 10, 9]
    assert sum(len(b.block_copies) for b in be.batches) == 2
    assert be.batches[6].num_tokens == 2 and be.batches[6].seq_lens[0] == 12  # request 2's prompt: its 2 own tokens


def test_blocks_evict_least_recently_freed_and_refuse_when_full():
    kv = BlockManager(4, 4, max_context=16)
    a = list(range(8))
    kv.admit(1, block_hashes(a, 4), 8)
    assert kv.grow(1, 8)
    kv.cache_full_blocks(1, block_hashes(a, 4), 8)
    kv.free(1)
    assert kv.num_cached == 2
    kv.admit(2, [], 16)
    assert kv.grow(2, 16)  # takes all 4: the cached ones are evicted
    assert kv.num_cached == 0 and kv.num_free == 0
    kv.admit(3, [], 4)
    assert not kv.grow(3, 4)  # pool exhausted: refused, nothing changed
    assert kv.num_used == 4


def test_contiguous_layout_copies_a_prefix_from_another_region():
    kv = BlockManager(8, 4, max_context=16, layout="contiguous", max_seqs=2)  # 4 blocks per region
    p = list(range(12))
    h = block_hashes(p, 4)
    kv.admit(1, h, 12)
    assert kv.grow(1, 12) and kv.table(1) == [0, 1, 2]
    kv.cache_full_blocks(1, h, 12)
    assert kv.admit(2, h, 12) == 8  # live in region 0: copied into region 1
    assert kv.table(2) == [4, 5] and kv.copies() == [(0, 4), (1, 5)]
    kv.free(1)
    kv.free(2)
    # the next one picks the region that already holds its prefix in place: no copy
    assert kv.admit(3, h, 12) == 8 and kv.copies() == []


def test_contiguous_compaction_moves_the_top_sequence_into_a_gap():
    kv = BlockManager(12, 4, max_context=16, layout="contiguous", max_seqs=3)  # 4 blocks per region
    hs = {}
    for sid, n in ((1, 8), (2, 5), (3, 10)):
        hs[sid] = block_hashes(list(range(sid * 100, sid * 100 + n)), 4)
        assert kv.admit(sid, hs[sid], n) == 0 and kv.grow(sid, n)
        kv.cache_full_blocks(sid, hs[sid], n)
    assert kv.table(3) == [8, 9, 10] and kv.num_used == 2 + 2 + 3
    assert kv.compact() == 0  # regions 0, 1, 2: nothing to move
    kv.free(2)  # a gap at region 1
    assert kv.compact() == 1
    assert kv.table(3) == [4, 5, 6] and kv.copies() == [(8, 4), (9, 5), (10, 6)]
    assert kv.num_used == 2 + 3 and kv.num_free == 12 - 5
    assert kv.grow(3, 12) and kv.table(3) == [4, 5, 6]  # it goes on growing in its new region
    # the moved full blocks are findable at their new place, and the old copies stay findable until reused
    assert kv.admit(4, hs[3], 10) == 8 and kv.table(4) == [8, 9] and kv.copies() == []
    kv.free(1)
    assert kv.compact() == 1  # the top one (4, region 2) fills the gap at region 0; 3 stays in region 1
    assert kv.table(4) == [0, 1] and kv.table(3) == [4, 5, 6] and kv.copies() == [(8, 0), (9, 1)]
    assert kv.num_used == 3 + 2


def test_a_backend_that_cannot_copy_blocks_gets_no_compaction():
    """TensorRT's adapter keeps its own sequences (copies_blocks=False): a gap stays a gap."""
    kv = BlockManager(12, 4, max_context=16, layout="contiguous", max_seqs=3, prefix_cache=False, movable=False)
    for sid in (1, 2, 3):
        assert kv.admit(sid, [], 5) == 0 and kv.grow(sid, 5)
    kv.free(1)
    assert kv.compact() == 0 and kv.copies() == [] and kv.table(3) == [8, 9]
    assert kv.admit(4, [], 5) == 0 and kv.grow(4, 5) and kv.table(4) == [0, 1]  # the gap is reused


def test_mid_batch_finishes_on_a_backend_that_cannot_copy_blocks():
    """Requests ending at different steps leave gaps below live ones; the engine must not ask a
    backend without copies_blocks to move them (it raised BackendError under a slow CPU)."""
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, V, n)) for n in (5, 9, 3, 12, 7)]
    maxes = [2, 9, 4, 6, 11]
    want = [run_alone(p, greedy(m), layout="contiguous") for p, m in zip(prompts, maxes)]
    be = FakeBackend(layout="contiguous", max_seqs=3, copies_blocks=False)
    with Engine(be, eos_ids=()) as e:
        assert not e.kv.movable and not e.kv.prefix_cache
        be.gate.clear()
        streams = [e.submit(p, greedy(m), detokenize=False) for p, m in zip(prompts, maxes)]
        be.gate.set()
        for s in streams:
            list(s)
        assert [s.request.output_ids for s in streams] == want
        assert e.kv.num_used == 0
    assert any(b.num_rows > 1 for b in be.batches)


def test_contiguous_rows_past_the_findable_blocks_are_released():
    kv = BlockManager(16, 4, max_context=32, layout="contiguous", max_seqs=2)  # 8 blocks per region
    p = list(range(10))
    h = block_hashes(p + [40, 41, 42, 43, 44, 45], 4)
    kv.admit(1, h[:2], 10)
    assert kv.grow(1, 16)  # prompt 10 + 6 generated: blocks 0-3
    kv.cache_full_blocks(1, h, 16)
    kv.free(1)  # finished: its 4 full blocks stay findable, nothing to release
    assert kv.released() == [] and kv.num_cached == 4
    # a shorter request that shares nothing takes region 0 (the lowest free): blocks 1-3 are forgotten
    kv.admit(2, [], 3)
    assert kv.grow(2, 3) and kv.table(2) == [0]
    kv.free(2)
    assert kv.released() == [(0, 4)]  # its partial block and the old rows past it
    # aborted: only the prompt's full blocks stay findable, the output's rows are released
    hp = block_hashes(p, 4)
    kv.admit(3, hp, 10)
    assert kv.grow(3, 20)
    kv.cache_full_blocks(3, block_hashes(p + list(range(50, 60)), 4), 20)
    assert kv.num_cached == 5
    kv.free(3, keep_tokens=10)
    assert kv.released() == [(2, 5)] and kv.num_cached == 2
    assert kv.admit(4, hp, 10) == 8  # the prompt's blocks are still found, in place
    assert kv.grow(4, 10) and kv.table(4) == [0, 1, 2]
    kv.free(4)
    assert kv.released() == [(2, 3)]  # its partial block


def test_a_findable_block_after_an_unregistered_one_is_not_released():
    kv = BlockManager(16, 4, max_context=32, layout="contiguous", max_seqs=2)
    h = block_hashes(list(range(8)) + [20, 21, 22, 23], 4)
    kv.admit(1, h[:2], 8)
    assert kv.grow(1, 8)
    kv.cache_full_blocks(1, h[:2], 8)  # region 0 holds the prompt's 2 blocks
    kv.admit(2, [], 12)  # region 1 computes the same prompt (no hit asked) and one more block
    assert kv.grow(2, 12)
    kv.cache_full_blocks(2, h, 12)  # blocks 8, 9: already cached in region 0, not registered; block 10 is
    kv.free(2)
    assert kv.released() == []  # block 10 stays findable, so its rows stay
    assert kv.admit(3, h, 13) == 12 and kv.copies() == [(0, 8), (1, 9)]  # ... and it is found in place


def test_released_rows_are_wiped_and_nothing_reads_them():
    """Concurrent requests, some aborted mid-output, with a shared prompt: the fake backend
    wipes released rows, so a release of anything live or findable breaks the equality."""
    rng = np.random.default_rng(1)
    shared = list(rng.integers(0, V, 12))
    prompts = [shared + list(rng.integers(0, V, n)) for n in (3, 17, 9, 30, 5, 12, 2, 8)]
    maxes = [7, 3, 12, 5, 9, 4, 20, 6]
    want = [run_alone(p, greedy(m), layout="contiguous") for p, m in zip(prompts, maxes)]
    be = FakeBackend(layout="contiguous", max_seqs=3, releases_kv=True)
    with Engine(be, eos_ids=(), token_budget=20, prefill_chunk=8) as e:
        for rnd in range(2):
            be.gate.clear()
            streams = [e.submit(p, greedy(m), detokenize=False) for p, m in zip(prompts, maxes)]
            doomed = e.submit(shared + [1, 2, 3], greedy(40), detokenize=False)
            be.gate.set()
            t0 = time.monotonic()
            while len(doomed.request.output_ids) < 6 and time.monotonic() - t0 < 10:
                time.sleep(0.001)
            doomed.close()  # aborted mid-output
            for s in streams:
                list(s)
            assert [s.request.output_ids for s in streams] == want
            while not doomed.request.finished and time.monotonic() - t0 < 10:  # the abort lands at the next step
                time.sleep(0.001)
        assert e.kv.num_used == 0
    assert be.released  # rows were released along the way
    assert max(s.request.stats.cached_tokens for s in streams) >= 12  # the shared prompt was still found


# ---- scheduler -----------------------------------------------------------------------------------
def test_token_budget_and_prompt_pieces_every_step():
    be = FakeBackend(num_blocks=64, max_seqs=4)
    be.gate.clear()
    with Engine(be, eos_ids=(), token_budget=16, prefill_chunk=8, mixed_prefill=4) as e:
        streams = [e.submit([(i + j) % V for j in range(30)], greedy(5), detokenize=False) for i in range(4)]
        be.gate.set()
        for s in streams:
            list(s)
        late = e.submit([7] * 30, greedy(3), detokenize=False)  # arrives while none decode
        list(late)
    mixed = 0
    for b in be.batches:
        assert b.num_tokens <= 16
        decoding = any(b.num_new(r) == 1 and b.seq_lens[r] > 30 for r in range(b.num_rows))
        prompt_tokens = 0
        for r in range(b.num_rows):
            n, end = b.num_new(r), int(b.seq_lens[r])
            if end <= 30:  # a prompt piece: ends on a block boundary (4) or at the prompt's end
                assert end % 4 == 0 or end == 30
                assert n <= (4 if decoding else 8)
                mixed += decoding and n > 1
                prompt_tokens += n
        assert not decoding or prompt_tokens <= 4  # while some decode, all pieces share mixed_prefill
    assert mixed > 0  # prompts did share steps with decoding rows
    assert max(b.num_rows for b in be.batches) >= 3  # several requests ran in one step
    assert [b.num_new(0) for b in be.batches[-6:-3]] == [8, 8, 8]  # alone: whole chunks


def test_mixed_pieces_shrink_with_their_past():
    from edge.runtime.scheduler import mixed_piece

    assert mixed_piece(0, 32, 0, 8) == 32 and mixed_piece(5000, 32, 0, 8) == 32  # off: a fixed size
    assert [mixed_piece(c, 32, 1500, 8) for c in (0, 500, 1500, 3000, 10**6)] == [32, 24, 16, 8, 8]
    be = FakeBackend(num_blocks=200, max_seqs=2, max_context=400, block_size=4)
    be.caps = BackendCaps(**{**be.caps.__dict__, "piece_ctx": 40})
    be.gate.clear()
    with Engine(be, eos_ids=(), token_budget=80, prefill_chunk=64, mixed_prefill=32) as e:
        assert e.scheduler.align == 4  # gcd of the block size, the pieces and PIECE_ALIGN
        first = e.submit([1] * 5, greedy(300), detokenize=False)
        long = e.submit([(3 * j) % V for j in range(300)], greedy(2), detokenize=False)
        be.gate.set()  # step 1: both prompts (nothing decodes yet); then `first` decodes beside `long`'s pieces
        list(long)
        first.close()
    pieces = [(int(b.seq_lens[r]) - b.num_new(r), b.num_new(r)) for b in be.batches[1:] for r in range(b.num_rows)
              if b.num_new(r) > 1]
    assert pieces and all(n == mixed_piece(past, 32, 40, 4) or past + n == 300 for past, n in pieces)
    sizes = [n for _, n in pieces[:-1]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 8 and sizes[-1] == 4  # shrinking as the past grows


def test_a_backend_may_let_mixed_pieces_shrink_below_the_default_alignment():
    """BackendCaps.piece_align (the native CPU backend: 4): with 16-token blocks the cut points and the
    smallest mixed piece are 4 tokens instead of PIECE_ALIGN's 8, so a piece at a long past costs less."""
    from edge.runtime.scheduler import PIECE_ALIGN, mixed_piece, piece_ctx_of

    assert PIECE_ALIGN == 8 and mixed_piece(3000, 32, 512, 4) == 4 and mixed_piece(3000, 32, 512, 8) == 8
    # one rule for every backend, scaled by the model: SmolLM2-135M (3,538,944 linear params a layer, q width 576)
    assert piece_ctx_of(1 / 12, 3538944, 576) == 512 and piece_ctx_of(0.28, 3538944, 576) == 1720
    assert piece_ctx_of(1 / 12, 2 * 3538944, 576) == 1024  # twice the weights a token: twice the past
    for piece_align, want in ((0, 8), (4, 4)):
        be = FakeBackend(num_blocks=200, max_seqs=2, max_context=400, block_size=16)
        be.caps = BackendCaps(**{**be.caps.__dict__, "piece_ctx": 40, "piece_align": piece_align})
        be.gate.clear()
        with Engine(be, eos_ids=(), token_budget=80, prefill_chunk=64, mixed_prefill=32) as e:
            assert e.scheduler.align == want
            first = e.submit([1] * 5, greedy(300), detokenize=False)
            long = e.submit([(3 * j) % V for j in range(300)], greedy(2), detokenize=False)
            be.gate.set()
            list(long)
            first.close()
        pieces = [b.num_new(r) for b in be.batches[1:] for r in range(b.num_rows) if b.num_new(r) > 1]
        assert min(pieces[:-1]) == want  # the pieces at the longest past: the smallest allowed


def test_concurrent_requests_equal_each_alone_paged_and_contiguous():
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, V, n)) for n in (3, 17, 9, 30, 5, 12)]
    maxes = [7, 3, 12, 5, 9, 4]
    for layout in ("paged", "contiguous"):
        want = [run_alone(p, greedy(m), layout=layout) for p, m in zip(prompts, maxes)]
        be = FakeBackend(layout=layout)
        be.gate.clear()
        with Engine(be, eos_ids=(), token_budget=20, prefill_chunk=8) as e:
            streams = [e.submit(p, greedy(m), detokenize=False) for p, m in zip(prompts, maxes)]
            be.gate.set()
            for s in streams:
                list(s)
            assert [s.request.output_ids for s in streams] == want
            assert e.kv.num_used == 0  # every block back


def test_seeded_sampling_equals_alone():
    p = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    want = run_alone([1, 2, 3], p)
    with Engine(FakeBackend(), eos_ids=()) as e:
        others = [e.submit([5, 6, 7, i], SamplingParams(max_tokens=8, temperature=1.0, seed=i), detokenize=False) for i in range(3)]
        s = e.submit([1, 2, 3], p, detokenize=False)
        list(s)
        [list(o) for o in others]
    assert s.request.output_ids == want


def test_prefix_cache_hit_counts_and_same_tokens():
    shared = list(range(20))  # 5 full blocks of 4
    be = FakeBackend(num_blocks=64)
    with Engine(be, eos_ids=()) as e:
        a = e.submit(shared + [30, 31], greedy(4), detokenize=False)
        list(a)
        b = e.submit(shared + [40, 41, 42], greedy(4), detokenize=False)
        list(b)
    assert a.request.stats.cached_tokens == 0 and b.request.stats.cached_tokens == 20
    assert b.request.output_ids == run_alone(shared + [40, 41, 42], greedy(4))
    assert be.batches[-4].seq_lens[0] == 23 and be.batches[-4].num_tokens == 3  # only the new tokens ran


def check_preemption_gives_identical_tokens(backend_cls):
    """3 requests of up to 24 tokens = 6 blocks each; 12 blocks cannot hold all three to the end:
    some are preempted, recomputed, and still give the tokens each gives alone."""
    prompts = [list(range(i * 7, i * 7 + 10)) for i in range(3)]
    want = [run_alone(p, greedy(14), num_blocks=64) for p in prompts]
    be = backend_cls(num_blocks=12, max_seqs=3)
    be.gate.clear()
    with Engine(be, eos_ids=(), prefix_cache=False) as e:
        streams = [e.submit(p, greedy(14), detokenize=False) for p in prompts]
        be.gate.set()
        for s in streams:
            list(s)
        assert sum(s.request.stats.preemptions for s in streams) > 0
        assert [s.request.output_ids for s in streams] == want
        assert e.kv.num_used == 0
    return be


def test_preemption_recomputes_and_gives_identical_tokens():
    check_preemption_gives_identical_tokens(FakeBackend)


def test_abort_frees_blocks_and_ends_the_stream():
    gate = threading.Event()

    be = FakeBackend()
    be.gate = gate
    with Engine(be, eos_ids=()) as e:
        s = e.submit(list(range(10)), greedy(40), detokenize=False)
        e.abort(s.request_id)
        gate.set()
        assert list(s) == [] or s.request.finish_reason == "abort"
        assert s.request.finish_reason == "abort"
        e.submit([1], greedy(1), detokenize=False).text()  # the engine still runs
        assert e.kv.num_used == 0 and e.stats()["running"] == 0


def test_request_that_can_never_fit_fails_with_a_clear_error():
    with Engine(FakeBackend(num_blocks=2, block_size=4, max_context=64), eos_ids=()) as e:
        s = e.submit(list(range(20)), greedy(2), detokenize=False)
        with pytest.raises(MemoryError, match="KV blocks"):
            list(s)


def test_device_sampled_rows_skip_the_host():
    be = FakeBackend(device_sampling=True)
    with Engine(be, eos_ids=()) as e:
        s = e.submit([1, 2, 3], greedy(6), detokenize=False)
        list(s)
    assert s.request.output_ids == run_alone([1, 2, 3], greedy(6))


class StreamingFakeBackend(FakeBackend):
    """caps.greedy_stream: run_greedy runs the step by step here (block copies once, first)."""

    def __init__(self, **kw):
        super().__init__(device_sampling=True, **kw)
        from dataclasses import replace

        self.caps = replace(self.caps, greedy_stream=True)
        self.streams = self.stream_copies = 0

    def run_greedy(self, b, max_new):
        self.streams += 1
        self.stream_copies += len(b.block_copies)
        for _ in range(max_new):
            tok = int(self.execute(b).sampled[0])
            b.block_copies = np.zeros((0, 2), np.int32)
            yield tok
            b.token_ids[0] = tok
            b.positions[0] += 1
            p = int(b.positions[0])
            b.slot_mapping[0] = b.block_tables[0, p // b.block_size] * b.block_size + p % b.block_size
            b.seq_lens[0] += 1


def test_a_sequence_compacted_in_the_step_that_starts_a_greedy_stream_is_copied_first():
    """Contiguous layout: the first request ends, the second is moved down into its region by the
    same schedule() that finds it alone (a greedy stream); the stream must do those copies."""
    a, b = [1, 2, 3], list(range(10, 19))
    want = run_alone(b, greedy(12), layout="contiguous")
    be = StreamingFakeBackend(layout="contiguous")
    be.gate.clear()
    with Engine(be, eos_ids=()) as e:
        sa = e.submit(a, greedy(2), detokenize=False)
        sb = e.submit(b, greedy(12), detokenize=False)
        be.gate.set()
        list(sa)
        list(sb)
        assert sb.request.output_ids == want and e.kv.num_used == 0
    assert be.streams >= 1 and be.stream_copies > 0


def test_scheduler_refuses_a_budget_below_the_batch():
    with pytest.raises(ValueError):
        Scheduler(BlockManager(4, 4), max_seqs=8, token_budget=8, prefill_chunk=4)


def test_stop_and_eos_finish_reasons():
    r = Request(1, [1, 2], SamplingParams(max_tokens=5, stop=[]), eos_ids=frozenset({9}))
    r.append(3)
    r.append(9)
    assert r.finish_reason == "stop" and r.output_ids == [3]


def test_counts_are_current_when_a_stream_ends():
    """/health and /metrics read Engine.stats(): a client that asks right after its request ended
    must not see it still running (the counts were refreshed only after the step's bookkeeping)."""
    with Engine(FakeBackend(), eos_ids=()) as e:
        slow = e._reap_errors
        e._reap_errors = lambda: (time.sleep(0.2), slow())  # widen the window after a step
        s = e.submit([1, 2, 3], greedy(3), detokenize=False)
        list(s)
        assert e.stats()["running"] == 0 and e.stats()["kv_blocks_used"] == 0


# ---- async steps (caps.async_steps: step N+1 planned and launched while step N runs) ------------------
def test_async_steps_give_each_request_its_tokens_alone_and_finish_one_step_late():
    """Different prompt lengths and max_tokens, and an EOS that some requests meet mid-way: the
    engine plans each step before the last one's tokens are back (the rows read them on the
    'device'), runs a finished request once more and drops that token."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, V, n)) for n in (3, 17, 9, 30, 5, 12)]
    maxes = [7, 3, 12, 5, 9, 4]
    free = [run_alone(p, greedy(m)) for p, m in zip(prompts, maxes)]
    eos = free[2][4]  # a token some request samples mid-way
    want = []
    for p, m in zip(prompts, maxes):
        with Engine(FakeBackend(), eos_ids=(eos,)) as e:
            s = e.submit(p, greedy(m), detokenize=False)
            list(s)
            want.append((s.request.output_ids, s.request.finish_reason))
    assert any(r == "stop" for _, r in want) and any(r == "length" for _, r in want)
    be = AsyncFakeBackend()
    be.gate.clear()
    with Engine(be, eos_ids=(eos,), token_budget=20, prefill_chunk=8) as e:
        streams = [e.submit(p, greedy(m), detokenize=False) for p, m in zip(prompts, maxes)]
        be.gate.set()
        for s in streams:
            list(s)
        assert [(s.request.output_ids, s.request.finish_reason) for s in streams] == want
        assert e.kv.num_used == 0 and not be.pending
    assert be.prev_launches >= 5 and be.most_pending == 2
    assert e.steps == len(be.batches)  # every launch read back
    assert len(be.batches) > max(maxes)  # more steps than one request alone: rows beyond their end ran


def test_async_steps_seeded_sampling_and_preemption_equal_alone():
    p = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    want = run_alone([1, 2, 3], p, AsyncFakeBackend(), overlap=False)  # the same device draws, one step at a time
    be = AsyncFakeBackend()
    with Engine(be, eos_ids=()) as e:
        others = [e.submit([5, 6, 7, i], SamplingParams(max_tokens=8, temperature=1.0, seed=i), detokenize=False) for i in range(3)]
        s = e.submit([1, 2, 3], p, detokenize=False)
        list(s)
        [list(o) for o in others]
    assert s.request.output_ids == want and be.prev_launches > 0
    # KV too small for all three: an overlapped plan never preempts; the engine waits and preempts then
    assert not check_preemption_gives_identical_tokens(AsyncFakeBackend).pending


def test_async_steps_abort_and_host_sampled_rows():
    """An abort while steps are in flight frees the blocks; a host-sampled row (top-k) makes the
    engine read its step back before planning the next, and it samples what it samples alone."""
    be = AsyncFakeBackend()
    be.gate.clear()
    be.pause_at = 8  # the 8th launch waits: 7 steps ran, step 8 is in flight
    with Engine(be, eos_ids=()) as e:
        a = e.submit(list(range(10)), greedy(40), detokenize=False)
        b = e.submit(list(range(5)), greedy(40), detokenize=False)
        be.gate.set()
        t = time.monotonic()
        while (be.gate.is_set() or a.request.stats.n_generated < 3) and time.monotonic() - t < 10:
            time.sleep(0.0005)
        a.close()  # steps are in flight now
        be.gate.set()
        list(b)
        assert a.request.finish_reason == "abort" and 3 <= a.request.stats.n_generated < 40
        list(b)
        assert b.request.output_ids == run_alone(list(range(5)), greedy(40))
        assert e.kv.num_used == 0 and not be.pending
    k = SamplingParams(max_tokens=6, temperature=0.9, top_k=3, seed=1)
    want = run_alone([4, 5], k, AsyncFakeBackend(), overlap=False)
    be = AsyncFakeBackend()
    with Engine(be, eos_ids=()) as e:
        o = e.submit([9, 9, 9], greedy(6), detokenize=False)
        s = e.submit([4, 5], k, detokenize=False)
        list(s)
        list(o)
    assert s.request.output_ids == want
    assert all(not bt.host_sample.any() for bt in be.batches if bt.has_prev_rows)  # never overlapped a host-sampled step


def test_async_batches_stop_at_a_deadline_that_passes_while_waiting():
    """The HTTP server's consumer waits for the engine's wake-ups; a deadline that passes while no
    token comes (the step is stuck behind the fake's gate) ends the stream then and aborts it."""
    import asyncio

    be = FakeBackend()
    be.gate.clear()
    with Engine(be, eos_ids=()) as e:
        s = e.submit(list(range(5)), greedy(4))

        async def consume():
            t = time.monotonic()
            got = [b async for b in s.batches(time.monotonic() + 0.3)]
            return got, time.monotonic() - t

        got, waited = asyncio.run(consume())
        be.gate.set()
        assert got == [] and 0.25 < waited < 5
        for _ in range(200):
            if s.request.finished:
                break
            time.sleep(0.01)
        assert s.request.finish_reason == "abort" and e.kv.num_used == 0
