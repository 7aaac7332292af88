"""Random-weight generator bundles of real configs (speed does not depend on weight values).

    python bench/random_bundle.py llama-3.2-1b /tmp/l1b --recipe int4 --group 128

ModelSpec from the config dict -> random weights -> edge.quant.format quantizers (vectorized
numpy; large int4 layers are generated directly in packed form) -> BundleWriter. Also builds
the tiny seeded models the cuda tests use.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.bundle import BundleWriter, Limits, Manifest, Quant  # noqa: E402
from edge.models.spec import ModelSpec, spec_from_hf_config  # noqa: E402
from edge.quant.format import quantize_int4_rtn, quantize_int8_rtn  # noqa: E402
from edge.quant.policy import linear_modules, module_precision  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

CONFIGS: dict[str, dict] = {
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "_name_or_path": "SmolLM2-135M",
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "bos_token_id": 151643,
        "eos_token_id": 151643, "_name_or_path": "Qwen2.5-0.5B",
    },
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE,
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001, "_name_or_path": "Llama-3.2-1B",
    },
    "llama-3-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
        "eos_token_id": 128001, "_name_or_path": "Meta-Llama-3-8B",
    },
}


def tiny_config(arch: str = "llama", *, tie: bool = False, rope_scaling: dict | None = None, hidden: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2, vocab: int = 256, inter: int = 128) -> dict:
    """A 2-layer, hidden-64, vocab-256 config of a real architecture (tests)."""
    return {
        "model_type": arch, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": rope_scaling, "tie_word_embeddings": tie,
        "_name_or_path": f"tiny-{arch}",
    }


def _fp(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)


def _packed_int4(rng: np.random.Generator, n: int, k: int, g: int, std: float) -> dict[str, np.ndarray]:
    """Random int4 weight directly in packed form (no float matrix: the 8B model's layers)."""
    q = np.frombuffer(rng.bytes(n * k // 2), dtype=np.uint8).reshape(n, k // 2)
    s = np.full((n, k // g), std / 3.0, dtype=np.float16) * (0.75 + 0.5 * rng.random((n, k // g), dtype=np.float32)).astype(np.float16)
    return {"qweight": q, "scales": s}


def random_weights(spec: ModelSpec, recipe: str, group_size: int = 128, *, seed: int = 0, packed: bool = False, std: float = 0.02) -> dict[str, np.ndarray]:
    """Bundle tensors (edge.quant.format layout, policy precisions) of a random model.

    packed=True draws int4 layers as random nibbles + scales (fast, for big configs); otherwise
    fp32 weights are drawn and quantized with the format's RTN quantizers."""
    rng = np.random.default_rng(seed)
    h = spec.hidden_size
    out: dict[str, np.ndarray] = {}
    emb = _fp(rng, (spec.vocab_size, h), std)
    out["model.embed_tokens.weight"] = emb.astype(np.float16)
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float16)
        out[p + "post_attention_layernorm.weight"] = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float16)
        if spec.attention_bias:
            for n, size in (("q", spec.q_size), ("k", spec.kv_size), ("v", spec.kv_size)):
                out[p + f"self_attn.{n}_proj.bias"] = _fp(rng, (size,), 0.1).astype(np.float16)
    out["model.norm.weight"] = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float16)
    for name, (n, k) in linear_modules(spec).items():
        if name == "lm_head" and spec.tie_embeddings and recipe not in ("int4", "int8"):
            continue  # tied fp16/fp32 head: the embedding table itself
        prec = module_precision(name, recipe, group_size, k)
        if prec.kind == "int4" and packed:
            t = _packed_int4(rng, n, k, prec.group_size, std)
            out[name + ".qweight"], out[name + ".scales"] = t["qweight"], t["scales"]
            continue
        w = emb if (name == "lm_head" and spec.tie_embeddings) else _fp(rng, (n, k), std)
        if prec.kind == "int4":
            qt = quantize_int4_rtn(w, prec.group_size)
        elif prec.kind == "int8":
            qt = quantize_int8_rtn(w)
        else:
            out[name + ".weight"] = w.astype(np.float32 if prec.kind == "fp32" else np.float16)
            continue
        out[name + ".qweight"], out[name + ".scales"] = qt.qweight, qt.scales
    return out


def write_bundle(out: Path, spec: ModelSpec, weights: dict[str, np.ndarray], recipe: str, group_size: int, *, max_context: int = 2048, max_batch: int = 16) -> Path:
    w = BundleWriter(Path(out), "generator")
    w.write_weights(weights)
    quant = Quant(recipe=recipe, group_size=group_size if recipe == "int4" else 0, method="rtn" if recipe in ("int4", "int8") else "none")
    return w.commit(Manifest(kind="generator", model=spec.to_dict(), quant=quant,
                             limits=Limits(max_context=max_context, max_batch=max_batch), random_weights=True))


def make_random_bundle(config: str | dict, out: Path, *, recipe: str = "int4", group_size: int = 128, seed: int = 0, max_context: int = 2048, max_batch: int = 16) -> Path:
    """Config name (CONFIGS) or HF config dict -> random-weight generator bundle at `out`."""
    cfg = CONFIGS[config] if isinstance(config, str) else config
    spec = spec_from_hf_config(cfg)
    packed = spec.n_params > 1e9  # big configs: random packed nibbles (speed ignores values)
    weights = random_weights(spec, recipe, group_size, seed=seed, packed=packed)
    return write_bundle(out, spec, weights, recipe, group_size, max_context=max_context, max_batch=max_batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", choices=sorted(CONFIGS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--recipe", default="int4", choices=("fp16", "int8", "int4"))
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    t0 = time.perf_counter()
    make_random_bundle(args.config, args.out, recipe=args.recipe, group_size=args.group)
    print(f"{args.out} written in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
