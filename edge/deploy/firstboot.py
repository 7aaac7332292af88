"""First boot on the device: pick the fastest backend that works here, with the reason for each one
passed over, in the log (the journal, under systemd).

    tensorrt     `import tensorrt` works (JetPack ships it) -> the plan for this board and TensorRT
                 version is built into the cache on the first boot (edge.runtime.trt_cache), then loaded
    cuda         cupy and a GPU of compute capability >= 8.0 (Orin is 8.7)
    onnxruntime  always (CPU; the last resort, never skipped)

Each step that fails is logged as `backend X unavailable: <reason>` and the next one is tried; the
Generator that loaded is returned with the choice (`BackendChoice`), so the service reports it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import BackendError

CHAIN = ("tensorrt", "cuda", "onnxruntime")
log = logging.getLogger("edge.deploy")


@dataclass
class BackendChoice:
    backend: str
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it was passed over

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "skipped": dict(self.skipped)}


def _tensorrt_reason() -> str | None:
    """None when TensorRT can be tried, else why not."""
    try:
        import tensorrt  # noqa: F401  (JetPack's Python bindings)
    except ImportError as e:
        return f"TensorRT is not importable ({e})"
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        return f"the tensorrt backend needs CuPy for its buffers ({e}); pip install 'edge-rag[cuda]'"
    return None


def _cuda_reason() -> str | None:
    from edge.runtime import cuda

    if cuda.gpu_disabled():
        return cuda.gpu_disabled()
    try:
        if cuda.available():
            return None
        return cuda.probe(compile=False).get("reason") or "no usable CUDA GPU"
    except Exception as e:  # noqa: BLE001 - a broken binding is a reason, not a crash
        return f"{type(e).__name__}: {e}"


def open_generator(engine: str | Path, *, chain: tuple[str, ...] = CHAIN, threads: int | None = None):
    """(Generator, BackendChoice): the first backend of `chain` that loads `engine`."""
    from edge.runtime.generator import Generator

    choice = BackendChoice(backend="")
    last: Exception | None = None
    for backend in chain:
        reason = {"tensorrt": _tensorrt_reason, "cuda": _cuda_reason}.get(backend, lambda: None)()
        if reason is None:
            try:
                gen = Generator.from_bundle(engine, backend=backend, threads=threads)
            except Exception as e:  # noqa: BLE001 - any failure moves on to the next backend
                if backend == chain[-1]:
                    raise
                reason, last = f"{type(e).__name__}: {e}", e
            else:
                choice.backend = backend
                log.info("backend %s loaded %s%s", backend, engine,
                         "".join(f"; {b} skipped: {r}" for b, r in choice.skipped.items()))
                return gen, choice
        choice.skipped[backend] = reason
        log.warning("backend %s unavailable: %s", backend, reason)
    raise BackendError(f"no backend could load {engine}: {last}")
