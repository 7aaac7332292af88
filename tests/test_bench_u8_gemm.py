"""bench/bench_u8_gemm.py's candidate kernels compute the graph's int8 linear exactly: the same
integers as ONNX Runtime's MatMulIntegerToFloat (uint8 activations with zero point 128, uint8
weights with per-column zero points), at the extremes of both ranges, for row counts that do not
fill a tile; so its speed figures compare like with like."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.cpu import cpu_flags, is_x86  # noqa: E402

pytestmark = pytest.mark.skipif(not (is_x86() and "avx2" in cpu_flags() and shutil.which("cc")),
                                reason="needs an x86 CPU with AVX2 and a C compiler")


def _builds(tmp_path):
    """The kernels this CPU builds, and (on an AVX-512 CPU) the AVX2-only set too."""
    flags = set(cpu_flags())
    yield build_for(flags, tmp_path / "native")
    if "avx512bw" in flags:
        yield build_for(flags - {"avx512bw", "avx512vl"}, tmp_path / "avx2")


def build_for(flags, out):
    from bench.bench_u8_gemm import build

    out.mkdir()
    return build(flags, out)


def test_every_kernel_variant_matches_the_exact_integers_and_onnxruntime(tmp_path):
    from bench.bench_u8_gemm import exact16, exact_reference, peer

    builds = list(_builds(tmp_path))
    assert all(variants for _, variants in builds), "no kernel variant built"
    rng = np.random.default_rng(1)
    k, n = 96, 192
    wq = rng.integers(0, 256, (k, n), dtype=np.uint8)
    zw = rng.integers(0, 256, n, dtype=np.uint8)
    wq[:, :8], zw[:8] = 0, 255  # w - zw = -255: the widest int16 operand
    wq[:, 8:16], zw[8:16] = 255, 0  # +255
    sw = (rng.random(n) * 0.01 + 0.001).astype(np.float32)
    ref_peer = peer(wq, zw, sw)
    for m in (1, 13, 37):  # 1 row, and row counts that leave a partial tile
        xq = rng.integers(1, 256, (m, k), dtype=np.uint8)
        xq[0, :] = 255  # +127 everywhere: the largest sums
        r = (rng.random((m, 1)) + 0.5).astype(np.float32)
        exact = exact_reference(xq, wq, zw, sw, r)
        scale = float(np.abs(exact).max())
        ort_y = ref_peer(xq, r)
        assert np.abs(ort_y - exact).max() / scale < 1e-6
        for lib, v, w in [(lib, v, w) for lib, variants in builds for v, w, _, _ in variants]:
            y = exact16(lib, v, w, xq, wq, zw, sw, r)().copy()
            assert y.shape == (m, n)
            err = np.abs(y - exact).max() / scale
            assert err < 1e-6, (v, m, err)  # float rounding of the scaling only: the integers are exact
            assert np.abs(y - ort_y).max() / scale < 2e-6, (v, m)


def test_the_bound_catches_a_zero_point_off_by_one(tmp_path):
    """The 1e-6 bound above can fail: a kernel given zero points off by one (one unit of w - zw) is
    far outside it; and the packed int16 pairs hold exactly w - zw."""
    from bench.bench_u8_gemm import exact16, exact_reference, pack_weights

    builds = list(_builds(tmp_path))
    rng = np.random.default_rng(2)
    k, n = 64, 192
    wq = rng.integers(0, 256, (k, n), dtype=np.uint8)
    zw = rng.integers(1, 255, n, dtype=np.uint8)
    sw = np.full(n, 0.01, np.float32)
    xq = rng.integers(1, 256, (7, k), dtype=np.uint8)
    r = np.ones((7, 1), np.float32)
    exact = exact_reference(xq, wq, zw, sw, r)
    for lib, v, w in [(lib, v, w) for lib, variants in builds for v, w, _, _ in variants]:
        packed = pack_weights(wq, zw, w)
        assert sorted(packed.reshape(-1).tolist()) == sorted((wq.astype(np.int16) - zw.astype(np.int16)).reshape(-1).tolist())
        off = exact16(lib, v, w, xq, wq, zw + 1, sw, r)()
        assert np.abs(off - exact).max() / np.abs(exact).max() > 1e-4, v
