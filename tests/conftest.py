"""Shared fixtures: every test gets its own EDGE_RAG_HOME; tiny seeded models are built in tmp dirs."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def edge_home(tmp_path, monkeypatch):
    """Redirect all edge-rag state to a temp dir."""
    home = tmp_path / "edge-home"
    monkeypatch.setenv("EDGE_RAG_HOME", str(home))
    return home


def pytest_collection_modifyitems(config, items):
    """gpu/tensorrt tests skip with a reason where the hardware or library is absent."""
    has_gpu = _has_cuda()
    has_trt = _has_module("tensorrt")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with cupy (pip install 'edge-rag[cuda]')"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT (`import tensorrt`), which only JetPack / NVIDIA's index provide"))


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _has_cuda() -> bool:
    if os.environ.get("EDGE_RAG_NO_GPU"):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
