"""Random-weight Q4_0 GGUFs of the bench configs, for llama.cpp's own benchmarks (llama-bench,
llama-batched-bench) as the peer of bench_cuda.py. Speed does not depend on the weight values.

    python bench/random_gguf.py llama-3.2-1b /tmp/l1b.gguf [--gguf-py DIR]

Layers are Q4_0 (llama.cpp's plain 4-bit type: groups of 32, one fp16 scale; 4.5 bits a weight,
edge-rag's int4 g128 is 4.125); the LM head (the tied embedding for Llama-3.2-1B, output.weight
for Llama-3-8B) is Q8_0, as edge-rag's LM head is int8; norms F32. Blocks are random bytes with a
small random fp16 scale in each block's first two bytes. The vocabulary is a placeholder SPM one
(<unk>, <s>, </s>, the 256 byte tokens, then numbered pieces): llama-bench feeds random ids.

The `gguf` package comes from llama.cpp's own gguf-py (the sdist's vendor/llama.cpp/gguf-py),
given with --gguf-py or importable.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.random_bundle import CONFIGS  # noqa: E402

QK = 32
BLOCK_BYTES = {"Q4_0": 2 + QK // 2, "Q8_0": 2 + QK}


def _blocks(rng: np.random.Generator, n: int, k: int, kind: str, scale: float) -> np.ndarray:
    """uint8 [n, k / 32 * block bytes] of random blocks whose fp16 scales are ~scale."""
    bb = BLOCK_BYTES[kind]
    nb = n * (k // QK)
    raw = np.frombuffer(rng.bytes(nb * bb), dtype=np.uint8).reshape(nb, bb).copy()
    d = (scale * (0.75 + 0.5 * rng.random(nb, dtype=np.float32))).astype(np.float16)
    raw[:, :2] = d.view(np.uint8).reshape(nb, 2)
    return raw.reshape(n, (k // QK) * bb)


def write_random_gguf(config: str | dict, path: Path, *, seed: int = 0) -> Path:
    """Config name (CONFIGS) or HF config dict -> random Q4_0 GGUF at `path`."""
    import gguf

    cfg = CONFIGS[config] if isinstance(config, str) else config
    name = config if isinstance(config, str) else cfg.get("_name_or_path", "model")
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nh, nkv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // nh
    tied = bool(cfg.get("tie_word_embeddings"))
    rng = np.random.default_rng(seed)
    q4, q8 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(cfg.get("_name_or_path", name) + " (random weights)")
    w.add_context_length(min(int(cfg["max_position_embeddings"]), 8192))
    w.add_embedding_length(h)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    # placeholder SPM vocabulary: control tokens, the 256 byte tokens, numbered pieces
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    toks += [f"\u2581t{i}" for i in range(vocab - len(toks))]
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    ones = np.ones(h, dtype=np.float32)
    w.add_tensor("token_embd.weight", _blocks(rng, vocab, h, "Q8_0" if tied else "Q4_0", 0.02 / 127 * 3 if tied else 0.02 / 8 * 3),
                 raw_dtype=q8 if tied else q4)
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        for nm, n, k in (("attn_q", nh * hd, h), ("attn_k", nkv * hd, h), ("attn_v", nkv * hd, h), ("attn_output", h, nh * hd),
                         ("ffn_gate", inter, h), ("ffn_up", inter, h), ("ffn_down", h, inter)):
            w.add_tensor(p + nm + ".weight", _blocks(rng, n, k, "Q4_0", 0.02 / 8 * 3 / np.sqrt(k / 2048)), raw_dtype=q4)
        w.add_tensor(p + "ffn_norm.weight", ones)
    w.add_tensor("output_norm.weight", ones)
    if not tied:
        w.add_tensor("output.weight", _blocks(rng, vocab, h, "Q8_0", 0.02 / 127 * 3), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", choices=sorted(CONFIGS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--gguf-py", type=Path, help="llama.cpp's gguf-py folder (when `gguf` is not installed)")
    a = ap.parse_args()
    if a.gguf_py:
        sys.path.insert(0, str(a.gguf_py))
    t0 = time.perf_counter()
    write_random_gguf(a.config, a.out)
    print(f'{{"figure": "gguf_written", "model": "{a.config}", "bytes": {a.out.stat().st_size}, "seconds": {time.perf_counter() - t0:.1f}}}')


if __name__ == "__main__":
    main()
