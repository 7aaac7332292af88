"""Checkpoint readers: HF safetensors folders and GGUF files, against transformers as the oracle;
the numpy reference forward against transformers' logits; bad checkpoints give one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge.errors import ModelError
from tiny_checkpoints import load_torch, make_checkpoint, write_gguf

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "llama-llama3-rope": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=5000.0)),
    "qwen2-tied": ("qwen2", dict(tied=True)),
    "mistral": ("mistral", {}),
}


def _assert_equal_state(weights, state_dict, tied):
    expected = {k: v.float().numpy() for k, v in state_dict.items()}
    if tied:
        expected.pop("lm_head.weight")
        assert "lm_head.weight" not in weights
    assert set(weights) == set(expected), set(weights) ^ set(expected)
    for k, v in expected.items():
        assert weights[k].dtype == np.float32
        assert weights[k].shape == v.shape, k
        d = np.abs(weights[k] - v).max()
        assert d == 0, f"{k}: max abs diff {d}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_reader_equals_state_dict_and_reference_matches_logits(tmp_path, case):
    import torch

    from edge.models.checkpoint import load_checkpoint
    from edge.models.reference import forward

    arch, kw = CASES[case]
    folder = make_checkpoint(tmp_path / case, arch, **kw)
    spec, weights = load_checkpoint(folder)
    model = load_torch(folder)
    assert spec.arch == arch and spec.tie_embeddings == kw.get("tied", False)
    assert spec.attention_bias == (arch == "qwen2")
    if "rope_scaling" in kw:
        assert spec.rope_scaling["rope_type"] == "llama3" and spec.rope_theta == 5000.0
    _assert_equal_state(weights, model.state_dict(), spec.tie_embeddings)

    # The reference forward is the oracle other code uses: check it against transformers,
    # long enough (200 > 64 original positions) that llama3 scaling matters.
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, 200)
    with torch.no_grad():
        ref = model(torch.tensor(ids)[None]).logits[0].numpy()
    out = forward(spec, weights, ids)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel < 1e-5, f"max rel err {rel}, first diffs {out.ravel()[:4]} vs {ref.ravel()[:4]}"


def test_sharded_and_bf16_checkpoints(tmp_path):
    import torch
    import transformers

    from edge.models.hf import load_hf

    folder = make_checkpoint(tmp_path / "src", "llama")
    model = load_torch(folder)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    spec, w = load_hf(sharded)
    _assert_equal_state(w, model.state_dict(), False)

    bf = tmp_path / "bf16"
    transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(bf)
    _, wb = load_hf(bf)
    ref = model.to(torch.bfloat16).float().state_dict()
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert np.array_equal(wb[k], ref[k].numpy())


def _one_line_model_error(fn, *needles):
    with pytest.raises(ModelError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_bad_hf_folders(tmp_path):
    from edge.models.checkpoint import load_checkpoint

    folder = make_checkpoint(tmp_path / "m", "llama", tokenizer=False)
    # truncated safetensors
    bad = tmp_path / "trunc"
    shutil.copytree(folder, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _one_line_model_error(lambda: load_checkpoint(bad), "model.safetensors", "corrupt or truncated")
    # garbage header
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _one_line_model_error(lambda: load_checkpoint(bad), "header is not JSON")
    # missing weights file
    (bad / "model.safetensors").unlink()
    _one_line_model_error(lambda: load_checkpoint(bad), "no model.safetensors")
    # missing shard
    sharded = tmp_path / "sharded"
    load_torch(folder).save_pretrained(sharded, max_shard_size="50KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _one_line_model_error(lambda: load_checkpoint(sharded), "missing", shard.name)
    # no config / unsupported architecture / missing path
    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    _one_line_model_error(lambda: load_checkpoint(nocfg), "no config.json")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    _one_line_model_error(lambda: load_checkpoint(folder), "unsupported architecture 'gpt2'", "gemma3_text, llama, mistral, phi3, qwen2, qwen3")
    _one_line_model_error(lambda: load_checkpoint(tmp_path / "nope"), "no such file")


def test_config_and_weights_disagree(tmp_path):
    from edge.models.checkpoint import load_checkpoint

    folder = make_checkpoint(tmp_path / "m", "llama", tokenizer=False)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    _one_line_model_error(lambda: load_checkpoint(folder), "missing tensors", "model.layers.2")


def test_gguf_reader_unpermutes_and_dequantizes_all_types(tmp_path):
    """Tiny GGUF with F32/F16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS tensors and
    llama.cpp's q/k permutation; transformers' GGUF loader is the oracle."""
    from transformers import AutoModelForCausalLM

    from edge.models.checkpoint import load_checkpoint

    path = write_gguf(tmp_path / "tiny.gguf", n_layers=2)
    spec, w = load_checkpoint(path)
    assert (spec.arch, spec.n_layers, spec.hidden_size, spec.n_kv_heads) == ("llama", 2, 256, 2)
    import gguf

    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS"} <= types
    oracle = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).state_dict()
    _assert_equal_state(w, oracle, False)


def test_gguf_unpermute_inverts_llama_cpp_permute():
    from edge.models.gguf import unpermute_rope_rows
    from tiny_checkpoints import llama_cpp_permute

    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    p = llama_cpp_permute(w, 6)
    assert not np.array_equal(p, w)
    assert np.array_equal(unpermute_rope_rows(p, 6), w)
    b = np.arange(48, dtype=np.float32)  # 1-D (biases) too
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(b, 6), 6), b)


def test_truncated_gguf_is_one_line_error(tmp_path):
    from edge.models.checkpoint import load_checkpoint

    path = write_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 3):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        _one_line_model_error(lambda: load_checkpoint(bad), str(bad))


def test_gguf_tokenizer_export(tmp_path):
    from tokenizers import Tokenizer

    from edge.models.gguf import load_gguf
    from edge.models.tokenizer_export import export_tokenizer

    path = write_gguf(tmp_path / "tiny.gguf")
    spec, _ = load_gguf(path)
    out = tmp_path / "tok"
    out.mkdir()
    cfg = export_tokenizer(path, out, spec)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["chat_template"] and "<|im_start|>" in saved["chat_template"]
    assert (saved["bos_token"], saved["bos_token_id"], saved["eos_token"], saved["eos_token_id"]) == ("<s>", 256, "<|im_end|>", 259)
    assert cfg.eos_token_ids == [259]
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "héllo wörld <|im_end|>"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[-1] == 259 and len(ids) == len(" héllo wörld ".encode()) - 1 + 1
    assert tok.decode(ids, skip_special_tokens=True) == "héllo wörld "


def test_hf_tokenizer_export(tmp_path):
    from edge.models.hf import load_hf
    from edge.models.tokenizer_export import export_tokenizer

    folder = make_checkpoint(tmp_path / "m", "llama")
    spec, _ = load_hf(folder)
    out = tmp_path / "tok"
    out.mkdir()
    export_tokenizer(folder, out, spec)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert (saved["bos_token"], saved["bos_token_id"]) == ("<s>", 256)
    assert (saved["eos_token"], saved["eos_token_id"]) == ("<|im_end|>", 259)
    assert saved["chat_template"].startswith("{% for m in messages %}")
    (folder / "tokenizer.json").unlink()
    _one_line_model_error(lambda: export_tokenizer(folder, out, spec), "no tokenizer.json")


@pytest.mark.slow
def test_smollm2_gguf_equals_transformers_gguf_load():
    """The default model: every tensor equals transformers' own GGUF load (incl. q/k un-permute)."""
    from transformers import AutoModelForCausalLM

    from edge.models.checkpoint import load_checkpoint
    from edge.models.defaults import default_generator_path

    path = default_generator_path()
    spec, w = load_checkpoint("default")
    oracle = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).state_dict()
    _assert_equal_state(w, oracle, spec.tie_embeddings)


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_matches_llama_cpp(tmp_path):
    """Our tokenizer.json (built from GGUF metadata) tokenizes like llama.cpp does."""
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    from edge.models.defaults import default_generator_path
    from edge.models.spec import read_spec
    from edge.models.tokenizer_export import export_tokenizer

    path = default_generator_path()
    cfg = export_tokenizer(path, tmp_path, read_spec(path))
    assert cfg.chat_template and cfg.eos_token == "<|im_end|>"
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    llm = Llama(str(path), vocab_only=True, verbose=False)
    for text in ["Hello world, how are you?", "def f(x):\n    return x ** 2  # ünïcode ✓", "<|im_start|>user\nHi<|im_end|>"]:
        ours = tok.encode(text, add_special_tokens=False).ids
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ours == theirs, (text, ours[:10], theirs[:10])


# ---- one test per refusal: a checkpoint that would run wrongly is refused by name --------------


def test_unknown_tensor_is_refused(tmp_path):
    """A qwen3 checkpoint labelled qwen2 carries q/k norms the qwen2 block would silently drop."""
    from helpers_tiny import tiny_hf_model

    from edge.models.checkpoint import load_checkpoint

    folder = tmp_path / "q3"
    tiny_hf_model("qwen3").save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2", "attention_bias": False}))
    _one_line_model_error(lambda: load_checkpoint(folder), "model.layers.0.self_attn.k_norm.weight", "unknown to the qwen2 architecture")


def test_unknown_gguf_tensor_is_refused(tmp_path):
    from edge.models.checkpoint import load_checkpoint

    path = write_gguf(tmp_path / "extra.gguf", extra_tensors={"blk.0.attn_sinks.weight": np.zeros(4, np.float32)})
    _one_line_model_error(lambda: load_checkpoint(path), "blk.0.attn_sinks.weight", "unknown to the llama architecture")


def test_unsupported_architecture_is_refused_with_the_list(tmp_path):
    from edge.models.checkpoint import load_checkpoint

    folder = make_checkpoint(tmp_path / "m", "llama", tokenizer=False)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma2"}))
    _one_line_model_error(lambda: load_checkpoint(folder), "unsupported architecture 'gemma2'", "supported: gemma3_text, llama, mistral, phi3, qwen2, qwen3")


def test_missing_tensor_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from edge.models.checkpoint import load_checkpoint

    folder = make_checkpoint(tmp_path / "m", "qwen2", tokenizer=False)
    st = load_file(str(folder / "model.safetensors"))
    del st["model.layers.1.self_attn.v_proj.bias"]
    save_file(st, str(folder / "model.safetensors"))
    _one_line_model_error(lambda: load_checkpoint(folder), "missing tensors model.layers.1.self_attn.v_proj.bias")


def test_mismatched_shape_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from edge.models.checkpoint import load_checkpoint

    folder = make_checkpoint(tmp_path / "m", "llama", tokenizer=False)
    st = load_file(str(folder / "model.safetensors"))
    st["model.layers.0.mlp.up_proj.weight"] = st["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file(st, str(folder / "model.safetensors"))
    _one_line_model_error(lambda: load_checkpoint(folder), "tensor model.layers.0.mlp.up_proj.weight has shape", "config implies")
