"""Which RMSNorms of a decode step fold into the next GEMV (edge.runtime.cuda.layers.LayerPass.fold_pair),
without a GPU: the producer's per-block parts must fit the consumer's loads (gemv.cu FOLD_MAXP a thread)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edge.runtime.cuda.layers import FOLD_MAXP, LayerPass
from edge.runtime.cuda.layout import Linear
from edge.runtime.cuda.linears import LinearDispatch


class _Pass(LayerPass, LinearDispatch):
    def __init__(self, hidden: int = 4096):
        self.spec = SimpleNamespace(hidden_size=hidden)
        self.fuse = True


def _lin(n: int, k: int, rows: int, threads: int, fused: bool = False, kind: str = "int4") -> Linear:
    return Linear(kind, n, k, None, None, m1=(f"gemv_int4_bk_r{rows}_t{threads}_u2", rows, threads), fused=fused)


@pytest.mark.parametrize("rows,threads,folds", [
    (16, 128, True),   # Llama-3-8B's picks: 256 parts, 512 loads
    (16, 64, True),    # 256 parts, 4 x 64 = 256 loads: just fits
    (8, 64, False),    # 512 parts for 256 loads
    (2, 448, False),   # 2,048 parts for 1,792 loads
])
def test_parts_must_fit_the_consumers_loads(rows, threads, folds):
    s = _Pass()
    o = _lin(4096, 4096, rows, 128)
    gu = _lin(28672, 4096, 8, threads, fused=True)
    assert FOLD_MAXP == 4
    assert s.fold_pair(o, gu, 1) is folds


def test_no_fold_off_one_row_unfused_sandwich_or_switched_off():
    s = _Pass()
    o, gu = _lin(4096, 4096, 16, 128), _lin(28672, 4096, 8, 128, fused=True)
    assert s.fold_pair(o, gu, 1)
    assert not s.fold_pair(o, gu, 2)                      # M = 1 only
    assert not s.fold_pair(o, gu, 1, post=object())       # a sandwich norm between them
    assert not s.fold_pair(o, _lin(28672, 4096, 8, 128), 1)  # the consumer runs unfused
    assert not s.fold_pair(_lin(4096, 4096, 16, 128, kind="int8"), gu, 1)
    s.fold_norms = False
    assert not s.fold_pair(o, gu, 1)
    s.fold_norms, s.batch_invariant = True, True
    assert not s.fold_pair(o, gu, 1)


class _Rec:
    """Kernel launches by name (a stand-in for the compiled module)."""

    def __init__(self):
        self.names: list[str] = []

    def __getitem__(self, name):
        return lambda *a, **k: self.names.append(name)

    def gemv_tile(self, m):
        return 1


def _step_launches(layers: int = 3, res_fused_at: int | None = None, sides: tuple[str, ...] = ("o", "down")) -> list[str]:
    import numpy as np

    s = _Pass(hidden=64)
    s.spec = SimpleNamespace(hidden_size=64, rms_eps=1e-5, n_heads=4, n_kv_heads=2, head_dim=16, features=SimpleNamespace())
    s.k, s.kv, s.embed, s.embed_scale, s.norm = _Rec(), {}, None, 1.0, None
    s.tc_max_m, s.act_dtype, s._counter, s._norm_threads = 64, "float16", None, 64
    s.fold_sides = sides
    s.layers = []
    for i in range(layers):
        down = _lin(64, 128, 16, 128, fused=i == res_fused_at)  # fused: the _res epilogue (residual + norm in its last block)
        s.layers.append({"qkv": _lin(128, 64, 8, 128, fused=True), "o": _lin(64, 64, 16, 128), "gu": _lin(256, 64, 8, 128, fused=True),
                         "down": down, "ln1": None, "ln2": None, "post_attn": None, "post_mlp": None, "cos": None, "sin": None, "q_norm": None})
        s.kv[i, 0] = s.kv[i, 1] = None
    bufs = {k: None for k in ("res", "h", "qkv", "q", "a", "o", "gu", "act")}
    bufs["fold_parts"], bufs["fold_inv"] = np.zeros(32, np.float32), np.ones(2, np.float32)
    s._layers(1, bufs, None, None, None, lambda i, *a: s.k.names.append("attn"))
    return [n.rsplit("_", 1)[1] if n.startswith("gemv_int4_bk_") else n for n in s.k.names]


def test_a_one_row_step_folds_every_norm_but_the_last():
    got = _step_launches()
    layer0 = ["rope", "attn", "fold", "gluf", "fold"]
    later = ["ropef", "attn", "fold", "gluf", "fold"]
    assert got == ["embed_rmsnorm", *layer0, *later, "ropef", "attn", "fold", "gluf", "st", "add_rmsnorm"]


def test_the_chain_breaks_after_a_fused_res_epilogue_and_restarts_at_add_rmsnorm():
    got = _step_launches(res_fused_at=0, sides=("o",))
    # only the norms after o may fold; layer 0's down runs its _res epilogue (no 1 / rms stored), so
    # layer 1's o cannot fold; the add_rmsnorm launches after it store 1 / rms, so layer 2's o folds
    assert got == ["embed_rmsnorm", "rope", "attn", "fold", "gluf", "res",
                   "rope", "attn", "st", "add_rmsnorm", "glu", "st", "add_rmsnorm",
                   "rope", "attn", "fold", "gluf", "st", "add_rmsnorm"]
