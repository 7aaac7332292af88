"""Programmatic dependent launch (PDL, sm_90+) for the decode step's CUDA graph.

A decode step at batch 1 is ~230 short kernels in a chain (Llama-3-8B); each one's launch,
first loads and drain cost a few microseconds that no amount of bandwidth shortens. Launched
with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, a kernel may start while the one
before it is still running: its blocks load what does not depend on that kernel (a GEMV's first
weight chunk, attention's earlier K / V rows) and then wait in pdl_wait() (csrc/common.cuh)
until it has finished. Graph capture keeps these as programmatic edges.

CuPy launches without launch attributes, so these launches go through the driver's
cuLaunchKernelEx by ctypes, with the CUfunction CuPy compiled. Only kernels in PDL_KERNELS are
launched so (each calls pdl_wait() before reading what the kernel before writes, and writes
nothing before it); every other kernel keeps CuPy's ordinary launch, which waits for the whole
previous kernel as usual.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from edge.errors import BackendError

PDL_MIN_CC = 90  # griddepcontrol: Hopper and newer (Orin's sm_87 runs the same kernels without it)
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


def _bk_names() -> tuple[str, ...]:
    from edge.runtime.cuda.kernels_src import BK_EPILOGUES, bk_bases

    return tuple(f"{base}_{epi}" for base, _, _ in bk_bases() for epi in BK_EPILOGUES)


# Kernels whose source waits (pdl_wait) before touching what an earlier kernel of the step writes.
PDL_KERNELS = frozenset((
    "embed_rmsnorm", "add_rmsnorm", "argmax_rows_mb", "advance_inputs",
    "paged_attn_split_tk_d64", "paged_attn_split_tk_d128", "paged_attn_split_tk0_d64", "paged_attn_split_tk0_d128",
    "paged_attn_split_tk1_d64", "paged_attn_split_tk1_d128", "paged_attn_lr_d128",
    "paged_attn_lc8_d128", "pdl_nop",
    *(f"gemv_{k}_m{m}" for k in ("int4", "int8") for m in (1, 2, 4, 8, 16)), "gemv_int4_m1_r2", "gemv_int4_m1_r4",
    *_bk_names(),
))


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, 4 bytes of padding, a 64-byte value union
    # (int words, not c_char: reading a c_char array field gives a bytes copy, and writes to that copy are lost)
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int * 16)]


def _programmatic_attribute() -> _LaunchAttribute:
    """CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION with programmaticStreamSerializationAllowed = 1
    (the union's first int)."""
    attr = _LaunchAttribute()
    attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value[0] = 1
    return attr


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


_SCALARS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32, np.dtype(np.int64): ctypes.c_int64,
            np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


def marshal(args: tuple) -> list:
    """ctypes values of a kernel's arguments as CuPy would pass them: a device array -> its
    pointer (a view's own offset included), a numpy scalar -> its C type. Anything else (a bare
    Python int, whose C width CuPy guesses) is refused, so a launch never differs between the two."""
    out: list = []
    for a in args:
        data = getattr(a, "data", None)
        if data is not None and hasattr(data, "ptr"):
            out.append(ctypes.c_void_p(int(data.ptr)))
        elif isinstance(a, np.generic) and a.dtype in _SCALARS:
            out.append(_SCALARS[a.dtype](a.item()))
        else:
            raise BackendError(f"a programmatic launch cannot pass {type(a).__name__} {a!r}")
    return out


def _dim3(v: Any) -> tuple[int, int, int]:
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    t = tuple(int(x) for x in t) + (1,) * (3 - len(t))
    return t[0], t[1], t[2]


_DRIVER: Any = None


def _driver() -> Any:
    global _DRIVER
    if _DRIVER is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuLaunchKernelEx
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        _DRIVER = fn
    return _DRIVER


def available(cc: int) -> bool:
    """Can this process launch with PDL on a device of compute capability `cc`?"""
    if cc < PDL_MIN_CC:
        return False
    try:
        _driver()
    except (OSError, AttributeError):  # no driver library, or one older than CUDA 12
        return False
    return True


def launch(func: Any, grid: Any, block: Any, args: tuple, shared_mem: int, stream_ptr: int, programmatic: bool = True) -> None:
    """One launch of CuPy Function `func` through cuLaunchKernelEx on stream `stream_ptr`."""
    vals = marshal(args)
    ptrs = (ctypes.c_void_p * max(1, len(vals)))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
    attr = _programmatic_attribute()
    gx, gy, gz = _dim3(grid)
    bx, by, bz = _dim3(block)
    cfg = _LaunchConfig(gx, gy, gz, bx, by, bz, int(shared_mem), ctypes.c_void_p(int(stream_ptr)),
                        ctypes.pointer(attr) if programmatic else None, 1 if programmatic else 0)
    fn = getattr(func, "kernel", func)  # a cupy RawKernel holds its CUfunction in .kernel (a Function, .ptr)
    err = _driver()(ctypes.byref(cfg), ctypes.c_void_p(int(fn.ptr)), ptrs, None)
    if err:
        raise BackendError(f"cuLaunchKernelEx failed (CUresult {err})")


class PdlKernels:
    """Stands in for the session's kernels while a decode step is captured: PDL_KERNELS launch
    programmatically (all but the step's first launch, which has no kernel before it in the
    graph), everything else as CuPy launches it."""

    def __init__(self, k: Any, cp: Any):
        self.k, self.cp, self.launches, self.programmatic = k, cp, 0, 0

    def __getitem__(self, name: str) -> Any:
        f = self.k[name]
        if name not in PDL_KERNELS:
            def plain(grid, block, args, **kw):
                self.launches += 1
                f(grid, block, args, **kw)

            return plain

        def call(grid, block, args, shared_mem: int = 0):
            first = self.launches == 0
            self.launches += 1
            self.programmatic += 0 if first else 1
            launch(f, grid, block, args, shared_mem, self.cp.cuda.get_current_stream().ptr, programmatic=not first)

        return call

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.k, attr)
