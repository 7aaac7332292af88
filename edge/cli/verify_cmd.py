"""Command: `edge-rag verify BUNDLE` — check every artifact of an engine bundle against its manifest.

Thin: Bundle.open(verify=False) reads the manifest, then each artifact's presence, size and sha256 is
checked (edge.bundle.Bundle.verify); a truncated or altered file is named in one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from edge.cli.app import app


@app.command("verify")
def verify(
    bundles: list[Path] = typer.Argument(..., help="Engine bundle folder(s) (generator or embedder)"),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per bundle"),
) -> None:
    """Check the size and sha256 of every artifact in the bundle's manifest: a truncated or
    altered file (weights, graphs, tokenizer) is refused with its name."""
    from edge.bundle import Bundle
    from edge.errors import BundleError

    failed: list[BundleError] = []
    for path in bundles:
        try:
            b = Bundle.open(path, verify=False)
            arts = b.manifest.artifacts
            if not arts:
                raise BundleError(f"{b.path}: the manifest lists no artifacts", fix="rebuild the bundle")
            b.verify(remembered=False)  # every byte hashed, whatever was hashed before
        except BundleError as e:
            failed.append(e)
            if as_json:
                sys.stdout.write(json.dumps({"bundle": str(path), "ok": False, "error": str(e)}) + "\n")
            continue
        total = sum(int(a.bytes) for a in arts.values())
        if as_json:
            sys.stdout.write(json.dumps({"bundle": str(path), "ok": True, "kind": b.manifest.kind,
                                         "artifacts": len(arts), "bytes": total}) + "\n")
        else:
            print(f"ok: {path} ({b.manifest.kind}, {len(arts)} artifacts, {total / 1e6:.1f} MB verified)")
    if failed:
        if len(bundles) == 1 and not as_json:
            raise failed[0]
        for f in failed:
            print(f"error: {f}", file=sys.stderr)
        raise typer.Exit(1)
