"""The systemd unit of an installed pack, rendered from its plan (one definition: `edge-rag pack`
writes it into the pack, jetson/systemd/edge-rag.service is this rendering with the defaults and a
test keeps the two equal).

    Type=notify + WatchdogSec   `edge-rag service` sends READY=1 once /health answers and
                                WATCHDOG=1 every WatchdogSec/3 while it keeps answering
    Restart=on-failure          a crash, a failed check or a missed watchdog restarts it
    User=edge-rag               a dedicated system user (install.sh creates it)
    ProtectSystem=strict        the whole file system read-only for it, except ReadWritePaths:
                                its cache (TensorRT plans); the pack itself stays read-only
    MemoryMax                   from the plan: the engines, index and runtime, with headroom
    StandardOutput=journal      logs in the journal (`journalctl -u edge-rag`)
"""

from __future__ import annotations

from dataclasses import dataclass

UNIT_NAME = "edge-rag.service"


@dataclass(frozen=True)
class UnitConfig:
    prefix: str = "/opt/edge-rag"  # where install.sh puts the pack
    user: str = "edge-rag"
    host: str = "127.0.0.1"
    port: int = 8080
    memory_max_bytes: int = 2 << 30
    cache_dir: str = "/var/cache/edge-rag"  # TensorRT plans (CacheDirectory=edge-rag)
    watchdog_s: int = 60
    threads: int | None = None


def render_unit(cfg: UnitConfig) -> str:
    """The unit file text for `cfg`."""
    mib = -(-cfg.memory_max_bytes // 2**20)
    threads = f" --threads {cfg.threads}" if cfg.threads else ""
    return f"""# edge-rag: the local question-answering service of an installed pack (written by `edge-rag pack`).
[Unit]
Description=edge-rag local LLM + RAG service
Documentation=file://{cfg.prefix}/README.txt
After=network.target
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
User={cfg.user}
Group={cfg.user}
Environment=EDGE_RAG_HOME={cfg.prefix}/home
Environment=EDGE_RAG_CACHE={cfg.cache_dir}
Environment=PYTHONUNBUFFERED=1
# Checks every file of the pack against pack.json, picks the backend (TensorRT plan built on the
# first boot into the cache, else CUDA, else ONNX Runtime, reasons logged), then serves.
ExecStart={cfg.prefix}/venv/bin/edge-rag service --pack {cfg.prefix} --host {cfg.host} --port {cfg.port}{threads}
Restart=on-failure
RestartSec=5
# The first boot builds the TensorRT plan (minutes on an Orin Nano) before it reports ready.
TimeoutStartSec=1800
WatchdogSec={cfg.watchdog_s}
TimeoutStopSec=15
MemoryMax={mib}M
MemorySwapMax=0
CacheDirectory=edge-rag
ProtectSystem=strict
ReadWritePaths={cfg.cache_dir}
ProtectHome=true
PrivateTmp=true
NoNewPrivileges=true
ProtectKernelTunables=true
ProtectControlGroups=true
RestrictSUIDSGID=true
# The GPU (/dev/nvhost-*, /dev/nvmap on Jetson) needs the video group.
SupplementaryGroups=video
StandardOutput=journal
StandardError=journal
SyslogIdentifier=edge-rag

[Install]
WantedBy=multi-user.target
"""
