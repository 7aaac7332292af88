"""Qwen3, Gemma 3 (text), Phi-3 (LongRoPE) and Mistral (sliding window) through the one model
definition: the numpy reference and both ONNX forms against transformers, fp32 logits and 32
greedy tokens. The tiny configs exercise each feature (edge.models.arch): q/k norms, Gemma norms
(1 + w) after attention and MLP, GeLU-tanh, embedding scale, logit soft-capping, a sliding layer
(window 8) and a global one inside the 24-token test, local RoPE base, fused qkv / gate_up,
LongRoPE short factors with their attention factor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from helpers_tiny import SLIDING_WINDOW, bundle_weights, greedy_decode, hf_spec, tiny_hf_model
from test_onnx_decoder import CTX, assert_close, reference_logits, run_ort_form, run_trt_form

from edge.build.onnx_decoder import build_decoder_onnx
from edge.bundle import Quant
from edge.models.arch import block_features
from edge.models.reference import forward
from edge.quant.format import read_linear

ARCHS = ["qwen3", "gemma3_text", "phi3", "mistral"]
N_GREEDY = 32


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_hf_model(request.param)


def test_features_come_from_the_config(model):
    spec = hf_spec(model)
    f = spec.features
    want = {
        "qwen3": ["qk_norm"],
        "gemma3_text": ["sandwich_norms", "qk_norm", "activation", "embed_scale", "attn_scale", "final_softcap", "layer_types", "rope_local_theta"],
        "phi3": [],
        "mistral": ["layer_types"],
    }[spec.arch]
    assert block_features(spec) == want
    if spec.arch == "phi3":
        assert f.fused_qkv and f.fused_gate_up and spec.rope_scaling["rope_type"] == "longrope"
    if spec.arch in ("gemma3_text", "mistral"):
        assert spec.sliding_window == SLIDING_WINDOW and "sliding" in f.layer_types
    if spec.arch == "gemma3_text":
        assert f.layer_types == ("sliding", "full") and f.norm_weight_offset == 1.0


def test_numpy_reference_matches_transformers(model):
    spec = hf_spec(model)
    ids = np.random.default_rng(3).integers(0, spec.vocab_size, 24)
    assert_close(forward(spec, bundle_weights(model, "fp32"), ids), reference_logits(model, ids, 1), 1e-4, f"{spec.arch} numpy")




@pytest.mark.parametrize("form", ["ort", "trt"])
def test_fp32_logits_and_greedy_tokens_match_transformers(model, form, tmp_path):
    spec = hf_spec(model)
    path = build_decoder_onnx(spec, bundle_weights(model, "fp32"), Quant("fp32"), tmp_path, form)
    onnx.checker.check_model(str(path), full_check=form == "trt")
    ids = np.random.default_rng(1).integers(0, spec.vocab_size, 24)  # > the sliding window: local and global layers differ
    got = (run_ort_form if form == "ort" else run_trt_form)(path, spec, ids, 16)  # prefill 16, decode 8 with the KV cache
    assert_close(got, reference_logits(model, ids, 16), 1e-3, f"{spec.arch} {form}")

    prompt = np.random.default_rng(2).integers(0, spec.vocab_size, 6)
    with torch.no_grad():
        want = model.generate(torch.from_numpy(prompt[None]), max_new_tokens=N_GREEDY, do_sample=False, min_new_tokens=N_GREEDY,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert len(prompt) + N_GREEDY <= CTX
    got_tokens = greedy_decode(path, spec, form, prompt, N_GREEDY, CTX)
    assert got_tokens == want, f"{spec.arch} {form}: first difference at {next(i for i, (a, b) in enumerate(zip(got_tokens, want)) if a != b)}"


@pytest.mark.parametrize("recipe", ["int4", "int8"])
def test_quantized_graphs_agree_with_the_dequantized_reference(model, recipe, tmp_path):
    """The quantized linears of the new architectures go through the same reader and lowering:
    ORT form at accuracy level 1 (fp32 activations) equals the numpy reference on the bundle weights."""
    spec = hf_spec(model)
    w = bundle_weights(model, recipe, group_size=32)
    path = build_decoder_onnx(spec, w, Quant(recipe, 32 if recipe == "int4" else 0), tmp_path, "ort", accuracy_level=1)
    ids = np.random.default_rng(4).integers(0, spec.vocab_size, 20)
    got = run_ort_form(path, spec, ids, 12)
    ref = dict(w)
    if spec.tie_embeddings:  # the ORT form gathers the tied embeddings from the quantized head (GatherBlockQuantized)
        ref["model.embed_tokens.weight"] = read_linear(w, "lm_head").dequantize()
    assert_close(got, forward(spec, ref, ids)[11:], 1e-3, f"{spec.arch} {recipe}")


@pytest.mark.parametrize("arch", ["gemma3_text", pytest.param("qwen3", marks=pytest.mark.slow), pytest.param("phi3", marks=pytest.mark.slow)])
def test_checkpoint_folder_builds_and_generates(arch, tmp_path):
    """The whole build (reader, AWQ+GPTQ int4, both ONNX forms, manifest) and the runtime on a new
    architecture's HF folder, then greedy generation through the runtime."""
    from helpers_tiny import make_tokenizer_files

    from edge.build.generator import build_generator_bundle
    from edge.bundle import Bundle
    from edge.runtime.generator import Generator
    from edge.runtime.sampler import SamplingParams

    folder = tmp_path / arch
    tiny_hf_model(arch).save_pretrained(folder)
    make_tokenizer_files(folder)
    out = build_generator_bundle(folder, tmp_path / "b", profile="cpu", quant="int4", group_size=32, context=64, progress=False)
    b = Bundle.open(out)
    assert b.spec.features == hf_spec(tiny_hf_model(arch)).features and b.manifest.quant.method == "awq+gptq"
    gen = Generator.from_bundle(out)
    text = gen.generate("hello robot", SamplingParams(temperature=0.0, max_tokens=8))
    assert isinstance(text, str) and gen.stats.n_generated >= 1
