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


def _gemma3_llama_cpp_conventions():
    """A tiny Gemma 3 whose config is what llama.cpp assumes for a GGUF (every 6th layer global,
    local RoPE base 10000, attention scale 1/sqrt(head_dim)): 6 layers, so the 24-token test
    crosses the window 8 on five sliding layers and attends fully on the sixth."""
    import transformers as tf

    from helpers_tiny import EOS_ID, VOCAB

    cfg = tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                              initializer_range=0.1, bos_token_id=0, eos_token_id=EOS_ID, pad_token_id=0, sliding_window=SLIDING_WINDOW,
                              layer_types=["sliding_attention"] * 5 + ["full_attention"], final_logit_softcapping=15.0, tie_word_embeddings=True,
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                               "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})
    cfg._attn_implementation = "eager"
    torch.manual_seed(7)
    model = tf.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.2 * torch.randn_like(p))  # Gemma norms are (1 + w): w around 0
    return model


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3"])
def test_gguf_reads_as_its_hf_folder_and_matches_transformers(arch, tmp_path):
    """A Gemma 3 / Phi-3 GGUF laid out as llama.cpp's converter writes it (Gemma's 1 + w norms and
    pre/post sandwich names; Phi-3's fused qkv and gate|up, LongRoPE factor tensors) reads as the
    same spec and the same weights as the model's HF folder, and the reference over the GGUF's
    weights matches transformers."""
    from tiny_checkpoints import write_gguf_from_hf

    from edge.models.gguf import load_gguf
    from edge.models.hf import load_hf
    from edge.models.rope import rope_tables

    model = _gemma3_llama_cpp_conventions() if arch == "gemma3_text" else tiny_hf_model(arch)
    model.save_pretrained(tmp_path / "hf")
    spec_h, w_h = load_hf(tmp_path / "hf")
    spec_g, w_g = load_gguf(write_gguf_from_hf(model, tmp_path / f"{arch}.gguf"))
    assert spec_g.features == spec_h.features and spec_g.sliding_window == spec_h.sliding_window
    for f in ("n_layers", "hidden_size", "intermediate_size", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "tie_embeddings"):
        assert getattr(spec_g, f) == getattr(spec_h, f), f
    for local in (False, True):
        for a, b in zip(rope_tables(spec_g, 128, local), rope_tables(spec_h, 128, local)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert sorted(w_g) == sorted(w_h)
    for name in w_h:
        np.testing.assert_array_equal(w_g[name], w_h[name], err_msg=name)
    ids = np.random.default_rng(3).integers(0, spec_g.vocab_size, 24)
    assert_close(forward(spec_g, w_g, ids), reference_logits(model, ids, 1), 1e-4, f"{arch} gguf")
