"""The cuda backend: our own kernels (NVRTC via CuPy), cuBLAS for prefill GEMMs, a paged KV
cache and CUDA graphs for decode steps. No PyTorch.

    available() -> bool     a GPU of compute capability >= 8.0 and cupy are present
    probe() -> dict         GPU name, compute capability, kernels compiled?, compile time
    CudaDecoderSession      edge.runtime.session.DecoderSession over an engine bundle (fp16 compute)
    open_session(bundle, precision="auto")   that session, or its fp32 compute form
                            (edge.runtime.cuda.fp32) for an fp32 bundle / precision="fp32"

Importing this package imports neither cupy nor numpy-heavy modules; `available()` does.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any


def _cupy_present() -> bool:
    return importlib.util.find_spec("cupy") is not None


NO_GPU_ENV = "EDGE_RAG_NO_GPU"


def gpu_disabled() -> str | None:
    """Why nothing may run on a GPU here ($EDGE_RAG_NO_GPU set), or None."""
    return f"{NO_GPU_ENV} is set" if os.environ.get(NO_GPU_ENV) else None


def available() -> bool:
    """True when cupy imports and device 0 is an NVIDIA GPU of compute capability >= 8.0."""
    if gpu_disabled() or not _cupy_present():
        return False
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        return int(cupy.cuda.Device(0).compute_capability) >= 80
    except Exception:
        return False


def probe(compile: bool = True) -> dict[str, Any]:
    """What `edge-rag doctor` prints about the GPU path. Never raises."""
    out: dict[str, Any] = {"binding": None, "gpu": None, "compute_capability": None, "kernels": "not compiled"}
    if not _cupy_present():
        out["reason"] = "cupy is not installed (pip install 'edge-rag[cuda]')"
        return out
    try:
        import cupy

        out["binding"] = f"cupy {cupy.__version__}"
        if cupy.cuda.runtime.getDeviceCount() < 1:
            out["reason"] = "no CUDA device visible"
            return out
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        out["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        cc = int(cupy.cuda.Device(0).compute_capability)
        out["compute_capability"] = f"{cc // 10}.{cc % 10}"
        out["memory_gib"] = round(props["totalGlobalMem"] / 2**30, 1)
        if cc < 80:
            out["reason"] = "compute capability < 8.0: the cuda backend needs Ampere or newer"
            return out
        if gpu_disabled():
            out["reason"] = f"{gpu_disabled()}: nothing runs on the GPU"
            return out
        if compile:
            from edge.runtime.cuda.kernels import load

            k = load(0)
            out["kernels"] = "compiled"
            out["compile_s"] = round(k.compile_s, 3)
            out["kernel_cache"] = k.cache_dir
    except Exception as e:  # report, never crash doctor
        out["reason"] = f"{type(e).__name__}: {e}"
    return out


def open_session(bundle: Any, *, precision: str = "auto", verify: bool = True, **kw: Any) -> Any:
    """A CUDA session over `bundle` (a Bundle or its path) computing in `precision`: "auto" is
    fp32 for a bundle of fp32 weights (the model's own numbers, ~1e-6 of transformers) and the
    fast fp16 engine otherwise; "fp16" / "fp32" force one (fp32 dequantizes int4 / int8
    weights). Other keywords go to the session (max_batch, max_context, device, ...)."""
    from edge.bundle import Bundle
    from edge.runtime.cuda.fp32 import resolve_precision

    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, kind="generator", verify=verify)
    if resolve_precision(b.manifest.quant.recipe, precision) == "fp32":
        from edge.runtime.cuda.fp32 import Fp32DecoderSession

        return Fp32DecoderSession(b, **kw)
    from edge.runtime.cuda.session import CudaDecoderSession

    return CudaDecoderSession(b, **kw)


def __getattr__(name: str):
    if name == "CudaDecoderSession":
        from edge.runtime.cuda.session import CudaDecoderSession

        return CudaDecoderSession
    raise AttributeError(name)


__all__ = ["available", "probe", "open_session", "CudaDecoderSession"]
