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
