"""Engine bundles: a self-describing, relocatable directory.

    <bundle>/manifest.json        schema, kind, model spec, quant recipe, profile + plan limits,
                                  artifacts with sha256, tool versions
    <bundle>/weights.safetensors  quantized weights (the source of truth; see edge.quant.format)
    <bundle>/tokenizer.json ...   tokenizer files
    <bundle>/*.onnx               derived graphs (model.plan is built on the device)

A bundle is written into a sibling temp dir and renamed into place only when complete, so a
killed build never leaves a half-written bundle behind. A bundle that fails its schema or
checksums is refused, never half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from edge.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("generator", "embedder")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shaped the artifacts (those importable here)."""
    from importlib import metadata

    out = {}
    for dist in ("edge-rag", "numpy", "onnx", "onnxruntime", "gguf", "safetensors", "tokenizers", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class BundleWriter:
    """Write files into `<out>.partial-<pid>`, then `commit(manifest)` checksums and renames."""

    def __init__(self, out: Path, kind: str):
        if kind not in KINDS:
            raise ValueError(kind)
        self.out = Path(out)
        self.kind = kind
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)

    def path(self, name: str) -> Path:
        """Where to write artifact `name` before commit."""
        return self.tmp / name

    def add_file(self, name: str, src: Path) -> None:
        shutil.copyfile(src, self.tmp / name)

    def write_weights(self, tensors: dict[str, Any], name: str = "weights.safetensors") -> None:
        from safetensors.numpy import save_file

        save_file(tensors, str(self.tmp / name))

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Checksum every file, write manifest.json last, swap the bundle into place."""
        artifacts = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(self.tmp).as_posix()
                artifacts[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        full = {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tools": tool_versions(),
            **manifest,
            "artifacts": artifacts,
        }
        tmp_manifest = self.tmp / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(full, indent=2, sort_keys=False))
        os.replace(tmp_manifest, self.tmp / MANIFEST)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Bundle:
    """An opened, verified engine bundle."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, *, kind: str | None = None, verify: bool = True) -> "Bundle":
        path = Path(path).expanduser()
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{path}: not an engine bundle (no {MANIFEST})", fix="build one with `edge-rag build`")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath}: corrupt manifest ({e})", fix="rebuild the bundle") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{path}: bundle schema version {version!r}, this edge-rag reads {SCHEMA_VERSION}",
                fix="rebuild the bundle with this version of edge-rag",
            )
        if kind is not None and manifest.get("kind") != kind:
            raise BundleError(f"{path}: is a {manifest.get('kind')!r} bundle, expected {kind!r}")
        b = cls(path, manifest)
        if verify:
            b.verify()
        return b

    def verify(self, names: Iterable[str] | None = None) -> None:
        """Check the presence, size and sha256 of every artifact, or of `names` only (a backend
        verifies what it loads: hashing a bundle's other graphs costs ~0.5 s on every cold start)."""
        artifacts = self.manifest.get("artifacts", {})
        if names is not None:
            artifacts = {n: artifacts[n] for n in names if n in artifacts}
        for rel, meta in artifacts.items():
            p = self.path / rel
            if not p.is_file():
                raise BundleError(f"{self.path}: missing artifact {rel}", fix="rebuild the bundle")
            if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                raise BundleError(f"{self.path}: checksum mismatch for {rel} (corrupted or modified)", fix="rebuild the bundle")

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("artifacts", {}):
            raise BundleError(f"{self.path}: bundle has no artifact {name}")
        return self.path / name

    def has(self, name: str) -> bool:
        return name in self.manifest.get("artifacts", {})

    @property
    def spec(self):
        from edge.models.spec import ModelSpec

        return ModelSpec.from_dict(self.manifest["model"])

    def load_weights(self, name: str = "weights.safetensors") -> dict[str, Any]:
        """All tensors as numpy arrays (see edge.quant.format for names and layouts)."""
        from safetensors.numpy import load_file

        return load_file(str(self.file(name)))
