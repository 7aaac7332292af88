"""Embedding engine: ONNX encoder bundles against sentence-transformers (the oracle).

Fast tests build tiny seeded BERT models (2 layers, hidden 64, vocab 256) in sentence-transformers
layout, BGE-style (CLS + Normalize), E5-style (mean + Normalize) and max pooling without
normalisation; the slow tests check the real default all-MiniLM-L6-v2 on 200 varied texts.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.bundle import Bundle
from edge.build.encoder import build_embedder_bundle
from edge.errors import BackendError, BundleError, EdgeRagError, ModelError, UsageError
from edge.models.bert import read_bert_folder
import edge.runtime.embedder as embedder_mod
from edge.runtime.embedder import Embedder, length_buckets

sys.path.insert(0, str(Path(__file__).parent))
from helpers_tiny import _WORDS, make_tiny_st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_embed import varied_texts  # noqa: E402

# ---- helpers --------------------------------------------------------------------------

def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def _assert_close_to_oracle(ours: np.ndarray, ref: np.ndarray, texts: list[str], min_cos: float) -> None:
    cos = _cosines(ours, ref)
    worst = int(np.argmin(cos))
    assert cos.min() >= min_cos, (
        f"min cosine {cos.min():.5f} < {min_cos} (mean {cos.mean():.5f}) at text {worst} {texts[worst][:60]!r}; "
        f"max-abs-diff {np.abs(ours - ref).max():.2e}; first values ours {ours[worst, :4]} ref {ref[worst, :4]}")


# ---- tiny models: BGE / E5 / max pooling ------------------------------------------------

TINY_CASES = {  # name: (pooling, normalize)
    "bge_cls_norm": ("cls", True),
    "e5_mean_norm": ("mean", True),
    "max_nonorm": ("max", False),
}


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_st")
    return {name: make_tiny_st(root / name, pool, norm, seed=i) for i, (name, (pool, norm)) in enumerate(TINY_CASES.items())}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_matches_sentence_transformers(case, tiny_folders, tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = tiny_folders[case]
    pooling, normalize = TINY_CASES[case]
    spec = read_bert_folder(folder).spec
    assert (spec.pooling, spec.normalize, spec.dim, spec.max_seq_length) == (pooling, normalize, 64, 48)
    emb = Embedder.from_bundle(build_embedder_bundle(folder, tmp_path / "b", progress=False), threads=1)
    texts = varied_texts(40, seed=1)
    ours = emb.embed(texts, batch_size=8)
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=8, convert_to_numpy=True)
    assert ours.shape == ref.shape == (40, 64) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-3)
    _assert_close_to_oracle(ours, ref, texts, 0.9999)
    norms = np.linalg.norm(ours, axis=1)
    if normalize:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    else:
        assert np.abs(norms - 1.0).max() > 1e-2  # really left unnormalised


@pytest.mark.parametrize("form,op", [("unfused", "Softmax"), ("mha", "MultiHeadAttention"),
                                     ("mha-unpadded", "MultiHeadAttention")])
def test_tiny_attention_forms_match(tiny_folders, tmp_path, monkeypatch, form, op):
    """The standard-ops attention (no ORT contrib Attention) and MatMul + MultiHeadAttention (the
    int8 graph's form) give the fused op's vectors, padding included."""
    import edge.build.encoder as enc

    folder = tiny_folders["e5_mean_norm"]
    fused = Embedder.from_bundle(build_embedder_bundle(folder, tmp_path / "f", progress=False))
    monkeypatch.setattr(enc, "ATTENTION_IMPL", form)
    unfused = Embedder.from_bundle(build_embedder_bundle(folder, tmp_path / "u", progress=False))
    import onnx

    ops = {n.op_type for n in onnx.load(str(unfused.bundle.path / "model.onnx")).graph.node}
    assert "Attention" not in ops and op in ops
    texts = varied_texts(24, seed=4)
    np.testing.assert_allclose(unfused.embed(texts, batch_size=6), fused.embed(texts, batch_size=6), atol=2e-5)


def test_tiny_int8_close(tiny_folders, tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = tiny_folders["e5_mean_norm"]
    emb = Embedder.from_bundle(build_embedder_bundle(folder, tmp_path / "q", quant="int8", progress=False), threads=1)
    assert emb.bundle.manifest.quant.recipe == "int8"
    texts = varied_texts(30, seed=2)
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    _assert_close_to_oracle(emb.embed(texts), ref, texts, 0.98)  # random tiny weights: looser than the real model


def test_manifest_and_embedder_id(tiny_folders, tmp_path):
    folder = tiny_folders["bge_cls_norm"]
    a = build_embedder_bundle(folder, tmp_path / "a", progress=False)
    b = build_embedder_bundle(folder, tmp_path / "b", progress=False)
    q = build_embedder_bundle(folder, tmp_path / "q", quant="int8", progress=False)
    ma, mb, mq = (Bundle.open(p, kind="embedder").manifest for p in (a, b, q))
    assert {"name", "arch", "dim", "max_seq_length", "pooling", "normalize", "vocab_size"} <= set(ma.model)
    assert ma.model["arch"] == "bert" and ma.model["vocab_size"] == 256 and ma.model["pooling"] == "cls"
    assert ma.embedder_id == mb.embedder_id  # stable across rebuilds
    assert ma.embedder_id != mq.embedder_id  # quant is part of the identity
    assert ma.limits is None and mq.quant.details["smooth_alpha"] > 0
    other = make_tiny_st(tmp_path / "other", "cls", True, seed=99)  # same config, other weights
    mo = Bundle.open(build_embedder_bundle(other, tmp_path / "o", progress=False)).manifest
    assert mo.embedder_id != ma.embedder_id
    for name in ("model.onnx", "tokenizer.json"):
        assert name in ma.artifacts
    emb = Embedder.from_bundle(a)
    assert (emb.dim, emb.max_seq_length, emb.embedder_id) == (64, 48, ma.embedder_id)


def test_corrupted_bundle_refused(tiny_folders, tmp_path):
    p = build_embedder_bundle(tiny_folders["bge_cls_norm"], tmp_path / "a", progress=False)
    with open(p / "model.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="checksum"):
        Embedder.from_bundle(p)


# ---- bucketing, truncation, tokens ------------------------------------------------------

def test_length_buckets_is_a_permutation_sorted_by_length():
    lengths = [5, 1, 9, 3, 9, 2, 7]
    batches = length_buckets(lengths, 3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 1]
    seen = [lengths[i] for i in flat]
    assert seen == sorted(lengths, reverse=True)
    with pytest.raises(UsageError):
        length_buckets(lengths, 0)
    exact = length_buckets(lengths + [9, 9], 3, exact=True)  # one length a batch, still longest first
    assert [[(lengths + [9, 9])[i] for i in b] for b in exact] == [[9, 9, 9], [9], [7], [5], [3], [2], [1]]
    assert sorted(np.concatenate(exact).tolist()) == list(range(len(lengths) + 2))


def test_cpu_batches_are_cut_to_max_batch_tokens(tiny_folders, tmp_path, monkeypatch):
    """Whatever batch_size the caller asks for, the ONNX Runtime path runs at most MAX_BATCH_TOKENS
    tokens (B * S) a call (small batches stay in cache: edge.runtime.embedder), in input order."""
    from edge.runtime import embedder as embedder_mod

    assert [len(b) for b in length_buckets([100] * 7 + [10] * 40, 32, max_tokens=300)] == [3, 3, 3, 30, 8]
    assert [len(b) for b in length_buckets([900, 5], 32, max_tokens=300)] == [1, 1]  # one long text alone
    emb = Embedder.from_bundle(build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "b", progress=False))
    monkeypatch.setattr(embedder_mod, "MAX_BATCH_TOKENS", 40)
    shapes, run = [], emb._run
    monkeypatch.setattr(emb, "_run", lambda batch: shapes.append((len(batch), max(map(len, batch)))) or run(batch))
    rng = random.Random(5)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12))) for _ in range(20)]
    out = emb.embed(texts, batch_size=32)
    assert len(shapes) > 1 and all(b * s <= 40 or b == 1 for b, s in shapes), shapes
    one_by_one = np.stack([emb.embed_query(t) for t in texts])
    np.testing.assert_allclose(out, one_by_one, atol=1e-4)


def test_cpu_cores_run_calls_at_once_with_the_same_vectors(tiny_folders, tmp_path):
    """threads=3 on CPU: three graph calls at once, one thread each (edge.runtime.embedder
    STREAMS_NOTE); the vectors and their order are those of one call at a time."""
    path = build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "q", quant="int8", progress=False)
    one, three = Embedder.from_bundle(path, threads=1), Embedder.from_bundle(path, threads=3)
    assert (one.streams, three.streams) == (1, 3)
    rng = random.Random(9)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 40))) for _ in range(90)]
    a, b = one.embed(texts, batch_size=4), three.embed(texts, batch_size=4)
    np.testing.assert_allclose(b, a, atol=1e-6)
    np.testing.assert_allclose(b[17], one.embed_query(texts[17]), atol=1e-6)


def test_bucketing_preserves_order(tiny_folders, tmp_path, monkeypatch):
    emb = Embedder.from_bundle(build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "b", progress=False))
    rng = random.Random(3)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 40))) for _ in range(23)]
    one_by_one = np.stack([emb.embed_query(t) for t in texts])
    batched = emb.embed(texts, batch_size=5)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert emb.embed([]).shape == (0, 64)
    monkeypatch.setattr(embedder_mod, "ENCODE_PIECE", 4)  # tokenized in pieces: same order, same vectors
    np.testing.assert_allclose(emb.embed(texts, batch_size=5), one_by_one, atol=1e-5)
    with pytest.raises(UsageError):
        emb.embed("not a list")  # type: ignore[arg-type]


def test_truncation_and_count_tokens(tiny_folders, tmp_path):
    emb = Embedder.from_bundle(build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "b", progress=False))
    long = " ".join(["battery"] * 200)
    assert emb.count_tokens(long) == 202  # untruncated, [CLS] and [SEP] included
    assert emb.count_tokens("battery") == 3
    ids = emb.tokenizer.encode(long).ids
    assert len(ids) == emb.max_seq_length == 48
    head = " ".join(["battery"] * 46)  # exactly what survives truncation
    np.testing.assert_allclose(emb.embed_query(long), emb.embed_query(head), atol=1e-5)
    vecs, n = emb.embed_counted([long, "battery"])
    assert n == 48 + 3  # usage: what the model read
    np.testing.assert_allclose(vecs, emb.embed([long, "battery"]), atol=1e-6)
    texts = [long, "battery", "", "the battery, the battery"] + [" ".join(["battery"] * k) for k in range(40)]
    assert emb.count_tokens_many(texts) == [emb.count_tokens(t) for t in texts]  # no padding, no truncation


def test_max_tokens_reads_the_head_of_each_text_as_the_tokenizer_would_cut_it(tiny_folders, tmp_path):
    """embed(..., max_tokens=N): each text's first N - 1 ids and its [SEP], exactly the tokenizer's own
    truncation at N; shorter texts are untouched; the usage count is what was read."""
    from tokenizers import Tokenizer

    emb = Embedder.from_bundle(build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "b", progress=False))
    rng = random.Random(5)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 40))) for _ in range(30)]
    cut = Tokenizer.from_file(str(emb.bundle.file("tokenizer.json")))
    cut.no_padding()
    cut.enable_truncation(max_length=12)
    want = [e.ids for e in cut.encode_batch(texts)]
    assert emb._encode(texts, max_tokens=12) == want
    assert any(len(x) == 12 for x in want) and any(len(x) < 12 for x in want)
    capped, n = emb.embed_counted(texts, batch_size=4, max_tokens=12)
    assert n == sum(map(len, want))
    ref = Embedder.from_bundle(emb.bundle.path)
    ref.tokenizer = cut  # the tokenizer's own cut at 12
    np.testing.assert_allclose(capped, ref.embed(texts, batch_size=4), atol=1e-6)
    full = emb.embed(texts, batch_size=4)
    longer = [i for i, x in enumerate(emb._encode(texts)) if len(x) > 12]
    shorter = [i for i, x in enumerate(emb._encode(texts)) if len(x) <= 12]
    assert not np.allclose(capped[longer], full[longer], atol=1e-3)
    np.testing.assert_allclose(capped[shorter], full[shorter], atol=1e-5)
    np.testing.assert_allclose(emb.embed(texts, max_tokens=1000), full, atol=1e-6)  # above max_seq_length: no cut
    with pytest.raises(UsageError, match="max_tokens"):
        emb.embed(texts, max_tokens=1)


# ---- bad folders --------------------------------------------------------------------------

def test_bad_folders_raise_clear_errors(tiny_folders, tmp_path):
    import shutil

    with pytest.raises(ModelError, match="no such folder"):
        read_bert_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="modules.json"):
        build_embedder_bundle(empty, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written

    src = tiny_folders["bge_cls_norm"]
    binonly = tmp_path / "binonly"
    shutil.copytree(src, binonly)
    (binonly / "model.safetensors").rename(binonly / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors") as e:
        read_bert_folder(binonly)
    assert "safe_serialization" in str(e.value)

    other = tmp_path / "gpt"
    shutil.copytree(src, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="gpt2"):
        read_bert_folder(other)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        read_bert_folder(corrupt)

    trunc = tmp_path / "trunc"
    shutil.copytree(src, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot read weights"):
        build_embedder_bundle(trunc, tmp_path / "out2", progress=False)

    with pytest.raises(UsageError, match="int8"):
        build_embedder_bundle(src, tmp_path / "out3", quant="int3", progress=False)
    assert all(issubclass(c, EdgeRagError) for c in (ModelError, UsageError, BundleError))


def test_runtime_imports_no_torch():
    code = ("import sys, edge.runtime.embedder; "
            "bad = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# ---- the real default model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def default_parity(tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    from edge.models.defaults import default_embedder_path

    folder = default_embedder_path()
    root = tmp_path_factory.mktemp("default_embedder")
    texts = varied_texts(200)
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=32, convert_to_numpy=True)
    return folder, root, texts, ref


@pytest.mark.slow
@pytest.mark.parametrize("quant,min_cos", [("fp32", 0.999), ("int8", 0.99)])
def test_default_minilm_parity(default_parity, quant, min_cos):
    folder, root, texts, ref = default_parity
    emb = Embedder.from_bundle(build_embedder_bundle(folder, root / quant, quant=quant, progress=False))
    assert emb.embedder_id.startswith("all-MiniLM-L6-v2@") and emb.embedder_id.endswith(quant)
    assert (emb.dim, emb.max_seq_length, emb.normalize) == (384, 256, True)
    ours = emb.embed(texts, batch_size=32)
    _assert_close_to_oracle(ours, ref, texts, min_cos)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-4)
    # and a text's vector does not depend on its batch-mates (int8: per-row activation scales)
    alone = np.stack([emb.embed_query(t) for t in texts[:40]])
    np.testing.assert_allclose(alone, ours[:40], atol=1e-5)


@pytest.mark.slow
def test_default_embedder_bundle_built_once_and_cached(edge_home):
    from edge.engines import default_embedder_bundle

    path = default_embedder_bundle(progress=False)
    assert path.parent == edge_home / "engines"
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert default_embedder_bundle(progress=False) == path
    assert (path / "manifest.json").stat().st_mtime_ns == stamp  # cached, not rebuilt
    emb = Embedder.from_bundle(path)
    v = emb.embed(["What does error E-214 mean?", "LiDAR point cloud degraded", "battery charging time"])
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2]  # the real model ranks the related passage higher


def test_relevance_gate_is_calibrated_into_the_manifest_and_read_by_the_retriever(tiny_folders, tmp_path):
    from edge.build.relevance import OFF_TOPIC, _passages
    from rag.retrieve import gate_of

    emb = Embedder.from_bundle(build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "g", progress=False), threads=1)
    gate = emb.bundle.manifest.relevance_gate
    assert {"min_cosine", "min_cosine_with_keywords", "min_keyword_coverage", "on_topic_p10"} <= set(gate)
    # measured on this embedder (whether a random tiny model separates is its own affair: the rule is
    # tested in test_relevance_gate_of_an_embedder_that_cannot_separate_refuses_nothing)
    from edge.build.relevance import MARGIN

    top = (emb.embed(list(OFF_TOPIC)) @ emb.embed(_passages()).T).max(axis=1)
    assert gate["off_topic_max"] == pytest.approx(float(top.max()), abs=2e-3)
    assert gate["min_cosine"] == (pytest.approx(float(top.max()) + MARGIN, abs=2e-3) if gate["separates"] else -1.0)
    assert gate_of(emb) == {k: gate[k] for k in ("min_cosine", "min_cosine_with_keywords", "min_keyword_coverage")}


def test_int8_bundle_built_for_a_vnni_cpu_is_flagged_on_one_without(tiny_folders, tmp_path, monkeypatch):
    from edge.runtime.embedder import isa_mismatch

    monkeypatch.setenv("EDGE_RAG_U8S8", "exact")  # as built on an AVX-512 VNNI or ARM CPU
    full = Bundle.open(build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "v", quant="int8", progress=False)).manifest
    monkeypatch.setenv("EDGE_RAG_U8S8", "saturates")  # as built on an AVX2-only x86
    seven = Bundle.open(build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "a", quant="int8", progress=False)).manifest
    assert full.quant.details["u8s8_exact"] is True and seven.quant.details["u8s8_exact"] is False
    # now "running" on the AVX2-only CPU: the full-range bundle is flagged, the 7-bit one is not
    assert "saturate" in isa_mismatch(full) and isa_mismatch(seven) is None
    monkeypatch.setenv("EDGE_RAG_U8S8", "exact")
    assert isa_mismatch(full) is None and isa_mismatch(seven) is None


def test_an_int8_bundle_on_onnxruntime_warns_where_only_the_native_encoder_is_exact(tiny_folders, tmp_path, monkeypatch, capsys):
    """On an AVX2-only x86 the native encoder computes int8 weights exactly and onnxruntime does not: asking for the
    onnxruntime backend there says so; the default backend does not warn."""
    import edge.cpu
    from edge.runtime.cpu import encoder as enc_mod
    from edge.runtime.embedder import isa_mismatch

    monkeypatch.setenv("EDGE_RAG_U8S8", "exact")
    path = build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "v", quant="int8", progress=False)
    monkeypatch.delenv("EDGE_RAG_U8S8")
    monkeypatch.setattr(edge.cpu, "u8s8_exact", lambda *a, **k: False)  # onnxruntime saturates here
    monkeypatch.setattr(enc_mod, "int8_exact", lambda: True)  # the native encoder does not
    m = Bundle.open(path).manifest
    assert isa_mismatch(m) is None and "native encoder" in isa_mismatch(m, onnxruntime=True)
    Embedder.from_bundle(path, backend="onnxruntime")
    assert "saturate in onnxruntime" in capsys.readouterr().err


def test_a_cached_uint8_embedder_is_rebuilt_where_the_native_encoder_takes_int8(tiny_folders, tmp_path, monkeypatch):
    """A bundle built for onnxruntime on an AVX2-only x86 (uint8 weights) is rebuilt once encoder.c's AVX2 kernels
    can run there (int8 weights, which they compute exactly); kept where they cannot."""
    from edge.engines import _embedder_stale
    from edge.runtime.cpu import encoder as enc_mod

    monkeypatch.setenv("EDGE_RAG_U8S8", "saturates")
    u8 = build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "u8", quant="int8", progress=False)
    monkeypatch.delenv("EDGE_RAG_U8S8")
    monkeypatch.setattr(enc_mod, "int8_exact", lambda: True)
    assert "uint8" in _embedder_stale(u8)
    monkeypatch.setattr(enc_mod, "int8_exact", lambda: False)
    assert _embedder_stale(u8) is None


@pytest.mark.parametrize("cpu,weight_dtype", [("exact", np.int8), ("saturates", np.uint8)])
def test_int8_format_follows_the_cpu_and_every_linear_is_quantized_per_row(tiny_folders, tmp_path, monkeypatch, cpu, weight_dtype):
    import onnx
    from onnx import numpy_helper
    from sentence_transformers import SentenceTransformer

    monkeypatch.setenv("EDGE_RAG_U8S8", cpu)  # "exact": VNNI / ARM; "saturates": AVX2-only x86
    folder = tiny_folders["e5_mean_norm"]
    emb = Embedder.from_bundle(build_embedder_bundle(folder, tmp_path / cpu, quant="int8", progress=False), threads=1,
                               backend="onnxruntime")  # the graph's own runtime (the native encoder: test_native_encoder.py)
    g = onnx.load(str(emb.bundle.path / "model.onnx")).graph
    inits = {i.name: i for i in g.initializer}
    by_op: dict[str, list] = {}
    for n in g.node:
        by_op.setdefault(n.op_type, []).append(n)
    # u8 x s8 where it is exact, u8 x u8 where u8 x s8 saturates; never 7-bit weights
    gemms = by_op["MatMulIntegerToFloat"]
    for n in gemms:
        w = numpy_helper.to_array(inits[n.input[1]])
        assert w.dtype == weight_dtype, (n.name, w.dtype)
        assert weight_dtype == np.uint8 or np.abs(w.astype(np.int32)).max() > 64, n.name
    # every linear is int8 (q, k, v, o, up, down per layer); nothing fp32 or quantized per call is left
    assert len(gemms) == 2 * 6 and len(by_op["MultiHeadAttention"]) == 2
    # no padding mask (ORT's flash attention path), and the manifest tells the runtime so
    assert all(len(n.input) == 4 for n in by_op["MultiHeadAttention"])
    assert emb.bundle.manifest.graph["padding"] == "none" and emb.unpadded
    for op in ("MatMul", "Attention", "QAttention", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits"):
        assert not by_op.get(op), op
    # each GEMM's activations come from a QuantizeLinear of constant scale (the row's own scale is
    # applied before it): q, k and v share one
    made_by = {o: n for n in g.node for o in n.output}
    quantizers = {made_by[n.input[0]].name for n in gemms}
    assert all(made_by[n.input[0]].op_type == "QuantizeLinear" and n.input[2] in inits for n in gemms)
    assert len(quantizers) == 2 * 4
    d = emb.bundle.manifest.quant.details
    assert d["u8s8_exact"] is (cpu == "exact") and d["activation_scales"] == "per_row"
    assert d["int8_linears"][:4] == [f"/model/layers.0/{t}" for t in ("attn/qkv/q", "attn/qkv/k", "attn/qkv/v", "attn/o_proj")]
    texts = varied_texts(30, seed=2)
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    _assert_close_to_oracle(emb.embed(texts), ref, texts, 0.98)


def test_int8_vector_does_not_depend_on_the_batch(tiny_folders, tmp_path):
    """A text embeds to the same vector alone as beside much longer texts (each row's activations
    have their own scale: edge.build.encoder.quantize_linears_per_row)."""
    emb = Embedder.from_bundle(build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "q", quant="int8", progress=False),
                               threads=1, backend="onnxruntime")
    short = ["a", "reset", "battery life"]
    rng = random.Random(7)
    long = [" ".join(rng.choice(_WORDS) for _ in range(60)) for _ in range(5)]
    alone = np.stack([emb.embed_query(t) for t in short])
    # the int8 graph reads no padding mask: a call's rows have one length, so each text's batch-mates
    # are the long texts cut to its length (other tokens, other magnitudes)
    long_ids = emb._encode(long)
    for t, v in zip(short, alone):
        ids = emb._encode([t])[0]
        mates = [x[:len(ids) - 1] + [x[-1]] for x in long_ids]
        np.testing.assert_allclose(emb._run(mates + [ids])[-1], v, atol=2e-6)
    with pytest.raises(BackendError, match="one length"):  # padding would be read as tokens: refused
        emb._run([emb._encode([t])[0] for t in long + short])


def test_per_row_int8_linear_matches_a_numpy_reference(tmp_path):
    """quantize_linears_per_row against a plain numpy transcription: per-column weights, each row
    scaled by its own max |x| to 127 around 128; every row's output is the same alone or not."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edge.build.encoder import MS_DOMAIN, int8_weight_type, quantize_linears_per_row
    from edge.cpu import u8s8_exact
    from edge.runtime.embedder import open_ort_session

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 20)).astype(np.float32)
    x = (rng.standard_normal((3, 5, 48)) * rng.uniform(0.01, 30, (3, 5, 1))).astype(np.float32)
    x[1, 2] = 0.0  # an all-zero row stays finite
    # ONNX Runtime's u8 x s8 GEMM saturates its int16 pair sums on x86 without VNNI (edge.cpu), so
    # int8 weights are checked only where they are exact; there the build must pick uint8.
    if not u8s8_exact():
        assert int8_weight_type(u8s8_exact()) == "uint8"
    for wtype in ("int8", "uint8") if u8s8_exact() else ("uint8",):
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "/m/lin.weight"], ["y"], name="/m/lin/MatMul")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 48])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  initializer=[numpy_helper.from_array(w, "/m/lin.weight")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = 9
        assert quantize_linears_per_row(model, ("lin",), wtype) == ["/m/lin"]
        onnx.save_model(model, str(tmp_path / f"{wtype}.onnx"))
        sess = open_ort_session(tmp_path / f"{wtype}.onnx", threads=1)
        ours = sess.run(None, {"x": x})[0]
        # reference: weights per column; activations per row
        if wtype == "int8":
            ws = np.abs(w).max(0) / 127
            wq, wzp = np.clip(np.rint(w / ws), -127, 127), 0
        else:
            lo, hi = np.minimum(w.min(0), 0), np.maximum(w.max(0), 0)
            ws = (hi - lo) / 255
            wzp = np.rint(-lo / ws)
            wq = np.clip(np.rint(w / ws) + wzp, 0, 255)
        r = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-12)
        xq = np.clip(np.rint(x / r * 127) + 128, 0, 255)
        ref = ((xq - 128) @ (wq - wzp)) * (ws / 127) * r
        np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
        assert np.abs(ours - x @ w).max() < 0.02 * np.abs(x @ w).max()  # and close to fp32
        for b in range(3):  # each text of the batch alone gives the same rows
            np.testing.assert_array_equal(sess.run(None, {"x": x[b:b + 1]})[0][0], ours[b])


def test_embedder_graph_keeps_layer_norm_unfused(tiny_folders, tmp_path):
    """The sessions of an embedder graph never re-fuse Add + LayerNormalization into
    SkipLayerNormalization (4.7x slower on CPU: edge.build.encoder._add_layer_norm)."""
    import onnx

    import onnxruntime as ort

    path = build_embedder_bundle(tiny_folders["e5_mean_norm"], tmp_path / "b", quant="fp32", progress=False) / "model.onnx"
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "LayerNormalization" in ops and "SkipLayerNormalization" not in ops
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(embedder_mod.ORT_DISABLED_OPTIMIZERS))
    optimized = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "SkipLayerNormalization" not in optimized and "LayerNormalization" in optimized
    # without the option ORT fuses them, so the option is what keeps them apart
    so.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert "SkipLayerNormalization" in {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}


def test_relevance_gate_of_an_embedder_that_cannot_separate_refuses_nothing():
    from edge.build.relevance import calibrate_gate

    same = calibrate_gate(lambda texts: np.ones((len(texts), 4), np.float32) / 2.0)  # every cosine 1.0
    assert same["separates"] is False and same["min_cosine"] == same["min_cosine_with_keywords"] == -1.0
    from edge.build.relevance import MARGIN, OFF_TOPIC

    def topical(texts):  # everyday questions orthogonal to the passages, passages and their sentences along one axis
        return np.array([[1.0, 0.0] if t in OFF_TOPIC else [0.6, 0.8] for t in texts], np.float32)

    # on-topic 1.0 above off-topic 0.99999 is no separation: without the margin, min_cosine 1.05 refused everything
    near = calibrate_gate(lambda texts: np.array([[1.0, 0.0] if t in OFF_TOPIC else [0.99999, 0.0044721] for t in texts], np.float32))
    assert near["separates"] is False and near["min_cosine"] == -1.0
    g = calibrate_gate(topical)  # off-topic top cosine 0.6, on-topic 1.0
    assert g["separates"] is True and g["off_topic_max"] == pytest.approx(0.6, abs=1e-3)
    assert g["min_cosine"] == pytest.approx(0.6 + MARGIN, abs=1e-3) and g["min_cosine_with_keywords"] == pytest.approx(0.6, abs=1e-3)
