"""`edge-rag service --pack DIR`: what the systemd unit runs on the device.

1. check every file of the pack against pack.json (PackError names a corrupted or missing file;
   the unit's Restart=on-failure then retries, and the journal says which file)
2. EDGE_RAG_HOME = the pack's home/ (the shipped collection, read-only); EDGE_RAG_CACHE = the
   writable cache (TensorRT plans), /var/cache/edge-rag under systemd
3. open the embedder, then the generator on the first backend that works (edge.deploy.firstboot:
   tensorrt -> cuda -> onnxruntime, each skip logged with its reason)
4. serve the HTTP API (edge.serve.app, with /metrics); once /health answers, tell systemd READY=1
   and keep sending WATCHDOG=1 while /health keeps answering (Type=notify + WatchdogSec)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

from edge.deploy.manifest import verify_pack

log = logging.getLogger("edge.deploy")
# Checked on every start: everything the service reads. The wheels were consumed by install.sh.
START_SKIP = ("wheels/",)


def sd_notify(message: str) -> bool:
    """Send `message` to systemd's notification socket ($NOTIFY_SOCKET); False outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


def health_ok(host: str, port: int, timeout: float = 5.0, api_key: str | None = None) -> bool:
    h = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    url = f"http://[{h}]:{port}/health" if ":" in h else f"http://{h}:{port}/health"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200 and json.loads(r.read()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def _watchdog(host: str, port: int, stop: threading.Event, api_key: str | None = None) -> None:
    """READY=1 once /health answers; then WATCHDOG=1 every WatchdogSec/3 while it does. A hung
    event loop stops the pings and systemd restarts the service."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    period = max(1.0, usec / 3e6) if usec else 10.0
    while not stop.is_set() and not health_ok(host, port, timeout=2.0, api_key=api_key):
        stop.wait(0.5)
    if stop.is_set():
        return
    sd_notify(f"READY=1\nSTATUS=serving on {host}:{port}")
    log.info("ready: serving on http://%s:%d", host, port)
    while not stop.wait(period):
        if usec and health_ok(host, port, timeout=max(1.0, period), api_key=api_key):
            sd_notify("WATCHDOG=1")


def prepare_env(pack: Path) -> None:
    """The pack's home for collections; a writable cache for TensorRT plans."""
    os.environ["EDGE_RAG_HOME"] = str(pack / "home")
    if not os.environ.get("EDGE_RAG_CACHE"):
        os.environ["EDGE_RAG_CACHE"] = os.environ.get("CACHE_DIRECTORY") or str(Path.home() / ".cache" / "edge-rag")


def run_service(pack: str | Path, *, host: str | None = None, port: int | None = None, threads: int | None = None,
                chain: tuple[str, ...] | None = None, api_key: str | None = None, insecure: bool = False) -> None:
    """Verify, choose the backend, serve until SIGTERM (see the module docstring)."""
    from edge.deploy.firstboot import CHAIN, open_generator

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    pack = Path(pack).resolve()
    t0 = time.perf_counter()
    m = verify_pack(pack, skip=START_SKIP)
    log.info("pack %s verified: %d files in %.2f s (profile %s)", pack, len(m["files"]), time.perf_counter() - t0, m["profile"])
    host = host or m.get("host", "127.0.0.1")
    port = int(port or m.get("port", 8080))
    prepare_env(pack)
    from edge.cli.serve_cmd import _check_port
    from edge.runtime.embedder import Embedder
    from edge.serve.guard import Limits, check_bind

    warning = check_bind(host, api_key, insecure)  # the same rule as `edge-rag serve`
    if warning:
        log.warning("%s", warning)
    _check_port(host, port)
    emb = Embedder.from_bundle(pack / m["engines"]["embedder"], threads=threads)
    gen, choice = open_generator(pack / m["engines"]["generator"], chain=chain or CHAIN, threads=threads)
    collection = m.get("collection")
    if collection:
        from edge.runtime.host import EdgeRuntime

        rt = EdgeRuntime(collection, embedder=emb, generator=gen, backend=choice.backend)
    else:
        from edge.serve.app import ModelsRuntime

        rt = ModelsRuntime(emb, "default", gen)
    rt.backend_choice = choice  # reported by /metrics
    import uvicorn

    from edge.serve.app import create_app

    limits = Limits.for_generator(gen, api_key=api_key or None)
    stop = threading.Event()
    threading.Thread(target=_watchdog, args=(host, port, stop, api_key), daemon=True).start()
    try:
        uvicorn.run(create_app(rt, limits), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        stop.set()
        sd_notify("STOPPING=1")
