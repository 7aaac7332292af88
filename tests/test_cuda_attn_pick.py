"""Which decode attention kernel a step runs, and its fewest tokens per split, without a GPU
(edge.runtime.cuda.decode.DecodeSteps.split_kernel / attn_min_split_rows)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edge.runtime.cuda.decode import ATTN_MIN_SPLIT, CLUSTER_SPLITS, DecodeSteps


class _Steps(DecodeSteps):
    def __init__(self, head_dim: int, cc: int, batch_invariant: bool = False):
        self.spec = SimpleNamespace(head_dim=head_dim)
        self.k = SimpleNamespace(cc=cc)
        self.batch_invariant = batch_invariant
        self.attn_min_split = ATTN_MIN_SPLIT


@pytest.mark.parametrize("head_dim,cc,inv,rows,kernel,min_split", [
    (128, 90, False, 1, "paged_attn_lc8", 32),   # Hopper, one row: the cluster merge, 32-token splits
    (128, 90, False, 2, "paged_attn_lr", 128),   # several rows: lr (lc8 measured at one row only)
    (128, 90, True, 1, "paged_attn_lr", 128),    # batch_invariant: one kernel and split at every batch size
    (128, 87, False, 1, "paged_attn_lr", 64),    # Orin: no clusters, lr's 64-token splits
    (64, 90, False, 1, "paged_attn_split_tk", 128),  # head_dim 64: tk, 128 tokens counted at head_dim 64
])
def test_split_kernel_and_min_split(head_dim, cc, inv, rows, kernel, min_split):
    s = _Steps(head_dim, cc, inv)
    assert s.split_kernel(rows) == kernel
    assert s.attn_min_split_rows(rows) == min_split
    assert CLUSTER_SPLITS["paged_attn_lc8"] == 8


def test_a_named_kernel_and_b1_split_win():
    s = _Steps(128, 90)
    s.attn_split_kernel = "paged_attn_lr"
    assert s.split_kernel(1) == "paged_attn_lr" and s.attn_min_split_rows(1) == 64
    s.attn_min_split_b1 = 16
    assert s.attn_min_split_rows(1) == 16 and s.attn_min_split_rows(2) == ATTN_MIN_SPLIT
