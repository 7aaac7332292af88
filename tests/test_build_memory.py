"""A build holds one layer at a time (issue #14: peak RSS of a 1.5B GGUF build at most ~2x its fp16
size): GGUF rows dequantized on their own, the embedding / LM head in row blocks, each bundle tensor
written as it is made (WeightsSpool) and read back by the graph builder on demand (MappedWeights).
Each of these must leave the bundle's bytes as they were: the tests compare with the whole-model path."""

from __future__ import annotations

import numpy as np
import pytest

from tiny_checkpoints import make_checkpoint, write_gguf


def test_weights_spool_writes_the_file_write_safetensors_writes(tmp_path):
    from edge.bundle import MappedWeights, WeightsSpool, write_safetensors

    rng = np.random.default_rng(0)
    t = {"b.weight": rng.standard_normal((5, 7)).astype(np.float16), "a.qweight": rng.integers(-8, 7, (3, 4)).astype(np.int8),
         "c": np.float32([1.5]), "empty": np.zeros((0, 3), np.float32), "scalar": np.asarray(np.float32(2.0)),
         "u": rng.integers(0, 255, (4, 9)).astype(np.uint8)[:, ::2]}  # a non-contiguous view
    write_safetensors(t, tmp_path / "whole.safetensors")
    spool = WeightsSpool(tmp_path / "spooled.safetensors")
    spool.COPY_CHUNK = 5  # copies that end inside tensors
    for name in ("u", "c", "b.weight", "empty", "scalar", "a.qweight"):  # not the file's (sorted) order
        spool.add(name, t[name])
    with pytest.raises(ValueError, match="written twice"):
        spool.add("c", t["c"])
    index = spool.finish()
    assert (tmp_path / "spooled.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spooled.safetensors", "whole.safetensors"]  # spool removed
    mapped = MappedWeights(tmp_path / "spooled.safetensors")
    assert set(mapped) == set(t) == set(index)
    for name, a in t.items():
        assert mapped[name].dtype == a.dtype and mapped[name].shape == a.shape and np.array_equal(mapped[name], a), name


def test_gguf_rows_are_the_rows_of_the_whole_tensor(tmp_path):
    """Every GGUF type K-quant files use: rows dequantized alone equal those rows of the whole
    tensor, bit for bit (slices, index arrays with repeats and negatives); the q/k rows that
    llama.cpp permutes come out unpermuted too."""
    from edge.models.checkpoint import read_rows
    from edge.models.gguf import load_gguf

    _, w = load_gguf(write_gguf(tmp_path / "tiny.gguf", n_layers=2))
    idx = np.array([5, 0, 5, -1, 3])
    for name in w:
        whole = w[name]
        if whole.ndim != 2:
            continue
        for index in (slice(1, 7), slice(3, None), idx):
            got = read_rows(w, name, index)
            assert got.dtype == np.float32 and np.array_equal(got, whole[index]), (name, index)
    with pytest.raises(IndexError):
        w.rows("model.embed_tokens.weight", np.array([w.shapes["model.embed_tokens.weight"][0]]))


def test_gguf_rows_of_fused_tensors(tmp_path):
    """Phi-3's fused qkv / gate|up: the rows of a split part are rows of that part only."""
    from helpers_tiny import tiny_hf_model
    from tiny_checkpoints import write_gguf_from_hf

    from edge.models.gguf import load_gguf

    _, w = load_gguf(write_gguf_from_hf(tiny_hf_model("phi3"), tmp_path / "phi3.gguf"))
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert np.array_equal(w.rows(name, slice(2, 9)), w[name][2:9])
        assert np.array_equal(w.rows(name, np.array([0, 4, -1])), w[name][[0, 4, -1]])


@pytest.mark.parametrize("arch", ["phi3", "gemma3_text", "llama-bf16"])
def test_hf_folder_reads_lazily_the_tensors_it_read_whole(tmp_path, arch):
    """HF folders are read a tensor (or a few rows) at a time: every tensor and row range equals
    what reading the files whole gives (read_safetensors, split_fused, fold_norm_offset), for
    Phi-3's fused qkv / gate_up, Gemma's (1 + w) norms and bf16 files."""
    import torch
    from helpers_tiny import tiny_hf_model
    from tiny_checkpoints import write_byte_tokenizer

    from edge.models.checkpoint import read_rows
    from edge.models.hf import HFWeights, fold_norm_offset, load_hf, read_safetensors, split_fused

    model = tiny_hf_model(arch.split("-")[0])
    if arch.endswith("bf16"):
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    write_byte_tokenizer(tmp_path / "m")
    spec, w = load_hf(tmp_path / "m")
    assert isinstance(w, HFWeights)
    whole = fold_norm_offset(spec, split_fused(spec, read_safetensors(tmp_path / "m" / "model.safetensors")))
    whole.pop("lm_head.weight", None) if spec.tie_embeddings else None
    assert set(w) == set(whole)
    for name, ref in whole.items():
        got = w[name]
        assert got.dtype == np.float32 and np.array_equal(got, ref), name
        if ref.ndim == 2:
            for index in (slice(1, 5), np.array([3, 0, 3, -1])):
                assert np.array_equal(read_rows(w, name, index), ref[index]), (name, index)
        elif name.endswith("norm.weight"):
            assert np.array_equal(read_rows(w, name, slice(2, 6)), ref[2:6]), name


@pytest.mark.parametrize("arch, tied, recipe, kw", [
    ("llama", True, "int8", {}),
    ("llama", True, "int4", {"awq": True}),
    ("qwen2", False, "int4", {"awq": True, "gptq": True}),
    ("qwen2", False, "fp16", {}),
    ("llama", True, "fp32", {}),
])
def test_streamed_quantization_writes_the_same_bytes(tmp_path, monkeypatch, arch, tied, recipe, kw):
    """quantize_model with a sink (tensors written as made) and the embedding / head in blocks of
    100 rows (260-row vocab: 3 blocks, the last one partial) writes the file the whole-model path
    writes; the layers' error report is unchanged and the head's equals the whole-matrix figure."""
    import edge.quant.quantize as qz
    from edge.bundle import WeightsSpool, write_safetensors
    from edge.models.checkpoint import load_checkpoint
    from edge.quant.calib import make_calibration_set
    from edge.quant.report import linear_error
    from edge.quant.rtn import fake_quant
    from edge.quant.policy import module_precision

    folder = make_checkpoint(tmp_path / "m", arch, tied=tied)
    spec, w = load_checkpoint(folder)
    cal = make_calibration_set(folder / "tokenizer.json", n_seqs=2, seq_len=32)
    whole = qz.quantize_model(spec, w, recipe, 32, calib=cal, **kw)
    write_safetensors(whole.tensors, tmp_path / "whole.safetensors")

    monkeypatch.setattr(qz, "HEAD_BLOCK_ROWS", 100)
    spool = WeightsSpool(tmp_path / "streamed.safetensors")
    streamed = qz.quantize_model(spec, w, recipe, 32, calib=cal, sink=spool.add, **kw)
    spool.finish()
    assert streamed.tensors == {}
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    if recipe == "fp32":
        assert streamed.report.layers == []
        return
    assert [e.to_dict() for e in streamed.report.layers[:-1]] == [e.to_dict() for e in whole.report.layers[:-1]]
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    hprec = module_precision("lm_head", recipe, 32, spec.hidden_size)
    from edge.quant.calib import LayerwiseActivations

    acts = LayerwiseActivations(spec, w, cal.seqs)
    for i in range(spec.n_layers):
        from edge.models.reference import LayerWeights

        acts.run(i, LayerWeights.from_weights(w, i, spec))
    ref = linear_error("lm_head", hprec.kind, head, fake_quant(head, hprec), acts.final_normed(w["model.norm.weight"]))
    got = streamed.report.layers[-1]
    assert got.module == "lm_head" and got.kind == ref.kind
    assert got.weight_err == pytest.approx(ref.weight_err, rel=1e-5)
    assert got.output_err == pytest.approx(ref.output_err, rel=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_quantizing_a_gguf_dequantizes_each_linear_once(tmp_path, tied):
    """The calibration lookups and the head read the embedding / head by rows: the whole float32
    table (0.9 GB for Qwen2.5-1.5B) is never made (it was, once per calibration sequence), and
    `name in weights` answers without dequantizing (Mapping's default did: every linear twice)."""
    from collections import Counter

    from tiny_checkpoints import write_byte_tokenizer

    from edge.models.gguf import GGUFWeights, load_gguf
    from edge.quant.calib import make_calibration_set
    from edge.quant.quantize import quantize_model

    spec, w = load_gguf(write_gguf(tmp_path / "tiny.gguf", tied=tied, n_layers=2))
    write_byte_tokenizer(tmp_path)
    cal = make_calibration_set(tmp_path / "tokenizer.json", n_seqs=3, seq_len=32)
    reads: Counter = Counter()
    orig = GGUFWeights.__getitem__

    def getitem(self, name):
        reads[name] += 1
        return orig(self, name)

    GGUFWeights.__getitem__ = getitem
    try:
        res = quantize_model(spec, w, "int4", 32, calib=cal, awq=True)
    finally:
        GGUFWeights.__getitem__ = orig
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & set(reads), reads
    linears = [n for n in w if n.endswith("_proj.weight")]
    assert len(linears) == 14 and all(reads[n] == 1 for n in linears), reads
    assert "lm_head.qweight" in res.tensors and res.tensors["model.embed_tokens.weight"].shape == w.shapes["model.embed_tokens.weight"]


def test_built_graph_from_mapped_weights_equals_graph_from_arrays(tmp_path):
    """The build hands the graph builder the weights file mapped on demand: the ORT graph is the
    one built from the tensors held in memory."""
    from safetensors.numpy import load_file

    from edge.build.generator import build_generator_bundle
    from edge.build.onnx_decoder import build_decoder_onnx
    from edge.bundle import Bundle, weights_index

    folder = make_checkpoint(tmp_path / "m", "qwen2")
    out = build_generator_bundle(folder, tmp_path / "b", profile="cpu", quant="int8", progress=False)
    b = Bundle.open(out)
    arrays = load_file(str(out / "weights.safetensors"))
    p = build_decoder_onnx(b.spec, arrays, b.manifest.quant, tmp_path / "g", "ort", max_context=b.limits.max_context,
                           stored=weights_index(out / "weights.safetensors"))
    assert p.read_bytes() == (out / "model.ort.onnx").read_bytes()
    assert not list(out.glob("*.spool"))


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.parametrize("drop", [True, False])
def test_reading_a_gguf_hands_its_mapped_pages_back(tmp_path, monkeypatch, drop):
    """Pages of the memory-mapped GGUF leave the build's RSS once their tensor is dequantized (an
    ~40 MB file read whole adds under a quarter of it to the file-backed RSS, the rest being pages
    of code run for the first time; without the release, all of it)."""
    import gguf.quants  # noqa: F401  (its own pages before the first measure)

    import edge.models.gguf as gg

    path = write_gguf(tmp_path / "m.gguf", hidden=1024, inter=4096, n_layers=3, heads=8, kv_heads=2)
    if not drop:
        monkeypatch.setattr(gg, "_drop_mapped_pages", lambda a: None)
    _, w = gg.load_gguf(path)
    before = _rss_file()
    values = {name: float(np.abs(w[name]).sum()) for name in w}
    grown = _rss_file() - before
    size = path.stat().st_size
    if drop:
        assert grown < size / 4, f"file-backed RSS grew {grown / 1e6:.1f} MB reading a {size / 1e6:.1f} MB GGUF"
        assert values == {name: float(np.abs(w[name]).sum()) for name in w}  # read again: the same values
    else:
        assert grown > size / 2  # the measure sees mapped pages (else the first case proves nothing)


def test_build_memory_bench_reports_every_stage(tmp_path, capsys):
    """bench/build_memory.py: a line per stage (each layer and the LM head among them) and a total
    line whose peak is the kernel's high-water mark, against the planner's fp16 weight bytes."""
    import importlib.util
    import json
    from pathlib import Path

    spec_ = importlib.util.spec_from_file_location("build_memory", Path(__file__).parent.parent / "bench" / "build_memory.py")
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    folder = make_checkpoint(tmp_path / "m", "llama")
    assert bench.main(["--model", str(folder), "--out", str(tmp_path / "b"), "--quant", "int8", "--profile", "cpu", "--context", "128"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    stages = [x["stage"] for x in lines[:-1]]
    assert {"layer 1", "LM head", "writing weights", "commit"} <= set(stages), stages
    total = lines[-1]
    assert total["peak_rss_bytes"] >= max(x["peak_rss_bytes"] for x in lines[:-1]) > 0
    assert total["fp16_weight_bytes"] > 0 and total["peak_over_fp16"] == round(total["peak_rss_bytes"] / total["fp16_weight_bytes"], 3)
