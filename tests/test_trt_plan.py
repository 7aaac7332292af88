"""The pure parts of the TensorRT path: profile shapes and builder settings from the manifest."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from edge.build.trt_plan import derive_build_config, derive_profile, graph_inputs
from edge.errors import BundleError


def _graph(tmp_path, dims_by_input):
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "input_ids" else TensorProto.FLOAT16, d) for n, d in dims_by_input.items()]
    out = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch_size", "sequence_length"])
    node = helper.make_node("Identity", ["input_ids"], ["y"])
    model = helper.make_model(helper.make_graph([node], "g", inputs, [out]))
    path = tmp_path / "model.trt.onnx"
    onnx.save(model, str(path))
    return path


def test_profiles_split_prefill_and_decode(tmp_path):
    path = _graph(tmp_path, {
        "input_ids": ["batch_size", "sequence_length"],
        "past_key_values.0.key": ["batch_size", 2, "past_sequence_length", 16],
        "attention_mask": ["batch_size", "total_sequence_length"],
    })
    inputs = graph_inputs(path)
    assert inputs["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    prefill, decode = derive_profile(inputs, max_batch=4, max_context=2048)
    assert prefill["input_ids"].max == (4, 2048)
    assert prefill["past_key_values.0.key"].min == (1, 2, 0, 16)
    assert prefill["past_key_values.0.key"].max == (4, 2, 2047, 16)
    assert decode["input_ids"].min == (1, 1) and decode["input_ids"].max == (4, 1)
    assert decode["past_key_values.0.key"].max == (4, 2, 2047, 16)
    # total = past + seq never exceeds the context
    assert decode["attention_mask"].max == (4, 2048)
    assert prefill["attention_mask"].max == (4, 2048)
    for prof in (prefill, decode):
        for s in prof.values():
            assert all(a <= b <= c for a, b, c in zip(s.min, s.opt, s.max))


def test_unknown_symbolic_dim_is_refused(tmp_path):
    path = _graph(tmp_path, {"input_ids": ["batch_size", "mystery"]})
    with pytest.raises(BundleError, match="mystery"):
        derive_profile(graph_inputs(path), max_batch=1, max_context=128)


def test_build_config_from_manifest(tmp_path):
    path = _graph(tmp_path, {"input_ids": ["batch_size", "sequence_length"]})
    from dataclasses import replace

    from edge.bundle import Limits, Manifest, Quant

    manifest = Manifest(kind="generator", model={"max_position": 8192}, quant=Quant("int4", 64),
                        limits=Limits(max_context=1024, max_batch=2))
    cfg = derive_build_config(manifest, graph_inputs(path), workspace_bytes=256 << 20)
    assert cfg.fp16 and not cfg.strongly_typed and cfg.workspace_bytes == 256 << 20
    assert derive_build_config(manifest, graph_inputs(path)).workspace_bytes == 512 << 20
    assert cfg.profiles[0]["input_ids"].max == (2, 1024)
    fp32 = derive_build_config(replace(manifest, quant=Quant("fp32")), graph_inputs(path))
    assert not fp32.fp16
    assert cfg.to_dict()["profiles"][1]["input_ids"]["max"] == (2, 1)


def test_tensorrt_backend_without_tensorrt_is_a_one_line_error(tmp_path, capsys):
    """Where TensorRT is absent, --backend tensorrt says how to get it instead of a traceback."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the error path does not apply")
    from edge.cli import main
    from helpers_tiny import make_tiny_bundle, tiny_hf_model

    bundle = make_tiny_bundle(tmp_path / "gen", tiny_hf_model("llama", seed=3), "int4", forms=("ort", "trt"), max_context=64)
    rc = main(["generate", "hi", "--engine", str(bundle), "--backend", "tensorrt", "--max-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and "tensorrt backend needs TensorRT" in err[0]


def test_trt_form_is_derived_from_the_stored_weights(tmp_path):
    """Bundles store each weight once: no model.trt.onnx inside; the TensorRT form is derived from
    weights.safetensors on the target, byte for byte the graph a build-time copy would have been."""
    import onnx
    from helpers_tiny import make_tiny_bundle, tiny_hf_model

    from edge.build.trt_plan import trt_onnx
    from edge.bundle import Bundle

    model = tiny_hf_model("qwen2")
    stored = Bundle.open(make_tiny_bundle(tmp_path / "both", model, "int4", forms=("ort", "trt")))
    lean = Bundle.open(make_tiny_bundle(tmp_path / "lean", model, "int4", forms=("ort",)))
    assert not lean.has("model.trt.onnx")
    derived = trt_onnx(lean, tmp_path / "work")
    assert derived.parent == tmp_path / "work"
    a, b = onnx.load(str(stored.file("model.trt.onnx"))), onnx.load(str(derived))
    assert a.graph == b.graph
