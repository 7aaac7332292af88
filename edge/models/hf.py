"""Hugging Face checkpoint folders: config.json + safetensors (one file or a sharded index).

Reads tensors with a small safetensors parser of our own (header JSON + raw bytes) so that
bf16 checkpoints load into numpy (which has no bfloat16) and a damaged file gives a one-line
ModelError naming the file instead of a Rust panic. Weights come back float32 in HF names and
orientation (linear W [N, K]).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from edge.errors import ModelError
from edge.models.spec import ModelSpec, read_hf_spec

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# safetensors dtype -> numpy dtype of the raw bytes
_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to f32 by a 16-bit shift
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def read_safetensors(path: Path, *, float32: bool = True) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file (float32 unless `float32=False`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    bad = f"{path}: corrupt or truncated safetensors file"
    fix = "re-download or re-save the checkpoint"
    if len(data) < 8:
        raise ModelError(bad + " (shorter than its header)", fix=fix)
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8:
        raise ModelError(bad + f" (header of {hlen} bytes, file of {len(data)})", fix=fix)
    try:
        header = json.loads(data[8 : 8 + hlen])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(bad + " (header is not JSON)", fix=fix) from None
    base = 8 + hlen
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(bad + f" (bad entry for {name!r})", fix=fix) from None
        if dtype not in _DTYPES:
            raise ModelError(f"{path}: tensor {name} has unsupported dtype {dtype}", fix="save the checkpoint in float32/float16/bfloat16")
        npdt = _DTYPES[dtype]
        count = int(np.prod(shape)) if shape else 1
        if end - start != count * npdt.itemsize or base + end > len(data):
            raise ModelError(bad + f" (tensor {name} lies outside the file or has a wrong size)", fix=fix)
        raw = np.frombuffer(data, dtype=npdt, count=count, offset=base + start).reshape(shape)
        is_float = dtype in ("F32", "F16", "BF16", "F64")
        out[name] = _to_float32(raw, dtype) if (is_float and float32) or dtype == "BF16" else raw.copy()
    return out


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in index order; ModelError when there are none."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ModelError(f"{index}: corrupt shard index (no weight_map)", fix="re-download the checkpoint") from None
        files = [folder / f for f in dict.fromkeys(wm.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{folder}: shard(s) listed in {INDEX} are missing: {', '.join(missing)}", fix="re-download the checkpoint")
        return files
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise ModelError(f"{folder}: only PyTorch .bin weights found", fix="re-save with save_pretrained(..., safe_serialization=True) to get safetensors")
    raise ModelError(f"{folder}: no model.safetensors or {INDEX}", fix="point --model at a complete Hugging Face checkpoint folder")


def _normalize_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accept bare-model checkpoints (`layers.0...` without the `model.` prefix)."""
    out = {}
    for k, v in tensors.items():
        if not k.startswith("model.") and k != "lm_head.weight":
            k = "model." + k
        out[k] = v
    return out


def expected_weight_names(spec: ModelSpec) -> list[str]:
    """Every tensor a Llama-family decoder needs, HF names."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + m + ".weight" for m in spec.linear_shapes]
        if spec.attention_bias:
            names += [p + f"self_attn.{m}_proj.bias" for m in "qkv"]
    if not spec.tie_embeddings:
        names.append("lm_head.weight")
    return names


def check_weights(spec: ModelSpec, weights: dict[str, np.ndarray], where: str) -> None:
    """Every expected tensor is present with the shape the spec implies."""
    missing = [n for n in expected_weight_names(spec) if n not in weights]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(f"{where}: missing tensors {', '.join(missing[:3])}{more}", fix="the checkpoint is incomplete; re-download it")
    h = spec.hidden_size
    want = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_embeddings:
        want["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.n_layers):
        for m, shape in spec.linear_shapes.items():
            want[f"model.layers.{i}.{m}.weight"] = shape
    for name, shape in want.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise ModelError(f"{where}: tensor {name} has shape {tuple(weights[name].shape)}, config implies {tuple(shape)}", fix="config.json and the weights disagree")


def load_hf(folder: str | Path) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """(spec, float32 weights in HF names) from a Hugging Face checkpoint folder."""
    folder = Path(folder)
    spec = read_hf_spec(folder)
    weights: dict[str, np.ndarray] = {}
    for f in safetensors_files(folder):
        weights.update(read_safetensors(f))
    weights = _normalize_names(weights)
    # Tied checkpoints may still carry lm_head.weight; it equals the embedding, drop it.
    if spec.tie_embeddings:
        weights.pop("lm_head.weight", None)
    elif "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        raise ModelError(f"{folder}: config says untied embeddings but there is no lm_head.weight", fix="re-download the checkpoint")
    # Drop buffers some exports keep (rotary inv_freq).
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    check_weights(spec, weights, str(folder))
    return spec, weights
