"""`edge-rag pack`: everything a Jetson needs to answer questions with no network, in one archive.

    edge-rag/                      (the archive's top folder; installed to --prefix, /opt/edge-rag)
      pack.json                    profile, plan, target, and the sha256 of every file below
      install.sh                   offline installer (pip --no-index), see edge/deploy/install.sh
      README.txt
      wheels/*.whl                 edge-rag and its runtime dependencies for the target
      engines/generator/           the generator bundle (as built; checksummed by its own manifest too)
      engines/embedder/            the embedder bundle the collection was ingested with
      home/collections/<name>/     the collection (SQLite store in rollback-journal mode + FAISS index),
                                   readable from a read-only directory
      systemd/edge-rag.service     the unit (edge.deploy.systemd), MemoryMax from the plan

`--rootfs-overlay DIR` lays the same files out for L4T's Linux_for_Tegra/rootfs: the pack under
DIR/opt/edge-rag, the units under DIR/etc/systemd/system and the service enabled by symlink; the
venv is made on the first boot by edge-rag-install.service (install.sh --in-place), since a host
cannot build the device's venv.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge.bundle import Manifest
from edge.deploy.manifest import PACK_MANIFEST, write_manifest
from edge.deploy.systemd import UNIT_NAME, UnitConfig, render_unit
from edge.errors import UsageError

TOP = "edge-rag"
INSTALL_UNIT = "edge-rag-install.service"
# The device: JetPack 6 is Ubuntu 22.04 (glibc 2.35) with CPython 3.10 on aarch64. pip accepts
# several --platform tags; any manylinux up to glibc 2.35 runs there.
JETSON_PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_31_aarch64",
                    "manylinux_2_34_aarch64", "manylinux_2_35_aarch64")
JETSON_PYTHON = "3.10"
# What the runtime process costs besides its engines and index (Python, onnxruntime, numpy, faiss,
# the HTTP server): the default engines' serve process measured 355 MiB RSS, of which ~123 MB
# generator and ~47 MB embedder (docs/measurements.md, "Local HTTP API").
RUNTIME_BASE_BYTES = 384 << 20
MEMORY_HEADROOM = 1.5


@dataclass
class PackResult:
    out: Path
    bytes: int
    files: int
    memory_max_bytes: int
    wheels: list[str]
    target: str
    overlay: Path | None = None
    parts: dict[str, int] = field(default_factory=dict)  # part -> bytes

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "bytes": self.bytes, "files": self.files, "memory_max_bytes": self.memory_max_bytes,
                "wheels": self.wheels, "target": self.target, "overlay": str(self.overlay) if self.overlay else None,
                "parts": self.parts}


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def memory_max(gen_manifest: Manifest, engine_dirs: list[Path], collection_dir: Path | None) -> int:
    """MemoryMax for the unit: the plan's bytes for generator, embedder and index where the
    generator's manifest carries a plan (else the files' sizes), times 1.5, plus the runtime base."""
    from edge.runtime.host import planned_bytes

    planned = planned_bytes(gen_manifest)
    parts = sum(planned.values()) if "generator" in planned else sum(_dir_bytes(d) for d in engine_dirs)
    if "index" not in planned and collection_dir is not None:
        parts += _dir_bytes(collection_dir)
    return int(parts * MEMORY_HEADROOM) + RUNTIME_BASE_BYTES


def copy_collection(src: Path, dst: Path) -> None:
    """Copy a collection for a read-only install: the SQLite store through the backup API (a
    consistent copy even while an ingest writes) switched to rollback-journal mode, so that a
    read-only open needs no -wal/-shm files beside it; the index files as they are."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if (f.is_file() and not f.name.startswith(".")  # .ingest.lock
                and not f.name.endswith(("-wal", "-shm", "-journal")) and f.suffix != ".sqlite"):
            shutil.copy2(f, dst / f.name)
    for db in sorted(src.glob("*.sqlite")):
        s = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        d = sqlite3.connect(str(dst / db.name))
        try:
            s.backup(d)
            d.execute("PRAGMA journal_mode=DELETE")
            d.commit()
        finally:
            d.close()
            s.close()


def build_edge_wheel(dest: Path) -> Path:
    """The edge-rag wheel from this source tree (profiles included as package data)."""
    import tempfile

    from edge.paths import REPO_ROOT

    if not (REPO_ROOT / "pyproject.toml").is_file():
        raise UsageError("edge-rag is not running from its source tree, so it cannot build its own wheel",
                         fix="pass --wheelhouse DIR holding edge_rag-*.whl and its dependencies")
    from importlib.metadata import PackageNotFoundError, version

    try:
        st = version("setuptools")
    except PackageNotFoundError:
        st = "none"
    if st == "none" or int(st.split(".")[0]) < 77:  # pyproject.toml's SPDX license (PEP 639)
        raise UsageError(f"building the edge-rag wheel needs setuptools >= 77 in this environment (it has {st})",
                         fix="pip install 'setuptools>=77' (or install edge-rag with its [build] extra)")
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    # NOTE: built from a clean copy: setuptools' in-tree build/ keeps modules deleted from the
    # source and would put them into the wheel.
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                  "engines", ".edge-rag", ".bench", ".whl", "bench", "examples", "tests")
    with tempfile.TemporaryDirectory(prefix="edge-rag-wheel-") as td:
        src = Path(td) / "src"
        shutil.copytree(REPO_ROOT, src, symlinks=True, ignore=skip)
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest),
                            str(src)], capture_output=True, text=True)
    wheels = sorted(dest.glob("edge_rag-*.whl"))
    if r.returncode != 0 or not wheels:
        raise UsageError(f"building the edge-rag wheel failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return wheels[-1]


def download_wheels(dest: Path, edge_wheel: Path, target: str, extras: tuple[str, ...] = ()) -> list[str]:
    """`pip download` edge-rag's runtime dependencies as wheels for `target` ('host': this machine;
    'jetson': aarch64, CPython 3.10). Needs PyPI; the pack then installs without it."""
    req = f"{edge_wheel}[{','.join(extras)}]" if extras else str(edge_wheel)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--dest", str(dest), "--only-binary", ":all:", req]
    if target == "jetson":
        for p in JETSON_PLATFORMS:
            cmd += ["--platform", p]
        cmd += ["--python-version", JETSON_PYTHON, "--implementation", "cp"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError(f"pip download for the {target} target failed: {(r.stderr or r.stdout).strip()[-600:]}",
                         fix="check PyPI access, or pass --wheelhouse DIR with the wheels")
    return sorted(p.name for p in dest.glob("*.whl"))


def _readme(meta: dict) -> str:
    return f"""edge-rag pack for {meta['profile']} ({meta['target']['platform']}, Python {meta['target']['python']})
made {meta['created']} by edge-rag {meta['edge_rag']}.

Install (no network needed):   sudo ./install.sh          (into {meta['prefix']}, enables {UNIT_NAME})
Without systemd:               ./install.sh --prefix DIR --no-systemd
Then:                          curl localhost:{meta['port']}/health
                               curl localhost:{meta['port']}/v1/ask -H 'content-type: application/json' -d '{{"question": "..."}}'
Logs:                          journalctl -u edge-rag -f
Every file is listed with its sha256 in pack.json; install.sh and every service start check them
and refuse a corrupted or modified file by name.
"""


def build_pack(*, profile: str, out: Path | None, engine: Path | None = None, embedder: Path | None = None,
               collection: str | None = "default", target: str = "jetson", wheelhouse: Path | None = None,
               extras: tuple[str, ...] = (), rootfs_overlay: Path | None = None, prefix: str = "/opt/edge-rag",
               host: str = "127.0.0.1", port: int = 8080,
               say: Callable[[str], None] = lambda m: None) -> PackResult:
    """Collect the engines, the collection, the wheels and the installer into `out` (a .tar or
    .tar.gz) and/or a rootfs overlay. See the module docstring for the layout."""
    from edge.bundle import Bundle
    from edge.paths import collection_exists, home
    from edge.profiles import load_profile

    if out is None and rootfs_overlay is None:
        raise UsageError("nothing to write", fix="pass --out robot.tar and/or --rootfs-overlay DIR")
    if target not in ("jetson", "host"):
        raise UsageError(f"unknown target {target!r}", fix="use jetson (aarch64, CPython 3.10) or host (this machine)")
    if out is not None and not str(out).endswith((".tar", ".tar.gz", ".tgz")):
        raise UsageError(f"--out {out}: the pack is a tar archive", fix="name it like robot.tar or robot.tar.gz")
    prof = load_profile(profile)
    coll_dir = None
    if collection:
        if not collection_exists(collection):
            from edge.errors import missing_collection

            raise missing_collection(collection, " before packing (or pass --no-collection)")
        coll_dir = home() / "collections" / collection
    if engine is None:
        from edge.engines import default_generator_bundle

        engine = default_generator_bundle(progress=sys.stderr.isatty())
    if embedder is None:
        embedder = _collection_embedder(coll_dir)
        if embedder is None:
            from edge.engines import default_embedder_bundle

            embedder = default_embedder_bundle(progress=sys.stderr.isatty())
    gen = Bundle.open(engine, kind="generator")  # verified: never pack a corrupted bundle
    emb = Bundle.open(embedder, kind="embedder")
    _check_embedder_matches(emb, coll_dir, collection)

    parent = Path(out).resolve().parent if out is not None else Path(rootfs_overlay).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage_root = parent / f".edge-rag-pack-{os.getpid()}"
    if stage_root.exists():
        shutil.rmtree(stage_root)
    stage = stage_root / TOP
    try:
        say(f"engines: {gen.path} + {emb.path}")
        shutil.copytree(gen.path, stage / "engines" / "generator")
        shutil.copytree(emb.path, stage / "engines" / "embedder")
        if coll_dir is not None:
            say(f"collection '{collection}': {coll_dir}")
            copy_collection(coll_dir, stage / "home" / "collections" / collection)
        wheels_dir = stage / "wheels"
        wheels_dir.mkdir(parents=True)
        if wheelhouse is not None:
            found = sorted(Path(wheelhouse).glob("*.whl"))
            if not any(w.name.startswith("edge_rag-") for w in found):
                raise UsageError(f"--wheelhouse {wheelhouse} has no edge_rag-*.whl", fix="add the edge-rag wheel (pip wheel . -w DIR)")
            for w in found:
                shutil.copy2(w, wheels_dir / w.name)
            wheels = [w.name for w in found]
        else:
            say(f"wheels for the {target} target (pip download)")
            edge_wheel = build_edge_wheel(wheels_dir)
            wheels = download_wheels(wheels_dir, edge_wheel, target, extras)
        mem = memory_max(gen.manifest, [gen.path, emb.path], coll_dir)
        unit = UnitConfig(prefix=prefix, host=host, port=port, memory_max_bytes=mem)
        (stage / "systemd").mkdir()
        (stage / "systemd" / UNIT_NAME).write_text(render_unit(unit))
        (stage / "systemd" / INSTALL_UNIT).write_text(render_install_unit(prefix))
        install = (Path(__file__).with_name("install.sh")).read_text().replace("@PACK_PREFIX@", prefix)
        (stage / "install.sh").write_text(install)
        (stage / "install.sh").chmod(0o755)
        py = (JETSON_PYTHON, "aarch64") if target == "jetson" else (platform.python_version(), platform.machine())
        meta = {
            "edge_rag": _version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "profile": prof.name, "power_mode": prof.default_power_mode,
            "target": {"name": target, "platform": py[1], "python": py[0]},
            "prefix": prefix, "host": host, "port": port, "memory_max_bytes": mem,
            "engines": {"generator": "engines/generator", "embedder": "engines/embedder"},
            "collection": collection if coll_dir is not None else None,
            "wheels": wheels,
        }
        (stage / "README.txt").write_text(_readme(meta))
        manifest = write_manifest(stage, meta)
        parts = {"engines/generator": _dir_bytes(stage / "engines" / "generator"),
                 "engines/embedder": _dir_bytes(stage / "engines" / "embedder"),
                 "home": _dir_bytes(stage / "home") if (stage / "home").exists() else 0,
                 "wheels": _dir_bytes(wheels_dir)}
        result = PackResult(out=Path(out) if out is not None else Path(rootfs_overlay), bytes=0,
                            files=len(manifest["files"]) + 1, memory_max_bytes=mem, wheels=wheels, target=target,
                            parts=parts)
        if out is not None:
            mode = "w:gz" if str(out).endswith((".gz", ".tgz")) else "w"
            tmp = Path(out).with_name(Path(out).name + ".partial")
            with tarfile.open(tmp, mode) as tar:
                tar.add(stage, arcname=TOP)
            os.replace(tmp, out)
            result.bytes = Path(out).stat().st_size
            say(f"wrote {out} ({result.bytes / 2**20:.1f} MiB, {result.files} files)")
        if rootfs_overlay is not None:
            result.overlay = write_overlay(stage, Path(rootfs_overlay), prefix)
            if out is None:
                result.bytes = _dir_bytes(stage)
            say(f"wrote the rootfs overlay {rootfs_overlay}")
        return result
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)


def render_install_unit(prefix: str) -> str:
    """The first-boot oneshot of a flashed overlay: makes the venv from the pack's wheels, once."""
    return f"""# edge-rag: first boot of a flashed rootfs overlay: installs the pack's wheels offline, once.
[Unit]
Description=edge-rag first-boot install (offline wheels into {prefix}/venv)
ConditionPathExists=!{prefix}/venv/bin/edge-rag
Before={UNIT_NAME}

[Service]
Type=oneshot
ExecStart={prefix}/install.sh --in-place --no-systemd
RemainAfterExit=yes
StandardOutput=journal

[Install]
WantedBy=multi-user.target
"""


def write_overlay(stage: Path, overlay: Path, prefix: str) -> Path:
    """The pack laid out for Linux_for_Tegra/rootfs: files under <prefix>, units enabled by symlink
    (what `systemctl enable` would create), the dedicated user made by the first-boot install."""
    overlay = Path(overlay)
    dest = overlay / prefix.lstrip("/")
    if dest.exists():
        raise UsageError(f"{dest} already exists", fix="pass an empty --rootfs-overlay folder")
    shutil.copytree(stage, dest, symlinks=True)
    units = overlay / "etc" / "systemd" / "system"
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for name in (UNIT_NAME, INSTALL_UNIT):
        shutil.copy2(stage / "systemd" / name, units / name)
        link = wants / name
        if not link.is_symlink():
            os.symlink(f"/etc/systemd/system/{name}", link)
    # The service user, created at first boot by install.sh; sysusers.d makes it even earlier.
    sysusers = overlay / "usr" / "lib" / "sysusers.d"
    sysusers.mkdir(parents=True, exist_ok=True)
    (sysusers / "edge-rag.conf").write_text("u edge-rag - \"edge-rag service\" /nonexistent /usr/sbin/nologin\nm edge-rag video\n")
    return overlay


def overlay_files(overlay: Path) -> list[str]:
    """Every path in an overlay (files and symlinks), relative, sorted: what a flash would carry."""
    overlay = Path(overlay)
    return sorted(p.relative_to(overlay).as_posix() + (" -> " + os.readlink(p) if p.is_symlink() else "")
                  for p in overlay.rglob("*") if p.is_file() or p.is_symlink())


def _collection_embedder(coll_dir: Path | None) -> Path | None:
    if coll_dir is None:
        return None
    from rag.store import Store

    with Store(coll_dir, readonly=True) as s:
        p = s.get_meta("embedder_path")
    return Path(p) if p and Path(p).exists() else None


def _check_embedder_matches(emb, coll_dir: Path | None, collection: str | None) -> None:
    if coll_dir is None:
        return
    from edge.errors import IndexError_
    from rag.store import Store

    with Store(coll_dir, readonly=True) as s:
        want = s.get_meta("embedder_id")
    have = emb.manifest.embedder_id
    if want is not None and have is not None and want != have:
        raise IndexError_(f"collection '{collection}' was ingested with embedder {want}, not {have} ({emb.path})",
                          fix="pass the --embedder it was ingested with")


def _version() -> str:
    from edge import __version__

    return __version__


def pack_summary(root: Path) -> dict[str, Any]:
    """pack.json's fields without the file list (for `edge-rag verify-pack`)."""
    m = json.loads((Path(root) / PACK_MANIFEST).read_text())
    m.pop("files", None)
    return m
