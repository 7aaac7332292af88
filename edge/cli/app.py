"""The typer app every command module registers on. Kept import-light: no numpy-heavy,
torch or onnxruntime import at module level in any edge.cli module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="edge-rag",
    help="Build INT4/INT8 engines sized for Jetson Orin and answer questions over local documents, offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
