"""Command: `edge-rag build` — a checkpoint in, an engine bundle out.

Generators (HF Llama-family folders, .gguf files, `default`) go to
edge.build.generator.build_generator_bundle; sentence-transformers / BERT folders go to
edge.build.encoder.build_embedder_bundle. Heavy imports happen inside the command.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from edge.cli.app import app

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "nomic_bert", "modernbert")


def is_encoder_folder(path: Path) -> bool:
    """A sentence-transformers folder (modules.json) or an encoder-only HF config."""
    if not path.is_dir():
        return False
    if (path / "modules.json").is_file():
        return True
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text()).get("model_type") in ENCODER_TYPES
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False
    return False


@app.command("build")
def build(
    model: str = typer.Option("default", "--model", "-m", help="HF checkpoint folder, .gguf file, sentence-transformers folder, or 'default' (SmolLM2-135M-Instruct)."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Device profile to plan for (default: this machine's, see `edge-rag doctor`)."),
    quant: str = typer.Option("auto", "--quant", "-q", help="auto (the planner's pick) | int4 | int8 | fp16 | fp32 (unquantized reference). Embedders: fp32 | int8."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="INT4 block size: 32, 64 or 128 (default: the planner's, else the largest that tiles the hidden size)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text file (default: the calibration split of pydoc_data.topics)."),
    rtn: bool = typer.Option(False, "--rtn", help="INT4 by plain round-to-nearest instead of AWQ+GPTQ."),
    no_gptq: bool = typer.Option(False, "--no-gptq", help="INT4 by AWQ with round-to-nearest (no GPTQ rounding): faster build, lower quality."),
    context: Optional[int] = typer.Option(None, "--context", help="Context length the engine is planned and built for (default: what the plan allows)."),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help="KV cache element type the pool is planned in: fp16 (default) | int8 (one fp16 scale per token and KV head; allocated by --backend native, other backends hold the same bytes in fp16)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Bundle directory (default engines/gen, or engines/embed for an embedder)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or error table."),
    json_out: bool = typer.Option(False, "--json", help="Print the bundle's manifest summary as JSON."),
) -> None:
    """Build an engine bundle (quantized weights, ONNX graphs, tokenizer, manifest) from a checkpoint."""
    from edge.errors import UsageError
    from edge.models.defaults import resolve_model

    path = resolve_model(model)
    if is_encoder_folder(path):
        if group_size is not None or calib is not None or rtn or no_gptq or context is not None or kv_dtype is not None:
            raise UsageError("--group-size, --calib, --rtn, --no-gptq, --context and --kv-dtype apply to generator builds only",
                             fix="drop them for an embedding model")
        from edge.build.encoder import build_embedder_bundle

        equant = "fp32" if quant == "auto" else quant
        result = build_embedder_bundle(path, out or Path("engines/embed"), quant=equant, progress=not quiet)
    else:
        from edge.build.generator import build_generator_bundle

        result = build_generator_bundle(
            path if str(model) != "default" else "default",
            out or Path("engines/gen"),
            profile=profile,
            quant=quant,
            group_size=group_size,
            calib=calib,
            awq=not rtn,
            gptq=not no_gptq,
            context=context,
            progress=not quiet,
            kv_dtype=kv_dtype,
        )
    from edge.bundle import Bundle

    m = Bundle.open(result, verify=False).manifest
    summary = {
        "bundle": str(result),
        "kind": m.kind,
        "quant": {"recipe": m.quant.recipe, "group_size": m.quant.group_size, "awq": m.quant.awq, "gptq": m.quant.gptq,
                  "method": m.quant.method},
        "profile": m.profile,
        "limits": asdict(m.limits) if m.limits is not None else None,
        "artifacts": sorted(m.artifacts),
    }
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    elif quiet:
        typer.echo(str(result))
