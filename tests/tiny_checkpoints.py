"""Tiny seeded random checkpoints of real architectures, saved with transformers in tmp dirs.

2 layers, hidden 64, vocab 260 (256 byte-level tokens + 4 specials), with a byte-level BPE
tokenizer.json (no merges) and a ChatML template, so that calibration text tokenizes.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 260
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_byte_tokenizer(folder: Path) -> None:
    """tokenizer.json (byte-level BPE, 256 byte tokens, specials 256..259) + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}, "chat_template": CHAT_TEMPLATE})
    )


def make_config(arch: str, *, tied: bool = False, **over):
    import transformers

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=256,
        eos_token_id=259,
    )
    common.update(over)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[arch]
    return cls(**common)


def make_checkpoint(folder: Path, arch: str = "llama", *, tied: bool = False, seed: int = 0, tokenizer: bool = True, **over) -> Path:
    """Save a tiny random model of `arch` into folder; returns folder."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = make_config(arch, tied=tied, **over)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    # Random init is tiny-valued; widen norms/biases so that every tensor matters in comparisons.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer:
        write_byte_tokenizer(folder)
    return folder


def load_torch(folder: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()


def llama_cpp_permute(w, n_heads: int):
    """llama.cpp convert_hf_to_gguf's q/k row permutation (HF halves -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF tensor types per tensor in write_gguf (K-quants need in_features % 256 == 0)
GGUF_TYPES = {
    "token_embd": "Q8_0",
    "attn_q": "F16",
    "attn_k": "Q4_0",
    "attn_v": "Q4_1",
    "attn_output": "F32",
    "ffn_gate": "Q4_K",
    "ffn_up": "Q6_K",
    "ffn_down": "Q8_0",
    "output": "Q8_0",
}
# the second layer (n_layers=2): the other types K-quant files use
GGUF_TYPES_LAYER1 = {
    "attn_q": "Q5_0",
    "attn_k": "Q5_1",
    "attn_v": "IQ4_NL",
    "attn_output": "IQ4_XS",
    "ffn_gate": "Q5_K",
    "ffn_up": "Q4_K",
    "ffn_down": "Q6_K",
}
_RANDOM_BLOCK_TYPES = ("Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")  # gguf's numpy cannot quantize to these


def _kquant_blocks(rows: int, cols: int, qtype, rng):
    """Valid random K-quant blocks (gguf's numpy cannot quantize to K types): random payload,
    finite fp16 super-block scales."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[qtype]
    nb = cols // block
    raw = rng.integers(0, 256, size=(rows, nb, nbytes), dtype=np.uint8)
    d = (rng.uniform(0.001, 0.01, size=(rows, nb, 1))).astype(np.float16).view(np.uint8)  # [.., 2]
    if qtype.name in ("Q4_K", "Q5_K"):  # d, dmin first
        raw[..., 0:2] = d
        raw[..., 2:4] = d
    elif qtype.name in ("IQ4_NL", "IQ4_XS"):  # d first
        raw[..., 0:2] = d
    else:  # Q6_K: d last
        raw[..., nbytes - 2 :] = d
    return raw.reshape(rows, nb * nbytes)


def write_gguf(path: Path, *, seed: int = 0, hidden: int = 256, inter: int = 512, n_layers: int = 1, heads: int = 4, kv_heads: int = 2, tied: bool = False,
               extra_tensors: dict | None = None) -> Path:
    """A tiny llama GGUF written with gguf.GGUFWriter the way llama.cpp's converter lays it out
    (q/k rows permuted), tensor types from GGUF_TYPES, and a byte-level gpt2 tokenizer."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    hd = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + SPECIALS
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * len(SPECIALS))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(259)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def add(name: str, arr):
        table = GGUF_TYPES_LAYER1 if name.startswith("blk.1.") else GGUF_TYPES
        kind = next((v for k, v in table.items() if f".{k}." in f".{name}"), "F32")
        qt = getattr(T, kind)
        if arr.ndim == 1 or qt == T.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qt == T.F16:
            w.add_tensor(name, arr.astype(np.float16))
        elif qt.name in _RANDOM_BLOCK_TYPES:
            w.add_tensor(name, _kquant_blocks(arr.shape[0], arr.shape[1], qt, rng), raw_dtype=qt)
        else:
            w.add_tensor(name, quantize(arr.astype(np.float32), qt), raw_dtype=qt)

    def randn(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    add("token_embd.weight", randn(VOCAB, hidden))
    for i in range(n_layers):
        add(f"blk.{i}.attn_norm.weight", 1 + randn(hidden, scale=0.1))
        add(f"blk.{i}.ffn_norm.weight", 1 + randn(hidden, scale=0.1))
        add(f"blk.{i}.attn_q.weight", llama_cpp_permute(randn(hidden, hidden), heads))
        add(f"blk.{i}.attn_k.weight", llama_cpp_permute(randn(kv_heads * hd, hidden), kv_heads))
        add(f"blk.{i}.attn_v.weight", randn(kv_heads * hd, hidden))
        add(f"blk.{i}.attn_output.weight", randn(hidden, hidden))
        add(f"blk.{i}.ffn_gate.weight", randn(inter, hidden))
        add(f"blk.{i}.ffn_up.weight", randn(inter, hidden))
        add(f"blk.{i}.ffn_down.weight", randn(hidden, inter))
    add("output_norm.weight", 1 + randn(hidden, scale=0.1))
    if not tied:
        add("output.weight", randn(VOCAB, hidden))
    for name, arr in (extra_tensors or {}).items():  # tensors the architecture does not have (refusal tests)
        add(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# HF tensor (after `model.layers.N.`) -> llama.cpp GGUF tensor (after `blk.N.`), Gemma 3 and Phi-3
_HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_NORMS = {  # post_attention_layernorm is the pre-MLP norm without sandwich norms
    "gemma3": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
    "phi3": {"post_attention_layernorm": "ffn_norm"},
}


def write_gguf_from_hf(model, path: Path) -> Path:
    """A Gemma 3 or Phi-3 transformers model written as llama.cpp's convert_hf_to_gguf lays it
    out: F32 tensors under llama.cpp names, Gemma norms stored as 1 + w, Phi-3's fused qkv and
    gate|up kept fused, LongRoPE factors as rope_factors_short / _long tensors with the attention
    factor and original context in the metadata. Metadata llama.cpp does not store (Gemma 3's
    layer pattern, local RoPE base, attention scale) must be its fixed values in `model`."""
    import math

    import gguf
    import numpy as np

    cfg = model.config
    arch = {"gemma3_text": "gemma3", "phi3": "phi3"}[cfg.model_type]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    rope = cfg.rope_parameters
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        glob = rope["full_attention"]
        w.add_rope_freq_base(glob["rope_theta"])
        if glob.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(glob["factor"])
        w.add_sliding_window(cfg.sliding_window)
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_rope_dimension_count(head_dim)
        w.add_sliding_window(cfg.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            orig = rope["original_max_position_embeddings"]
            w.add_rope_scaling_orig_ctx_len(orig)
            scale = cfg.max_position_embeddings / orig
            w.add_rope_scaling_attn_factors(1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(orig)))
            w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
            w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
    norms = _HF_TO_GGUF_NORMS[arch]
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + np.float32(1.0)  # llama.cpp's Gemma converter stores 1 + w
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            out = "output.weight"
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            mod = rest[: -len(".weight")]
            out = f"blk.{i}.{norms.get(mod) or _HF_TO_GGUF[mod]}.weight"
        w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
