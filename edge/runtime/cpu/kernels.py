"""Python entry points to the native kernels alone (tests and bench/bench_native.py).

    y = linear(lin, x, threads=2, isa="avx2")   # x float32 [M, K] -> y float32 [M, N]
"""

from __future__ import annotations

import ctypes

import numpy as np

from edge.errors import BackendError
from edge.runtime.cpu.abi import ISA_NAMES
from edge.runtime.cpu.build import ISA_ENV, TILE_CODE, load, tile_name
from edge.runtime.cpu.weights import NativeLinear


def isa_max() -> str:
    return ISA_NAMES[load().er_isa_max()]


def available_isas(lib: ctypes.CDLL | None = None) -> list[str]:
    """The kernel paths of lib (default: this CPU's build)."""
    return list(ISA_NAMES[: (lib or load()).er_isa_max() + 1])


def set_isa(isa: str | None, lib: ctypes.CDLL | None = None) -> str:
    """Pick the kernel path of lib (default: this CPU's build) for this process (None: the best it has); returns its
    name (edge.runtime.cpu.build.tile_name: "avxvnni" where the avx2 tile takes its dots by vpdpbusd)."""
    lib = lib or load()
    name = TILE_CODE.get(isa, isa) if isa in TILE_CODE and lib.er_ymm_vnni() else isa
    code = -1 if name is None else (ISA_NAMES.index(name) if name in ISA_NAMES else 99)
    got = lib.er_set_isa(code)
    if got < 0:
        paths = ", ".join(tile_name(lib, ISA_NAMES.index(i)) for i in available_isas(lib))
        if isa in TILE_CODE:  # a build of its own, not a path of this one
            raise BackendError(f"the {isa} kernel path is a build of its own, not a path of this one ({paths})",
                               fix=f"set {ISA_ENV}={isa}")
        raise BackendError(f"the {isa} kernel path is not available in this build", fix=f"use one of {paths}")
    return tile_name(lib, got)


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
