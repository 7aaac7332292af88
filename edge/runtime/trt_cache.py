"""TensorRT plans live in a cache outside the engine bundle (a bundle is read-only and relocatable;
a plan is specific to one GPU and one TensorRT version, so it is built on the device itself).

    <cache>/trt/<key>/model.plan   the serialized engine
    <cache>/trt/<key>/plan.json    what it was built from and its sha256 (checked before each load)

<cache> is $EDGE_RAG_CACHE, else $EDGE_RAG_HOME/cache (the systemd unit sets /var/cache/edge-rag).
<key> hashes the bundle's manifest (which carries the sha256 of every artifact), the TensorRT
version and the GPU: a new bundle, a JetPack upgrade or another module gets its own plan, and a
plan whose bytes no longer match plan.json is rebuilt, never loaded. A bundle that ships its own
`model.plan` artifact (checksummed by the bundle) is used as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from edge.bundle import sha256_file

PLAN = "model.plan"
PLAN_INFO = "plan.json"


def cache_dir() -> Path:
    """Where derived, rebuildable artifacts go ($EDGE_RAG_CACHE, else $EDGE_RAG_HOME/cache)."""
    forced = os.environ.get("EDGE_RAG_CACHE")
    if forced:
        return Path(forced).expanduser()
    from edge.paths import home

    return home() / "cache"


def plan_key(bundle_path: Path, trt_version: str, device: str) -> str:
    """A short hash of (bundle manifest, TensorRT version, GPU): the plan cache's folder name."""
    h = hashlib.sha256()
    h.update((Path(bundle_path) / "manifest.json").read_bytes())
    h.update(f"\0{trt_version}\0{device}".encode())
    return h.hexdigest()[:20]


def trt_identity() -> tuple[str, str]:
    """(TensorRT version, GPU name + compute capability) of this machine. Needs tensorrt and cupy."""
    import cupy
    import tensorrt as trt

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return str(trt.__version__), f"{name} sm_{props['major']}{props['minor']}"


def cached_plan(bundle, trt_version: str, device: str, *, cache: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """(plan path, status) for `bundle` without building: status["valid"] says whether the cached
    plan exists and matches its recorded sha256."""
    folder = (cache or cache_dir()) / "trt" / plan_key(bundle.path, trt_version, device)
    plan, info_path = folder / PLAN, folder / PLAN_INFO
    status: dict[str, Any] = {"folder": str(folder), "valid": False, "reason": "not built yet"}
    if plan.is_file() and info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except ValueError:
            info = {}
        if info.get("sha256") == sha256_file(plan):
            status.update(valid=True, reason="cached", info=info)
        else:
            status["reason"] = "cached plan does not match its checksum"
    return plan, status


def ensure_plan(bundle, *, trt_version: str | None = None, device: str | None = None, cache: Path | None = None,
                build: Callable[[Path, Path], Any] | None = None, log: Callable[[str], None] = lambda m: None) -> Path:
    """The plan to load for `bundle`: its own `model.plan` artifact if it ships one, else the cached
    plan for this TensorRT and GPU, built (into the cache, never into the bundle) when missing,
    stale or corrupt. `build(bundle_path, out_path)` defaults to edge.build.trt_plan.build_plan."""
    if bundle.has(PLAN):
        bundle.verify([PLAN])
        return bundle.file(PLAN)
    if trt_version is None or device is None:
        trt_version, device = trt_identity()
    plan, status = cached_plan(bundle, trt_version, device, cache=cache)
    if status["valid"]:
        return plan
    if build is None:
        from edge.build.trt_plan import build_plan as build
    plan.parent.mkdir(parents=True, exist_ok=True)
    log(f"building the TensorRT plan for {device} with TensorRT {trt_version} into {plan.parent} ({status['reason']}); "
        f"minutes on a Jetson")
    t0 = time.perf_counter()
    tmp = plan.with_name(PLAN + f".partial-{os.getpid()}")
    build(Path(bundle.path), tmp)
    info = {"bundle": str(bundle.path), "trt_version": trt_version, "device": device, "sha256": sha256_file(tmp),
            "bytes": tmp.stat().st_size, "build_s": round(time.perf_counter() - t0, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.replace(tmp, plan)
    (plan.parent / PLAN_INFO).write_text(json.dumps(info, indent=2))
    log(f"TensorRT plan built in {info['build_s']} s ({info['bytes']} bytes)")
    return plan
