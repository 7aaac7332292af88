"""One entry point for every checkpoint kind: `load_checkpoint(path) -> (spec, weights)`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import ModelError
from edge.models.spec import ModelSpec


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
