"""The machinery the rendered answer corpora share (bench/man_corpus.py, bench/info_corpus.py): render a
fixed document list into a folder atomically, check a folder is an intact rendering, and say when
the installed sources render to other bytes than the reference the held-out keywords were checked on.

A corpus module passes its own `render(folder) -> corpus.json content` and `intact(folder)`; the
corpus.json of every rendering holds {"sha256": {file: hash}, "digest": ...} plus its own list.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

CORPUS_JSON = "corpus.json"


def corpus_digest(sha256: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sha256, sort_keys=True).encode()).hexdigest()[:16]


def files_intact(folder: Path, key: str, listed: list[str], names: list[str]) -> bool:
    """corpus.json's `key` equals `listed`, it maps exactly `names` to hashes, and every file still
    has its hash."""
    try:
        meta = json.loads((folder / CORPUS_JSON).read_text())
        return meta[key] == listed and sorted(meta["sha256"]) == sorted(names) and all(
            hashlib.sha256((folder / n).read_bytes()).hexdigest() == h for n, h in meta["sha256"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_meta(out: Path, texts: dict[str, str], **listed) -> dict:
    """Write every text to `out/<name>` and corpus.json (the sha256 map, its digest and `listed`);
    returns corpus.json's content."""
    sha256 = {}
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
        sha256[name] = hashlib.sha256(text.encode()).hexdigest()
    meta = {**listed, "sha256": sha256, "digest": corpus_digest(sha256)}
    (out / CORPUS_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def render_into_place(out: Path, render: Callable[[Path], dict], intact: Callable[[Path], bool]) -> None:
    """Render into a temporary folder beside `out`, then rename it to `out` (a stale `out` is moved
    aside and removed first; a failed rendering leaves `out` as it was)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        render(tmp)
        if out.exists():  # stale (another document list, an edited file): out of the way first
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, old / out.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:  # a concurrent job renamed its rendering first: same documents, keep that one
            if not intact(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure(out: Path, force: bool, render: Callable[[Path], dict], intact: Callable[[Path], bool],
           reference: str, label: str) -> Path:
    """`out`, rendered once (render_into_place: a killed run or a concurrent job never sees half a
    corpus) and kept while intact. A rendering whose digest is not `reference` (other source
    versions) is said on stderr: its figures are not comparable with the reference's."""
    if force or not intact(out):
        render_into_place(out, render, intact)
    digest = json.loads((out / CORPUS_JSON).read_text())["digest"]
    if digest != reference:
        print(f"{label}: {out} renders to digest {digest}, not the reference {reference} the held-out "
              "keywords were checked against (other source versions)", file=sys.stderr)
    return out


def main(doc: str, label: str, default_dir: str, ensure_fn: Callable[..., Path], reference: str) -> None:
    """The command line of a corpus module: `--out DIR`, `--force`; one JSON line saying what is there,
    or the error in one line."""
    import argparse

    from edge.errors import EdgeRagError

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--out", default=None, help=f"folder (default: {default_dir})")
    ap.add_argument("--force", action="store_true", help="render again even if the folder is intact")
    args = ap.parse_args()
    try:
        out = ensure_fn(args.out, force=args.force)
    except EdgeRagError as e:
        sys.exit(f"{label}: {e}")
    meta = json.loads((out / CORPUS_JSON).read_text())
    print(json.dumps({"figure": label, "out": str(out), "documents": len(meta["sha256"]),
                      "bytes": sum((out / n).stat().st_size for n in meta["sha256"]),
                      "digest": meta["digest"], "reference": meta["digest"] == reference}))
