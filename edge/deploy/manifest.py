"""pack.json: what a deploy pack holds and the sha256 of every file in it.

Standard library only, and runnable as `python -m edge.deploy.manifest verify DIR`: install.sh
runs it from the edge-rag wheel itself (a wheel is a zip, importable through PYTHONPATH) before
anything is installed, so a corrupted file stops the install with its name. The service runs the
same check (`verify_pack`) on every start.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from edge.bundle import sha256_file  # noqa: F401  (one file hasher; re-exported for the pack's users)
from edge.errors import EdgeRagError

PACK_MANIFEST = "pack.json"
PACK_SCHEMA = 1
# Made on the device after the files were checked, never listed: the venv install.sh creates.
NOT_LISTED = ("venv/",)


class PackError(EdgeRagError):
    """A deploy pack is incomplete, corrupted or was modified after packing."""


def _listed(root: Path) -> Iterable[Path]:
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != PACK_MANIFEST and not any(rel.startswith(n) for n in NOT_LISTED):
            yield p


def write_manifest(root: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file under `root` and write pack.json (meta + files) last."""
    root = Path(root)
    files = {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in _listed(root)}
    manifest = {"schema": PACK_SCHEMA, **meta, "files": files}
    tmp = root / (PACK_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, root / PACK_MANIFEST)
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / PACK_MANIFEST
    try:
        m = json.loads(path.read_text())
    except OSError:
        raise PackError(f"{root}: not an edge-rag pack (no {PACK_MANIFEST})", fix="unpack the archive `edge-rag pack` wrote") from None
    except ValueError as e:
        raise PackError(f"{path}: corrupt manifest ({e})", fix="copy the pack again") from None
    if m.get("schema") != PACK_SCHEMA:
        raise PackError(f"{path}: pack schema {m.get('schema')!r}, this edge-rag reads {PACK_SCHEMA}",
                        fix="make the pack with this version of edge-rag")
    return m


def verify_pack(root: str | Path, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check every listed file's presence, size and sha256 (except those under `skip` prefixes) and
    that no unlisted file sits among them. Raises PackError naming the first bad file."""
    root = Path(root)
    m = read_manifest(root)
    files: dict[str, dict] = m.get("files", {})
    for rel, meta in files.items():
        if any(rel.startswith(s) for s in skip):
            continue
        p = root / rel
        if not p.is_file():
            raise PackError(f"{root}: missing file {rel}", fix="copy the pack again or re-run install.sh from it")
        if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            raise PackError(f"{root}: checksum mismatch for {rel} (corrupted or modified)",
                            fix="copy the pack again or re-run install.sh from it")
    for p in _listed(root):
        rel = p.relative_to(root).as_posix()
        if rel not in files and not any(rel.startswith(s) for s in skip) and not rel.endswith(".pyc"):
            raise PackError(f"{root}: unexpected file {rel} (not in {PACK_MANIFEST})", fix="remove it or repack")
    return m


def main(argv: list[str] | None = None) -> int:
    """`python -m edge.deploy.manifest verify DIR [--skip PREFIX]...`: exit 0 when the pack is intact."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "verify":
        print("usage: python -m edge.deploy.manifest verify DIR [--skip PREFIX]...", file=sys.stderr)
        return 2
    root, rest, skip = args[1], args[2:], []
    while rest:
        if rest[0] != "--skip" or len(rest) < 2:
            print(f"unknown argument {rest[0]!r}", file=sys.stderr)
            return 2
        skip.append(rest[1])
        rest = rest[2:]
    try:
        m = verify_pack(root, skip=tuple(skip))
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{root}: {len(m.get('files', {}))} files verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
