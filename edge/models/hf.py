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


def split_fused(spec: ModelSpec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fused checkpoint linears (Phi-3: self_attn.qkv_proj, mlp.gate_up_proj) -> HF q/k/v and
    gate/up, per the spec's features; rows in q|k|v and gate|up order."""
    f = spec.features
    if not (f.fused_qkv or f.fused_gate_up):
        return weights
    out = dict(weights)
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        if f.fused_qkv and p + "self_attn.qkv_proj.weight" in out:
            w = out.pop(p + "self_attn.qkv_proj.weight")
            sizes = np.cumsum([spec.q_size, spec.kv_size])
            if w.shape[0] != spec.q_size + 2 * spec.kv_size:
                raise ModelError(f"tensor {p}self_attn.qkv_proj.weight has {w.shape[0]} rows, config implies {spec.q_size + 2 * spec.kv_size}",
                                 fix="config.json and the weights disagree")
            for n, part in zip("qkv", np.split(w, sizes)):
                out[p + f"self_attn.{n}_proj.weight"] = part
        if f.fused_gate_up and p + "mlp.gate_up_proj.weight" in out:
            w = out.pop(p + "mlp.gate_up_proj.weight")
            if w.shape[0] != 2 * spec.intermediate_size:
                raise ModelError(f"tensor {p}mlp.gate_up_proj.weight has {w.shape[0]} rows, config implies {2 * spec.intermediate_size}",
                                 fix="config.json and the weights disagree")
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = np.split(w, 2)
    return out


def fold_norm_offset(spec: ModelSpec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Gemma's RMSNorm applies (1 + w): store 1 + w so that every lowering applies plain RMSNorm."""
    off = spec.features.norm_weight_offset
    if off:
        from edge.models.arch import norm_weight_names

        for name in norm_weight_names(spec):
            if name in weights:
                weights[name] = np.asarray(weights[name], dtype=np.float32) + np.float32(off)
    return weights


def check_weights(spec: ModelSpec, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Exactly the tensors the architecture needs (edge.models.arch.expected_tensors), each with
    the shape the spec implies: a missing, unknown or mis-shaped tensor is a one-line ModelError.
    shapes: tensor name -> shape (read without loading the data)."""
    weights = shapes
    from edge.models.arch import expected_tensors

    want = expected_tensors(spec)
    missing = [n for n in want if n not in weights]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(f"{where}: missing tensors {', '.join(missing[:3])}{more}", fix="the checkpoint is incomplete; re-download it")
    unknown = sorted(n for n in weights if n not in want)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ModelError(f"{where}: tensors {', '.join(unknown[:3])}{more} are unknown to the {spec.arch} architecture",
                         fix="a variant of the architecture that edge-rag does not implement; it would run wrongly, so it is refused")
    for name, shape in want.items():
        if tuple(weights[name]) != tuple(shape):
            raise ModelError(f"{where}: tensor {name} has shape {tuple(weights[name])}, config implies {tuple(shape)}", fix="config.json and the weights disagree")


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
    weights = split_fused(spec, weights)
    check_weights(spec, {k: v.shape for k, v in weights.items()}, str(folder))
    return spec, fold_norm_offset(spec, weights)
