"""Compile the CUDA backend's kernels once (NVRTC through cupy.RawModule) and cache them on disk.

The cubins land under $EDGE_RAG_HOME/kernels (CuPy's kernel cache, keyed by source, options,
NVRTC version and arch), so a second process loads them in milliseconds. The target is the
running device's own compute capability (sm_80, sm_87, sm_90, ...); the source uses nothing
newer than sm_80.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.errors import BackendError
from edge.textsafe import say
from edge.runtime.cuda.kernels_src import BK_VARIANTS, KERNEL_NAMES, SOURCE  # noqa: F401 (BK_VARIANTS: re-exported)

MIN_COMPUTE_CAPABILITY = 80
COMPILE_NOTE_S = 2.0  # a compile still running after this says so on stderr (load)
GEMV_TILES = (1, 2, 4, 8, 16)  # rows of X per GEMV launch-y (compile-time MT)
GEMV_ROWS_PER_WARP = {1: 1, 2: 1, 4: 2, 8: 4, 16: 4}  # int4/int8 kernels: weight rows per warp (R)
SOURCE_HASH = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
PICKS_FILE = "gemv_picks.json"
NULL = np.uint64(0)  # a null pointer argument (no bias, no norm weight)


def i32(v: int) -> np.int32:
    """An int kernel argument (cupy passes a Python int as 64 bits)."""
    return np.int32(v)


def kernel_cache_dir() -> str:
    from edge.paths import home

    d = home() / "kernels"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def load_picks() -> dict[str, str]:
    """Autotuned GEMV picks ("gpu|sm_xx|source|shape" -> kernel variant); {} when absent or unreadable."""
    try:
        with open(os.path.join(kernel_cache_dir(), PICKS_FILE)) as f:
            d = json.load(f)
        return {str(k): str(v) for k, v in d.items()} if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def save_picks(picks: dict[str, str]) -> None:
    """Write the picks atomically (a killed process leaves the old file or the new one)."""
    path = os.path.join(kernel_cache_dir(), PICKS_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(picks, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only home only costs re-tuning at the next load
        pass


def gpu_name(device_id: int = 0) -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def compile_options(cc: int) -> tuple[str, ...]:
    """NVRTC options for compute capability `cc` (e.g. 87 -> sm_87)."""
    return ("-std=c++17", f"--gpu-architecture=sm_{cc}", "--use_fast_math")


@dataclass
class Kernels:
    """The compiled module: `k["gemv_int4_m1"](grid, block, args, shared_mem=...)`."""

    module: Any
    functions: dict[str, Any]
    compile_s: float
    cc: int
    cache_dir: str
    options: tuple[str, ...] = field(default=())
    smem_optin: int = 48 * 1024  # the GPU's most dynamic shared memory per block (after opting in)

    def __getitem__(self, name: str):
        return self.functions[name]

    def gemv_tile(self, m: int) -> int:
        """Smallest compiled MT >= m (16 for larger m: launch-y tiles the rest)."""
        for t in GEMV_TILES:
            if m <= t:
                return t
        return GEMV_TILES[-1]


_CACHE: dict[int, Kernels] = {}


def load(device_id: int = 0) -> Kernels:
    """Compile (or load from the disk cache) every kernel for device `device_id`."""
    if device_id in _CACHE:
        return _CACHE[device_id]
    import cupy

    os.environ.setdefault("CUPY_CACHE_DIR", kernel_cache_dir())
    with cupy.cuda.Device(device_id) as dev:
        cc = int(dev.compute_capability)
        if cc < MIN_COMPUTE_CAPABILITY:
            raise BackendError(
                f"GPU {device_id} has compute capability {cc / 10:.1f}; the cuda backend needs 8.0 or newer",
                fix="use --backend onnxruntime",
            )
        opts = compile_options(cc)
        t0 = time.perf_counter()
        # a first use compiles for minutes (96 s on an H200 host, docs/measurements.md); CuPy's cache hit takes well under a
        # second, and which it will be is not known up front: say so once the wait outlasts a cache hit
        note = threading.Timer(COMPILE_NOTE_S, say, (f"compiling the cuda backend's kernels for {gpu_name(device_id)} "
                                                     f"(once, a minute or more; cached in {os.environ['CUPY_CACHE_DIR']})",))
        note.daemon = True
        note.start()
        try:
            mod = cupy.RawModule(code=SOURCE, options=opts)
            funcs = {name: mod.get_function(name) for name in KERNEL_NAMES}
            # cudaDevAttrMaxSharedMemoryPerBlockOptin, less room for a kernel's static shared memory
            optin = int(cupy.cuda.runtime.deviceGetAttribute(97, device_id)) - 1024
            for name in KERNEL_NAMES:  # the cp.async-ring GEMMs size their shared memory per linear (gemm.async_smem)
                if name.startswith("gemm_") and name.rsplit("_", 1)[1].startswith("a"):
                    funcs[name].max_dynamic_shared_size_bytes = optin
        except Exception as e:  # CompileException, CUDADriverError
            raise BackendError(f"the cuda backend's kernels failed to compile: {e}", fix="report this with `edge-rag doctor` output") from e
        finally:
            note.cancel()
        dt = time.perf_counter() - t0
    k = Kernels(mod, funcs, dt, cc, os.environ["CUPY_CACHE_DIR"], opts, optin)
    _CACHE[device_id] = k
    return k
