"""The native CPU backend's int4 / int8 x int8 GEMM (edge/runtime/cpu/csrc/native.c): every ISA
path (AVX-512 VNNI, AVX-512BW, AVX2, scalar, and the scalar code compiled without any SIMD) gives the same
bits, a row gives the same bits batched or alone, any thread count gives the same bits, and the
result is within int8-activation tolerance of numpy over the dequantized weights."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from edge.quant.format import quantize_int4_rtn, quantize_int8_rtn
from edge.runtime.cpu import kernels
from edge.runtime.cpu.weights import dequantized, pack_int4, pack_int8


def _linears(rng, n=200, k=160):
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    q4 = quantize_int4_rtn(w, 32)
    q4g = quantize_int4_rtn(w, 64) if k % 64 == 0 else quantize_int4_rtn(w[:, :128], 64)
    q8 = quantize_int8_rtn(w)
    return {"int4": (pack_int4(q4.qweight, q4.scales, 32, bias), q4.dequantize()),
            "int4_g64": (pack_int4(q4g.qweight, q4g.scales, 64), q4g.dequantize()),
            "int8": (pack_int8(q8.qweight, q8.scales), q8.dequantize())}


@pytest.fixture(scope="module")
def lins():
    return _linears(np.random.default_rng(0))


def test_repacked_tiles_hold_the_bundle_weights(lins):
    for name, (lin, ref) in lins.items():
        assert np.array_equal(dequantized(lin), ref), name


@pytest.mark.parametrize("name", ["int4", "int4_g64", "int8"])
def test_every_isa_path_and_thread_count_gives_the_same_bits(lins, name):
    lin, ref = lins[name]
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((19, lin.k)) * rng.uniform(0.1, 10, (19, 1))).astype(np.float32)  # 19: two full row blocks + 3
    isas = kernels.available_isas()
    base = kernels.linear(lin, x, isa="scalar", threads=1)
    for isa in isas:
        for threads in (1, 2, 3):
            got = kernels.linear(lin, x, isa=isa, threads=threads)
            assert np.array_equal(got, base), f"{name}: {isa} x {threads} threads differs by {np.abs(got - base).max()}"
    # batched == alone, row by row
    alone = np.concatenate([kernels.linear(lin, x[i:i + 1]) for i in range(len(x))])
    assert np.array_equal(alone, base)
    # numpy over the dequantized weights: the int8 activations' rounding only
    want = x @ ref.T + (lin.bias if lin.bias is not None else 0)
    err = np.abs(base - want).max() / np.abs(want).max()
    assert err < 0.02, f"{name}: max relative error {err}"


def test_every_row_count_and_a_partial_last_tile_give_the_same_bits_on_every_path():
    """Row counts 1..9 (the AVX2 tile runs them as passes of up to 4 rows x 1 or 2 halves of 8 columns;
    the zmm tiles as 1..8 rows) and n = 203 (the last tile: 11 columns, its second half partial)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((203, 96)).astype(np.float32)
    q4, q8 = quantize_int4_rtn(w, 32), quantize_int8_rtn(w)
    bias = rng.standard_normal(203).astype(np.float32)
    for name, lin in (("int4", pack_int4(q4.qweight, q4.scales, 32, bias)), ("int8", pack_int8(q8.qweight, q8.scales))):
        for m in range(1, 10):
            x = (rng.standard_normal((m, 96)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32)
            base = kernels.linear(lin, x, isa="scalar", threads=1)
            for isa in kernels.available_isas():
                got = kernels.linear(lin, x, isa=isa, threads=2)
                assert np.array_equal(got, base), f"{name}, {m} rows: {isa} differs by {np.abs(got - base).max()}"


def test_the_avxvnni_tile_gives_the_same_bits_for_every_row_count():
    """The AVX2 tile with its dots by ymm vpdpbusd (an AVX-VNNI CPU's build, or its EVEX stand-in on AVX-512 VNNI):
    the int4 nibbles and the int8 bytes as tile_zmm reads them, rows 1..9 and a partial last tile."""
    from edge.cpu import cpu_flags, is_x86
    from edge.runtime.cpu.build import avxvnni_build, avxvnni_needs, load

    flags = cpu_flags()
    if not (is_x86() and set(avxvnni_needs(flags)) <= flags):
        pytest.skip("needs AVX-VNNI, or AVX-512 VNNI for its stand-in")
    bf = avxvnni_build(flags)
    assert load(bf).er_ymm_vnni() == 1 and load(bf).er_isa_max() == 1
    rng = np.random.default_rng(8)
    w = rng.standard_normal((203, 96)).astype(np.float32)
    q4, q8 = quantize_int4_rtn(w, 32), quantize_int8_rtn(w)
    for name, lin in (("int4", pack_int4(q4.qweight, q4.scales, 32)), ("int8", pack_int8(q8.qweight, q8.scales))):
        for m in range(1, 10):
            x = (rng.standard_normal((m, 96)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32)
            base = kernels.linear(lin, x, isa="scalar", threads=1)
            got = kernels.linear(lin, x, isa="avx2", threads=2, build_flags=bf)
            assert np.array_equal(got, base), f"{name}, {m} rows: avxvnni differs by {np.abs(got - base).max()}"


def test_the_vnni_avx512_and_avx2_paths_exist_where_the_cpu_has_them():
    from edge.cpu import cpu_flags

    flags = cpu_flags()
    isas = kernels.available_isas()
    assert isas[0] == "scalar"
    if "avx2" in flags:
        assert "avx2" in isas
    if "avx512bw" in flags:
        assert "avx512" in isas
    if "avx512_vnni" in flags and "avx512bw" in flags:
        assert "vnni" in isas


@pytest.mark.skipif(not __import__("platform").machine().lower() in ("x86_64", "amd64"), reason="x86 flags")
def test_a_build_without_any_simd_gives_the_same_bits(lins):
    """The source compiled for plain x86-64 (what an ARM build runs: the portable C path, no
    intrinsics, no auto-vectorised AVX) against this machine's build."""
    from edge.runtime.cpu.build import load

    plain = load(("-march=x86-64", "-mtune=generic"))
    assert plain.er_isa_max() == 0
    rng = np.random.default_rng(2)
    for name, (lin, _) in lins.items():
        x = rng.standard_normal((9, lin.k)).astype(np.float32)
        out = np.empty((9, lin.n), np.float32)
        st = lin.struct
        assert plain.er_linear(ctypes.byref(st), 9, x.ctypes.data, out.ctypes.data, 2) == 0
        assert np.array_equal(out, kernels.linear(lin, x, threads=2)), name


def test_an_unknown_isa_is_a_one_line_error():
    from edge.errors import BackendError

    with pytest.raises(BackendError, match="not available"):
        kernels.set_isa("neon")


def test_the_avxvnni_path_is_named_in_its_own_build_and_refused_with_the_variable_elsewhere():
    """avxvnni is a build of its own (EDGE_RAG_NATIVE_ISA=avxvnni), not a path of the -march=native one (except on an
    AVX-VNNI CPU without AVX-512, whose own build it is)."""
    from edge.cpu import cpu_flags, is_x86
    from edge.errors import BackendError
    from edge.runtime.cpu.build import avxvnni_build, avxvnni_needs, load

    if not is_x86():
        pytest.skip("x86 paths")
    try:
        if load().er_ymm_vnni():  # this CPU's own build is an avxvnni build
            assert kernels.set_isa("avxvnni") == "avxvnni"
        else:
            with pytest.raises(BackendError, match="build of its own") as e:
                kernels.set_isa("avxvnni")
            assert "EDGE_RAG_NATIVE_ISA=avxvnni" in e.value.fix
        flags = cpu_flags()
        if set(avxvnni_needs(flags)) <= flags:
            lib = load(avxvnni_build(flags))
            assert kernels.set_isa("avxvnni", lib) == "avxvnni" and kernels.set_isa("avx2", lib) == "avxvnni"
            assert kernels.set_isa("scalar", lib) == "scalar"
            lib.er_set_isa(-1)
    finally:
        load().er_set_isa(-1)


def test_gate_up_rows_alternate_in_runs_of_16():
    """pack_gate_up's order (native.c's gate_up_act finishes 32 intermediate features per 4 tiles):
    gate 0..15, up 0..15, gate 16..31, ... of the same dequantized weights."""
    from edge.quant.format import BundleLinear
    from edge.runtime.cpu.weights import pack_gate_up

    rng = np.random.default_rng(3)
    g, u = (quantize_int4_rtn(rng.standard_normal((64, 96)).astype(np.float32), 32) for _ in range(2))
    lins = [BundleLinear(name, "int4", 64, 96, qweight=q.qweight, scales=q.scales, group_size=32) for name, q in (("gate", g), ("up", u))]
    got = dequantized(pack_gate_up(*lins))
    gd, ud = g.dequantize(), u.dequantize()
    want = np.concatenate([gd[0:16], ud[0:16], gd[16:32], ud[16:32], gd[32:48], ud[32:48], gd[48:64], ud[48:64]])
    assert np.array_equal(got, want)
    # int8: each block is packed straight into its tiles (no joined copy first), the same order
    g8, u8 = (quantize_int8_rtn(rng.standard_normal((64, 96)).astype(np.float32)) for _ in range(2))
    lins8 = [BundleLinear(name, "int8", 64, 96, qweight=q.qweight, scales=q.scales) for name, q in (("gate", g8), ("up", u8))]
    gd, ud = g8.dequantize(), u8.dequantize()
    want = np.concatenate([x for i in range(0, 64, 16) for x in (gd[i:i + 16], ud[i:i + 16])])
    assert np.array_equal(dequantized(pack_gate_up(*lins8)), want)


@pytest.mark.parametrize("rows", [(48, 16, 16), (40, 24), (48, 48, 21)], ids=["qkv", "mid-tile", "padded"])
def test_joined_int8_linears_hold_their_rows_in_order(rows):
    """q|k|v packed block by block: the rows of each in order, a block ending inside a tile and a last
    partial tile included (the same weights as the joined rows)."""
    from edge.quant.format import BundleLinear
    from edge.runtime.cpu.weights import pack_linear

    rng = np.random.default_rng(4)
    qs = [quantize_int8_rtn(rng.standard_normal((n, 64)).astype(np.float32)) for n in rows]
    lins = [BundleLinear(f"p{i}", "int8", n, 64, qweight=q.qweight, scales=q.scales) for i, (n, q) in enumerate(zip(rows, qs))]
    lin = pack_linear(lins)
    assert lin.n == sum(rows) and np.array_equal(dequantized(lin), np.concatenate([q.dequantize() for q in qs]))
