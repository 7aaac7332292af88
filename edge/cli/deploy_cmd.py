"""Commands: `edge-rag pack`, `edge-rag verify-pack`, `edge-rag service`, `edge-rag monitor`.

Thin: parse, call edge.deploy / edge.board, print. Library imports happen inside the functions.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from edge.cli.app import app


@app.command("pack")
def pack(
    profile: str = typer.Option(..., "--profile", "-p", help="Device profile the pack is for, e.g. orin-nano-8gb."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Archive to write (.tar or .tar.gz)."),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Generator bundle (default: the default answer model)."),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="Embedder bundle (default: the collection's)."),
    collection: str = typer.Option("default", "--collection", "-c", help="Collection to ship (SQLite store + index)."),
    no_collection: bool = typer.Option(False, "--no-collection", help="Ship the engines only (/v1/ask then says to ingest)."),
    target: str = typer.Option("jetson", "--target", help="Wheels for: jetson (aarch64, CPython 3.10, JetPack 6) or host."),
    wheelhouse: Optional[Path] = typer.Option(None, "--wheelhouse", help="Use these wheels instead of `pip download`."),
    cuda: bool = typer.Option(False, "--cuda", help="Add the cuda extra's wheels (CuPy) for the GPU backends."),
    rootfs_overlay: Optional[Path] = typer.Option(None, "--rootfs-overlay",
                                                  help="Also lay the pack out for Linux_for_Tegra/rootfs in this folder."),
    prefix: str = typer.Option("/opt/edge-rag", "--prefix", help="Where the pack is installed on the device."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the service listens on."),
    port: int = typer.Option(8080, "--port"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Pack engines, collection, wheels, installer and systemd unit for an offline device."""
    from edge.deploy.pack import build_pack

    r = build_pack(profile=profile, out=out, engine=engine, embedder=embedder,
                   collection=None if no_collection else collection, target=target, wheelhouse=wheelhouse,
                   extras=("cuda",) if cuda else (), rootfs_overlay=rootfs_overlay, prefix=prefix, host=host,
                   port=port, say=lambda m: print(m, file=sys.stderr))
    if json_out:
        print(json.dumps(r.to_dict(), indent=2))
        return
    print(f"{r.out}: {r.bytes / 2**20:.1f} MiB, {r.files} files, {len(r.wheels)} wheels for {r.target}; "
          f"MemoryMax {r.memory_max_bytes / 2**20:.0f} MiB")
    for part, n in r.parts.items():
        print(f"  {part:<20} {n / 2**20:8.1f} MiB")


@app.command("verify-pack")
def verify_pack_cmd(
    pack_dir: Path = typer.Argument(..., help="An unpacked or installed pack (the folder holding pack.json)."),
    skip_wheels: bool = typer.Option(False, "--skip-wheels", help="Do not check wheels/ (as the service does)."),
) -> None:
    """Check every file of a pack against the sha256 in its pack.json."""
    from edge.deploy.manifest import verify_pack

    m = verify_pack(pack_dir, skip=("wheels/",) if skip_wheels else ())
    print(f"{pack_dir}: {len(m['files'])} files verified (profile {m.get('profile')}, made {m.get('created')})")


@app.command("service")
def service(
    pack_dir: Path = typer.Option(..., "--pack", help="The installed pack (e.g. /opt/edge-rag)."),
    host: Optional[str] = typer.Option(None, "--host", help="Default: the pack's (127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Default: the pack's (8080)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for onnxruntime."),
    backends: str = typer.Option("tensorrt,cuda,onnxruntime", "--backends", help="Fallback chain, first that loads wins."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGE_RAG_API_KEY", show_envvar=True,
                                          help="Require `Authorization: Bearer KEY` (needed for a non-loopback --host)"),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without an API key"),
) -> None:
    """Run an installed pack's HTTP service (what the systemd unit starts): verify, pick backend, serve."""
    from edge.deploy.service import run_service
    from edge.errors import UsageError

    chain = tuple(b.strip() for b in backends.split(",") if b.strip())
    bad = [b for b in chain if b not in ("tensorrt", "cuda", "onnxruntime")]
    if not chain or bad:
        raise UsageError(f"--backends {backends!r}", fix="a comma-separated list of tensorrt, cuda, onnxruntime")
    run_service(pack_dir, host=host, port=port, threads=threads, chain=chain, api_key=api_key, insecure=insecure)


@app.command("monitor")
def monitor(
    interval: float = typer.Option(1.0, "--interval", "-i", help="Seconds between samples."),
    count: int = typer.Option(0, "--count", "-n", help="Stop after N samples (0: until Ctrl-C)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per sample."),
) -> None:
    """Live board status: RAM, CPU/GPU load, temperatures, power rails (tegrastats on a Jetson, sysfs elsewhere)."""
    import shutil

    from edge.board import parse_tegrastats, tegrastats_lines

    def emit(sample: dict) -> None:
        if json_out:
            print(json.dumps(sample), flush=True)
            return
        temps = " ".join(f"{k}={v:.1f}C" for k, v in sorted(sample.get("temps_c", {}).items()))
        power = " ".join(f"{k}={v}mW" for k, v in sorted(sample.get("power_mw", {}).items()))
        cpu = sample.get("cpu_load_pct")
        gpu = sample.get("gpu_load_pct")
        print(f"{time.strftime('%H:%M:%S')} RAM {sample.get('ram_used_mb')}/{sample.get('ram_total_mb')} MB"
              f" CPU {'-' if cpu is None else f'{cpu:.0f}%'} GPU {'-' if gpu is None else f'{gpu}%'}"
              f" {temps} {power}".rstrip(), flush=True)

    n = 0
    if shutil.which("tegrastats"):
        lines = tegrastats_lines(int(interval * 1000))
        try:
            for line in lines:
                try:
                    emit({"source": "tegrastats", **parse_tegrastats(line).to_dict()})
                except ValueError:
                    continue
                n += 1
                if count and n >= count:
                    break
        finally:
            lines.close()
        return
    import psutil

    from edge.board import read_power_rails, read_thermal

    psutil.cpu_percent(None)
    while True:
        time.sleep(interval if n or interval < 0.2 else 0.2)
        vm = psutil.virtual_memory()
        emit({"source": "sysfs", "ram_used_mb": (vm.total - vm.available) >> 20, "ram_total_mb": vm.total >> 20,
              "cpu_load_pct": psutil.cpu_percent(None), "gpu_load_pct": None, "temps_c": read_thermal(),
              "power_mw": read_power_rails()})
        n += 1
        if count and n >= count:
            return
