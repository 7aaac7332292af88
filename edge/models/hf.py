"""Hugging Face checkpoint folders: config.json + safetensors (one file or a sharded index).

Reads tensors with a small safetensors parser of our own (header JSON + raw bytes) so that
bf16 checkpoints load into numpy (which has no bfloat16) and a damaged file gives a one-line
ModelError naming the file instead of a Rust panic. Weights come back float32 in HF names and
orientation (linear W [N, K]), read lazily (HFWeights): the headers are checked when the folder
is opened, each tensor or row range is read from its file when asked for.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from edge.errors import ModelError
from edge.models.checkpoint import LazyWeights, fused_rows, row_index
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


def index_safetensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (safetensors dtype, shape, byte offset in the file, nbytes) for one .safetensors
    file, from its header alone; a damaged file (short, bad header, an entry outside the file, an
    unsupported dtype) is a one-line ModelError naming it."""
    path = Path(path)
    bad = f"{path}: corrupt or truncated safetensors file"
    fix = "re-download or re-save the checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(bad + " (shorter than its header)", fix=fix)
            (hlen,) = struct.unpack("<Q", head)
            if hlen > size - 8:
                raise ModelError(bad + f" (header of {hlen} bytes, file of {size})", fix=fix)
            raw_header = f.read(hlen)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw_header)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(bad + " (header is not JSON)", fix=fix) from None
    base = 8 + hlen
    out: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(bad + f" (bad entry for {name!r})", fix=fix) from None
        if dtype not in _DTYPES:
            raise ModelError(f"{path}: tensor {name} has unsupported dtype {dtype}", fix="save the checkpoint in float32/float16/bfloat16")
        count = int(np.prod(shape)) if shape else 1
        if end - start != count * _DTYPES[dtype].itemsize or base + end > size:
            raise ModelError(bad + f" (tensor {name} lies outside the file or has a wrong size)", fix=fix)
        out[name] = (dtype, tuple(int(x) for x in shape), base + start, end - start)
    return out


def read_tensor(path: Path, entry: tuple[str, tuple[int, ...], int, int], rows: slice | np.ndarray | None = None, *,
                float32: bool = True) -> np.ndarray:
    """One tensor of an index_safetensors entry (float32 unless `float32=False`; bf16 always
    widened), or only its rows `rows` (rows of a slice step 1 are read alone; an index array reads
    through a map that is dropped with the call)."""
    dtype, shape, offset, _ = entry
    npdt = _DTYPES[dtype]
    if rows is None:
        raw = np.fromfile(path, dtype=npdt, count=int(np.prod(shape)) if shape else 1, offset=offset).reshape(shape)
    elif isinstance(rows, slice) and rows.step in (None, 1):
        start, stop, _ = rows.indices(shape[0])
        row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        n = max(0, stop - start)
        raw = np.fromfile(path, dtype=npdt, count=n * row, offset=offset + start * row * npdt.itemsize).reshape((n, *shape[1:]))
    else:
        mapped = np.memmap(path, dtype=npdt, mode="r", offset=offset, shape=shape)
        raw = np.array(mapped[rows])
        del mapped
    is_float = dtype in ("F32", "F16", "BF16", "F64")
    return _to_float32(raw, dtype) if (is_float and float32) or dtype == "BF16" else raw


def read_safetensors(path: Path, *, float32: bool = True) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file (float32 unless `float32=False`)."""
    return {name: read_tensor(Path(path), e, float32=float32) for name, e in index_safetensors(path).items()}


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


def fused_parts(spec: ModelSpec, name: str, n_rows: int) -> dict[str, tuple[int, int]]:
    """The split names and row ranges of checkpoint tensor `name` when the architecture fuses it
    (Phi-3: self_attn.qkv_proj, mlp.gate_up_proj; edge.models.checkpoint.fused_rows), {} when it
    is not fused; a fused tensor whose rows the config does not imply is a one-line ModelError."""
    f = spec.features
    fused = (f.fused_qkv and name.endswith("self_attn.qkv_proj.weight")) or (f.fused_gate_up and name.endswith("mlp.gate_up_proj.weight"))
    parts = fused_rows(spec, name) if fused else {}
    if parts and n_rows != max(r[1] for r in parts.values()):
        raise ModelError(f"tensor {name} has {n_rows} rows, config implies {max(r[1] for r in parts.values())}",
                         fix="config.json and the weights disagree")
    return parts


def split_fused(spec: ModelSpec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fused checkpoint linears (Phi-3) -> HF q/k/v and gate/up in memory (load_hf reads the
    same rows lazily); rows in q|k|v and gate|up order."""
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        parts = fused_parts(spec, name, w.shape[0]) if w.ndim else {}
        out.update({n: w[r0:r1] for n, (r0, r1) in parts.items()} if parts else {name: w})
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


class HFWeights(LazyWeights):
    """HF name -> float32 array, read from the folder's safetensors files on every access (no
    cache): a build holds one layer, not the checkpoint. Fused tensors (Phi-3) appear as their
    split names and read only their rows; Gemma's norms come back as 1 + w (fold_norm_offset)."""

    def __init__(self, folder: Path, spec: ModelSpec, tensors: dict[str, tuple[Path, tuple, tuple[int, int] | None]]):
        self.folder, self.spec = folder, spec
        self._t = tensors  # name -> (file, index_safetensors entry, rows of a fused tensor or None)
        self.shapes = {n: (e[1] if rows is None else (rows[1] - rows[0], *e[1][1:])) for n, (_, e, rows) in tensors.items()}
        off = spec.features.norm_weight_offset
        self._offset = np.float32(off) if off else None
        if self._offset is not None:
            from edge.models.arch import norm_weight_names

            self._offset_names = set(norm_weight_names(spec))

    def _read(self, name: str, rows: slice | np.ndarray | None) -> np.ndarray:
        path, entry, part = self._t[name]
        if part is not None:
            rows = row_index(slice(None) if rows is None else rows, self.shapes[name][0], part[0], name)
        elif rows is not None:
            rows = row_index(rows, self.shapes[name][0], 0, name)
        w = read_tensor(path, entry, rows)
        if self._offset is not None and name in self._offset_names:
            w = w + self._offset
        return w

    def __getitem__(self, name: str) -> np.ndarray:
        return self._read(name, None)

    def rows(self, name: str, index: slice | np.ndarray) -> np.ndarray:
        return self._read(name, index)

    def __contains__(self, name) -> bool:
        return name in self._t

    def __iter__(self):
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)


def load_hf(folder: str | Path) -> tuple[ModelSpec, HFWeights]:
    """(spec, lazy float32 weights in HF names) from a Hugging Face checkpoint folder. Headers are
    read and checked up front (damaged files, missing / unknown / mis-shaped tensors refused);
    tensor data is read when asked for."""
    folder = Path(folder)
    spec = read_hf_spec(folder)
    entries: dict[str, tuple[Path, tuple]] = {}
    for f in safetensors_files(folder):
        entries.update({n: (f, e) for n, e in index_safetensors(f).items()})
    entries = _normalize_names(entries)
    # Tied checkpoints may still carry lm_head.weight; it equals the embedding, drop it.
    if spec.tie_embeddings:
        entries.pop("lm_head.weight", None)
    elif "lm_head.weight" not in entries and "model.embed_tokens.weight" in entries:
        raise ModelError(f"{folder}: config says untied embeddings but there is no lm_head.weight", fix="re-download the checkpoint")
    # Drop buffers some exports keep (rotary inv_freq).
    entries = {k: v for k, v in entries.items() if not k.endswith("rotary_emb.inv_freq")}
    tensors: dict[str, tuple[Path, tuple, tuple[int, int] | None]] = {}
    for name, (path, e) in entries.items():
        parts = fused_parts(spec, name, e[1][0]) if e[1] else {}
        tensors.update({n: (path, e, rows) for n, rows in parts.items()} if parts else {name: (path, e, None)})
    weights = HFWeights(folder, spec, tensors)
    check_weights(spec, weights.shapes, str(folder))
    return spec, weights
