"""The KV block manager's per-sequence API (the cuda session's own path): exact block counts, slots, reuse, errors."""

from __future__ import annotations

import pytest

from edge.errors import BackendError, ContextLengthError
from edge.runtime.kv import BlockManager, blocks_for, pool_blocks


def test_blocks_for_and_pool_size():
    assert [blocks_for(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]
    assert pool_blocks(max_batch=4, max_context=100, block_size=16) == 4 * 7


def test_append_takes_blocks_lazily_and_maps_slots():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.add(1)
    assert bm.num_free == 8 and bm.table(1) == []
    slots = bm.append(1, 5)  # 5 tokens -> 2 blocks
    assert bm.num_free == 6 and len(bm.table(1)) == 2 and bm.length(1) == 5
    t = bm.table(1)
    assert slots == [t[0] * 4 + i for i in range(4)] + [t[1] * 4]
    assert bm.append(1, 3) == [t[1] * 4 + 1, t[1] * 4 + 2, t[1] * 4 + 3]  # fills block 2, no new block
    assert bm.num_free == 6
    assert bm.append(1, 1) == [bm.table(1)[2] * 4]  # 9th token opens block 3
    assert bm.num_free == 5
    assert bm.slots(1) == [bm.table(1)[i // 4] * 4 + i % 4 for i in range(9)]


def test_sequences_share_the_pool_and_release_returns_blocks():
    bm = BlockManager(num_blocks=6, block_size=2, max_seqs=3)
    for s in (10, 11, 12):
        bm.add(s)
    bm.append(10, 3)  # 2 blocks
    bm.append(11, 1)  # 1 block
    bm.append(12, 4)  # 2 blocks
    assert bm.num_free == 1
    used = bm.table(10) + bm.table(11) + bm.table(12)
    assert len(set(used)) == 5  # no block shared
    bm.release(10)
    assert bm.num_free == 3 and 10 not in bm
    bm.add(13)
    bm.append(13, 6)  # reuses the released blocks
    assert bm.num_free == 0
    assert set(bm.table(13)).isdisjoint(bm.table(11) + bm.table(12))
    assert bm.length(11) == 1 and bm.length(12) == 4  # others untouched


def test_errors_exhaustion_context_and_max_seqs():
    bm = BlockManager(num_blocks=2, block_size=4, max_context=6, max_seqs=2)
    bm.add(0)
    with pytest.raises(ContextLengthError):
        bm.append(0, 7)
    assert bm.length(0) == 0 and bm.num_free == 2  # failed append changed nothing
    bm.append(0, 4)
    bm.add(1)
    bm.append(1, 4)
    assert not bm.can_append(1, 1)
    with pytest.raises(BackendError, match="exhausted"):
        bm.append(1, 1)
    with pytest.raises(BackendError, match="max_batch"):
        bm.add(2)
    with pytest.raises(BackendError, match="already live"):
        bm.add(0)
    with pytest.raises(BackendError, match="unknown sequence"):
        bm.length(99)


def test_truncate_forgets_tokens_and_returns_unneeded_blocks():
    bm = BlockManager(num_blocks=5, block_size=4)
    bm.add(1)
    bm.append(1, 9)  # 3 blocks
    first_two = bm.table(1)[:2]
    bm.truncate(1, 8)  # the 9th token's block goes back
    assert bm.length(1) == 8 and bm.table(1) == first_two and bm.num_free == 3
    bm.truncate(1, 5)  # still inside block 2: nothing freed
    assert bm.length(1) == 5 and bm.num_free == 3
    assert bm.append(1, 1) == [first_two[1] * 4 + 1]  # appending continues at position 5
    with pytest.raises(BackendError):
        bm.truncate(1, 7)  # cannot grow
    bm.truncate(1, 0)
    assert bm.table(1) == [] and bm.num_free == 5
