"""One entry point for every checkpoint kind: `load_checkpoint(path) -> (spec, weights)`, and
`read_rows`, the reader of a few rows of a large tensor (embedding lookups, the LM head in blocks)
that dequantizes only those rows of a lazily read checkpoint (GGUF)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge.errors import ModelError
from edge.models.spec import ModelSpec


def fused_rows(spec: ModelSpec, name: str) -> dict[str, tuple[int, int]]:
    """A fused HF tensor -> {split HF name: (first row, end row)}, in q|k|v and gate|up order
    (Phi-3's self_attn.qkv_proj / mlp.gate_up_proj); {} for a tensor that is not fused."""
    if name.endswith("self_attn.qkv_proj.weight"):
        p = name[: -len("self_attn.qkv_proj.weight")]
        q, kv = spec.q_size, spec.kv_size
        return {p + "self_attn.q_proj.weight": (0, q), p + "self_attn.k_proj.weight": (q, q + kv),
                p + "self_attn.v_proj.weight": (q + kv, q + 2 * kv)}
    if name.endswith("mlp.gate_up_proj.weight"):
        p, n = name[: -len("mlp.gate_up_proj.weight")], spec.intermediate_size
        return {p + "mlp.gate_proj.weight": (0, n), p + "mlp.up_proj.weight": (n, 2 * n)}
    return {}


def row_index(index: slice | np.ndarray, n: int, first: int = 0, name: str = "") -> slice | np.ndarray:
    """Rows `index` of an n-row tensor stored from row `first` of a larger one, as rows of that one
    (negative indices counted from the tensor's end; IndexError past it)."""
    if isinstance(index, slice):
        start, stop, step = index.indices(n)
        return slice(first + start, first + stop, step)
    idx = np.asarray(index, dtype=np.int64)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"{name}: row index out of range for {n} rows")
    return np.where(idx < 0, idx + n, idx) + first


class LazyWeights(Mapping):
    """HF name -> float32 array, read from the checkpoint file on each access (edge.models.gguf).
    `rows(name, index)` reads only rows `index` of a 2-D tensor; `shapes` every tensor's shape."""

    shapes: dict[str, tuple[int, ...]]

    def rows(self, name: str, index: slice | np.ndarray) -> np.ndarray:
        raise NotImplementedError


def read_rows(weights, name: str, index: slice | np.ndarray) -> np.ndarray:
    """float32 rows `index` (a slice or an int array) of the 2-D tensor `name`: from a lazy
    checkpoint only those rows are dequantized (a 151,936-row embedding is 0.9 GB in float32)."""
    if isinstance(weights, LazyWeights):
        return weights.rows(name, index)
    return np.asarray(weights[name][index], dtype=np.float32)


def tensor_shape(weights, name: str) -> tuple[int, ...]:
    """The shape of tensor `name` without reading a lazy checkpoint's data."""
    if isinstance(weights, LazyWeights):
        return tuple(weights.shapes[name])
    return tuple(weights[name].shape)


def load_checkpoint(model: str | Path) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """(spec, float32 weights in HF names and orientation) from an HF folder, a .gguf file or
    'default' (the bundled SmolLM2). Linear weights are [N, K]; `lm_head.weight` is absent when
    the embeddings are tied."""
    from edge.models.defaults import resolve_model

    path = resolve_model(model)
    if path.is_dir():
        from edge.models.hf import load_hf

        return load_hf(path)
    if path.suffix.lower() == ".gguf":
        from edge.models.gguf import load_gguf

        return load_gguf(path)
    raise ModelError(f"{path}: not a checkpoint folder or a .gguf file", fix="give an HF checkpoint folder, a .gguf file or 'default'")
