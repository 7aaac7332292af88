"""Python entry points to the native kernels alone (tests and bench/bench_native.py).

    y = linear(lin, x, threads=2, isa="avx2")   # x float32 [M, K] -> y float32 [M, N]
"""

from __future__ import annotations

import ctypes

import numpy as np

from edge.errors import BackendError
from edge.runtime.cpu.abi import ISA_NAMES
from edge.runtime.cpu.build import load
from edge.runtime.cpu.weights import NativeLinear


def isa_max() -> str:
    return ISA_NAMES[load().er_isa_max()]


def available_isas(lib: ctypes.CDLL | None = None) -> list[str]:
    """The kernel paths of lib (default: this CPU's build)."""
    return list(ISA_NAMES[: (lib or load()).er_isa_max() + 1])


def set_isa(isa: str | None, lib: ctypes.CDLL | None = None) -> str:
    """Pick the kernel path of lib (default: this CPU's build) for this process (None: the best it has); returns it."""
    code = -1 if isa is None else (ISA_NAMES.index(isa) if isa in ISA_NAMES else 99)
    lib = lib or load()
    got = lib.er_set_isa(code)
    if got < 0:
        raise BackendError(f"the {isa} kernel path is not available in this build", fix=f"use one of {', '.join(available_isas(lib))}")
    return ISA_NAMES[got]


def linear(lin: NativeLinear, x: np.ndarray, *, threads: int = 1, isa: str | None = None,
           build_flags: tuple[str, ...] = ()) -> np.ndarray:
    """build_flags: another build of native.c (tests: the avxvnni stand-in, edge.runtime.cpu.build.avxvnni_build)."""
    lib = load(tuple(build_flags))
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != lin.k:
        raise BackendError(f"linear input {x.shape} does not match in_features {lin.k}")
    out = np.empty((x.shape[0], lin.n), np.float32)
    if isa is not None:
        set_isa(isa, lib)
    try:
        st = lin.struct
        rc = lib.er_linear(ctypes.byref(st), x.shape[0], x.ctypes.data, out.ctypes.data, int(threads))
    finally:
        if isa is not None:
            lib.er_set_isa(-1)
    if rc != 0:
        raise BackendError(f"native linear failed ({rc})")
    return out
