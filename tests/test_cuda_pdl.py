"""Programmatic dependent launch (edge.runtime.cuda.pdl), the parts that run without a GPU: the
driver structs' layout, argument marshalling, and that every kernel launched programmatically
waits for the kernel before it in its source."""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

from edge.errors import BackendError
from edge.runtime.cuda import pdl
from edge.runtime.cuda.kernels_src import CSRC, KERNEL_NAMES, SOURCE


def test_launch_structs_match_cuda_h():
    # cuda.h: CUlaunchAttribute {id; pad[4]; union of 64 bytes}, CUlaunchConfig {6 dims, smem, stream, attrs, n}
    assert ctypes.sizeof(pdl._LaunchAttribute) == 72
    assert pdl._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(pdl._LaunchConfig) == 56
    assert pdl._LaunchConfig.hStream.offset == 32 and pdl._LaunchConfig.attrs.offset == 40 and pdl._LaunchConfig.numAttrs.offset == 48
    # the attribute as the driver reads it: id 6, then programmaticStreamSerializationAllowed = 1 at byte 8
    raw = bytes(pdl._programmatic_attribute())
    assert int.from_bytes(raw[0:4], "little") == 6 and int.from_bytes(raw[8:12], "little") == 1 and not any(raw[12:])


class _Ptr:
    def __init__(self, p):
        self.ptr = p


class _Array:  # what marshal reads of a cupy array: .data.ptr (a view's offset included)
    def __init__(self, p):
        self.data = _Ptr(p)


def test_marshal_types_as_cupy_passes_them():
    vals = pdl.marshal((_Array(0x7000), np.int32(-3), np.float32(0.5), np.uint64(0), np.int64(1 << 40), np.uint32(7)))
    assert [type(v) for v in vals] == [ctypes.c_void_p, ctypes.c_int32, ctypes.c_float, ctypes.c_uint64, ctypes.c_int64, ctypes.c_uint32]
    assert vals[0].value == 0x7000 and vals[1].value == -3 and vals[2].value == 0.5 and vals[4].value == 1 << 40
    with pytest.raises(BackendError, match="int"):
        pdl.marshal((3,))  # a bare Python int: CuPy would guess its width
    assert pdl._dim3(5) == (5, 1, 1) and pdl._dim3((2, 3)) == (2, 3, 1)


def test_no_pdl_below_sm90():
    assert not pdl.available(87) and not pdl.available(80)


def _body(src: str, name: str) -> str:
    """The source of function `name` (its first definition with a body), up to its closing brace."""
    m = re.search(r"\b" + re.escape(name) + r"\s*\([^;{]*\)\s*\{", src)
    assert m, name
    depth, i = 0, m.end() - 1
    for j in range(i, len(src)):
        depth += {"{": 1, "}": -1}.get(src[j], 0)
        if depth == 0:
            return src[i : j + 1]
    raise AssertionError(name)


# Each programmatically launched kernel -> the function whose body does its loads (a template or the kernel itself)
FAMILIES = [
    (re.compile(r"gemv_int4_bk_r\d+_t\d+_u\d+_(st|glu|res|rope|fold|gluf|ropef)"), "gemv_int4_bk_core"),
    (re.compile(r"gemv_int4_bk_r\d+_t\d+_u\d+_p\d+_b\d+_(st|glu|res|rope|fold|gluf|ropef)"), "gemv_int4_bk_pipe"),
    (re.compile(r"gemv_int4_m\d+(_r\d)?"), "gemv_int4"),
    (re.compile(r"gemv_int8_m\d+"), "gemv_int8"),
    (re.compile(r"paged_attn_split_tk[01]?_d\d+"), "paged_attn_split_impl"),
    (re.compile(r"paged_attn_(lr|lc8)_d\d+"), "paged_attn_lr_impl"),
    (re.compile(r"(embed_rmsnorm|add_rmsnorm|argmax_rows_mb|advance_inputs|pdl_nop)"), None),
]


def test_every_programmatic_kernel_waits_before_its_inputs():
    assert pdl.PDL_KERNELS <= set(KERNEL_NAMES)
    for name in sorted(pdl.PDL_KERNELS):
        fam = next((f for rx, f in FAMILIES if rx.fullmatch(name)), "missing")
        assert fam != "missing", f"{name}: no source family known to wait"
        body = _body(SOURCE, fam or name)
        assert "pdl_wait();" in body and "pdl_trigger();" in body, f"{name}: {fam or name} does not wait"
        # the trigger comes after the wait: at most two kernels of a step overlap
        assert body.index("pdl_wait();") < body.index("pdl_trigger();"), name
    # the kernels the other modules launch in a step without waiting are not in the set
    assert "rope_cache_x2" not in pdl.PDL_KERNELS and not any(n.startswith("gemm_") for n in pdl.PDL_KERNELS)
    assert (CSRC / "common.cuh").read_text().count("griddepcontrol.wait") == 1
