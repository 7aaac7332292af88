"""The CUDA backend's kernels compile with NVRTC for Ampere, Orin (sm_87) and Hopper, without a
GPU: NVRTC ships as a pip wheel (the dev extra), so this runs in CI. Every kernel the session
looks up must be in the PTX as an entry (extern "C", unmangled)."""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edge.runtime.cuda.kernels import compile_options
from edge.runtime.cuda.kernels_src import KERNEL_NAMES, SOURCE

pytestmark = pytest.mark.slow


def _nvrtc():
    try:
        import nvidia.cuda_nvrtc
        import nvidia.cuda_runtime
    except ImportError:
        pytest.skip("needs the NVRTC wheels (pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12)")
    lib = next(Path(p) / "lib" / "libnvrtc.so.12" for p in nvidia.cuda_nvrtc.__path__)
    include = next(Path(p) / "include" for p in nvidia.cuda_runtime.__path__)
    return ctypes.CDLL(str(lib)), include


def _ptx(source: str, options: tuple[str, ...], cc: int) -> str:
    """NVRTC's PTX of `source` with the backend's `options` (sm_xx as the virtual compute_xx)."""
    lib, include = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"edge_rag.cu", 0, None, None) == 0
    opts = [o.replace("sm_", "compute_") for o in options] + [f"-I{include}"]
    arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()[:3000]
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    text = ptx.value.decode()
    assert f".target sm_{cc}" in text
    return text


CCS = (80, 87, 90)


@functools.cache
def _main_module_ptx() -> dict[int, str]:
    """The main module's PTX for every target, compiled side by side: NVRTC runs outside the GIL, and
    one compile of the whole module takes ~105 s on a 2-core CI machine (three in a row were 330 s)."""
    with ThreadPoolExecutor(len(CCS)) as pool:
        return dict(zip(CCS, pool.map(lambda cc: _ptx(SOURCE, compile_options(cc), cc), CCS)))


@pytest.mark.parametrize("cc", CCS)
def test_kernels_compile_for(cc):
    text = _main_module_ptx()[cc]
    missing = [name for name in KERNEL_NAMES if f".entry {name}(" not in text]
    assert not missing, f"kernels missing from the PTX: {missing}"


@pytest.mark.parametrize("cc", [80, 87, 90])
def test_fp32_kernels_compile_for(cc):
    """The fp32 compute mode's module (edge.runtime.cuda.fp32), with its options (no fast math)."""
    from edge.runtime.cuda import fp32

    text = _ptx(fp32.source(), fp32.compile_options(cc), cc)
    missing = [name for name in fp32.KERNEL_NAMES if f".entry {name}(" not in text]
    assert not missing, f"kernels missing from the PTX: {missing}"


@pytest.mark.parametrize("cc", [80, 87, 90])
def test_encoder_kernels_compile_for(cc):
    """The GPU embedder's module (edge.runtime.cuda.embedder: common.cuh + flash_prefill.cu + encoder.cu)."""
    from edge.runtime.cuda.embedder import ENCODER_KERNELS, encoder_source

    text = _ptx(encoder_source(), compile_options(cc), cc)
    missing = [name for name in ENCODER_KERNELS if f".entry {name}(" not in text]
    assert not missing, f"kernels missing from the PTX: {missing}"
