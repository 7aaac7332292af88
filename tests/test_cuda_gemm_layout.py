"""The tensor-core GEMM's fragment bookkeeping (csrc/gemm_tc.cu), checked without a GPU: a numpy
emulation of what each lane loads and of mma.sync m16n8k16's register layout (PTX ISA, "Matrix
Fragments for mma.m16n8k16 with floating point type") must give X @ W.T. The GPU test
(test_cuda_gpu.py) then checks the kernel itself against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from edge.quant.format import dequantize_int4, dequantize_int8, quantize_int4_rtn, quantize_int8_rtn
from edge.runtime.cuda.gemm import COLS_PER_BLOCK, KJ, TcWorkspace, plan_tc
from edge.runtime.cuda.layout import Linear

REPACK_POS = (0, 16, 4, 20, 8, 24, 12, 28)  # repack_int4: element e of a word goes to bit REPACK_POS[e]


def repack(words: np.ndarray) -> np.ndarray:
    out = np.zeros_like(words)
    for e, p in enumerate(REPACK_POS):
        out |= ((words >> np.uint32(4 * e)) & np.uint32(0xF)) << np.uint32(p)
    return out


def deq_int4_word(q: int) -> list[tuple[float, float]]:
    """deq_int4_word: 4 pairs (lo, hi) = nibbles at bits (4p, 16 + 4p), minus 8."""
    return [(((q >> (4 * p)) & 0xF) - 8.0, ((q >> (16 + 4 * p)) & 0xF) - 8.0) for p in range(4)]


def deq_int8_word(q: int) -> list[tuple[float, float]]:
    b = [((q >> (8 * i)) & 0xFF) for i in range(4)]
    b = [v - 256 if v >= 128 else v for v in b]
    return [(float(b[0]), float(b[1])), (float(b[2]), float(b[3]))]


def emulate(kind: str, q_words: np.ndarray, s: np.ndarray, gshift: int, x: np.ndarray, n: int, k: int) -> np.ndarray:
    """The kernel's loops for one 16-row m-tile and every n8-tile, splits = 1, in float64."""
    kj = KJ[kind]
    kc = kj // 4
    m = x.shape[0]
    y = np.zeros((m, n))
    words_per_chunk = 4  # 16 bytes
    for n8 in range(-(-n // 8)):
        acc = np.zeros((16, 8))
        for j_it in range(k // kj):
            # per lane registers: B pairs for each step, A quads for each step
            b_regs = {}  # (lane, step) -> (b0, b1) pairs
            a_regs = {}  # (lane, step) -> (a0, a1, a2, a3) pairs
            for lane in range(32):
                g, c = lane >> 2, lane & 3
                row = min(n8 * 8 + g, n - 1)
                chunk = q_words[row].reshape(-1, words_per_chunk)[4 * j_it + c]
                if kind == "int4":
                    sc = s[row, (j_it * kj + c * kc) >> gshift]
                    for p in range(kj // 32):  # word p -> steps 2p, 2p+1
                        d = [(a * sc, b * sc) for a, b in deq_int4_word(int(chunk[p]))]
                        b_regs[(lane, 2 * p)] = (d[0], d[1])
                        b_regs[(lane, 2 * p + 1)] = (d[2], d[3])
                else:
                    for st in range(kj // 16):
                        d = deq_int8_word(int(chunk[st]))
                        b_regs[(lane, st)] = (d[0], d[1])
                for p in range(kj // 32):  # one 8-half X load per row per two steps
                    xs = [x[min(g + 8 * h, m - 1), j_it * kj + c * kc + 8 * p: j_it * kj + c * kc + 8 * p + 8] for h in (0, 1)]
                    for ss in (0, 1):
                        q0, q1 = xs[0][4 * ss: 4 * ss + 4], xs[1][4 * ss: 4 * ss + 4]
                        a_regs[(lane, 2 * p + ss)] = ((q0[0], q0[1]), (q1[0], q1[1]), (q0[2], q0[3]), (q1[2], q1[3]))
            for st in range(kj // 16):  # mma.m16n8k16: rebuild A [16, 16] and B [16, 8] from the lanes
                a = np.zeros((16, 16))
                b = np.zeros((16, 8))
                for lane in range(32):
                    g, c = lane >> 2, lane & 3
                    a0, a1, a2, a3 = a_regs[(lane, st)]
                    a[g, 2 * c: 2 * c + 2] = a0
                    a[g + 8, 2 * c: 2 * c + 2] = a1
                    a[g, 2 * c + 8: 2 * c + 10] = a2
                    a[g + 8, 2 * c + 8: 2 * c + 10] = a3
                    b0, b1 = b_regs[(lane, st)]
                    b[2 * c: 2 * c + 2, g] = b0
                    b[2 * c + 8: 2 * c + 10, g] = b1
                acc += a @ b
        for lane in range(32):  # C fragment: (g, 2c..2c+1) and (g + 8, 2c..2c+1)
            g, c = lane >> 2, lane & 3
            for e in range(4):
                mm, nn = g + 8 * (e >> 1), n8 * 8 + 2 * c + (e & 1)
                if mm < m and nn < n:
                    y[mm, nn] = acc[mm, nn - n8 * 8] * (s[nn] if kind == "int8" else 1.0)
    return y


@pytest.mark.parametrize("kind,g", [("int4", 32), ("int4", 128), ("int8", 0)])
def test_tc_fragment_layout_computes_x_wt(kind, g):
    rng = np.random.default_rng(3)
    n, k, m = 13, 256, 11  # N and M not multiples of the tiles
    w = rng.standard_normal((n, k), dtype=np.float32)
    x = rng.standard_normal((m, k)).astype(np.float16).astype(np.float64)
    if kind == "int4":
        qt = quantize_int4_rtn(w, g)
        wd = dequantize_int4(qt.qweight, qt.scales, g)
        words = repack(np.ascontiguousarray(qt.qweight).view(np.uint32))
        got = emulate(kind, words, qt.scales.astype(np.float64), int(np.log2(g)), x, n, k)
    else:
        qt = quantize_int8_rtn(w)
        wd = dequantize_int8(qt.qweight, qt.scales)
        words = np.ascontiguousarray(qt.qweight).view(np.uint32)
        got = emulate(kind, words, qt.scales.astype(np.float64), 0, x, n, k)
    want = x @ wd.T.astype(np.float64)
    assert np.abs(got - want).max() < 1e-6 * np.abs(want).max(), np.abs(got - want).max()


def test_split_plan_depends_on_the_shape_only():
    lin = Linear("int4", 2048, 8192, None, None, 7)
    plan_tc(lin, 132)
    assert 1 < lin.tc_splits <= 16  # a short-N, long-K layer is split to fill the GPU
    big = Linear("int8", 128256, 2048, None, None, 0)
    plan_tc(big, 132)
    assert big.tc_splits == 1  # a thousand column blocks need no split
    odd = Linear("int4", 576, 576, None, None, 5)
    plan_tc(odd, 132)
    assert odd.tc_splits == 0  # K not a multiple of 128: the GEMV runs it

    class _Cp:  # the workspace's sizes, without cupy
        float32, uint32 = np.float32, np.uint32

        @staticmethod
        def zeros(n, dtype):
            return np.zeros(n, dtype)

    ws = TcWorkspace.for_linears(_Cp, [lin, big, odd], rows=64)
    assert ws.partials.size == lin.tc_splits * lin.n * 64
    assert ws.tickets.size == -(-big.n // COLS_PER_BLOCK) * 4  # row tiles of 16 in a 64-row launch
