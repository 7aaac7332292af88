"""`GET /metrics`: the server's counters and the board's sensors in the Prometheus text format (0.0.4).

    edge_rag_requests_total{route}            requests received, per route
    edge_rag_generated_tokens_total           tokens the engine generated; rate() of it is tokens/s
    edge_rag_engine_busy_seconds_total        seconds the engine spent stepping
    edge_rag_tokens_per_busy_second           generated tokens / engine busy seconds (prefill time included)
    edge_rag_requests_waiting / _running      the engine's queue: requests waiting / running
    edge_rag_kv_blocks_used / _total          KV cache blocks (Engine.stats())
    edge_rag_prefix_cache_hit_rate            share of prompt blocks found in the prefix cache
    edge_rag_process_resident_bytes           this process's RSS
    edge_rag_memory_available_bytes / _total  the machine's (unified on a Jetson)
    edge_rag_temperature_celsius{sensor}      sysfs thermal zones (cpu, gpu, tj... on Orin)
    edge_rag_power_milliwatts{rail}           INA3221 rails (VDD_IN, VDD_CPU_GPU_CV, VDD_SOC...)
    edge_rag_backend_info{backend}            1 for the backend the generator runs on

Everything but the request counter is read at scrape time: the engine counters from
`Engine.stats()` (the generator's engine; gauges it lacks are left out), the sensors from sysfs.
"""

from __future__ import annotations

import os
import threading
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServeMetrics:
    """Counters of one server process. Thread-safe (requests run on worker threads)."""

    def __init__(self, runtime: Any, *, sysfs_root: str = "/"):
        self.runtime = runtime
        self.sysfs_root = sysfs_root
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}

    def engine_stats(self) -> dict[str, Any] | None:
        """Engine.stats() of the runtime's engine (the generator's), None without one."""
        rt = self.runtime  # NOTE: EdgeRuntime.generator loads lazily; never load it from here
        gen = vars(rt).get("_generator") if "_generator" in vars(rt) else getattr(rt, "generator", None)
        engine = getattr(rt, "engine", None) or getattr(gen, "engine", None)
        stats = getattr(engine, "stats", None)
        return stats() if callable(stats) else None

    # ---- called by the server ----------------------------------------------------------
    def count(self, route: str) -> None:
        with self._lock:
            self.requests[route] = self.requests.get(route, 0) + 1

    # ---- scrape --------------------------------------------------------------------------
    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
            lines.append(f"# HELP edge_rag_{name} {help_}")
            lines.append(f"# TYPE edge_rag_{name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
                lines.append(f"edge_rag_{name}{'{' + lab + '}' if lab else ''} {float(value):.6g}")

        with self._lock:
            reqs = dict(self.requests)
        metric("requests_total", "counter", "Requests received, per route.", [({"route": r}, n) for r, n in sorted(reqs.items())])
        st = self.engine_stats() or {}
        gauges = (
            ("tokens_generated", "generated_tokens_total", "counter", "Tokens generated; rate() gives tokens per second."),
            ("busy_s", "engine_busy_seconds_total", "counter", "Seconds the engine spent stepping."),
            ("waiting", "requests_waiting", "gauge", "Requests waiting in the engine's queue."),
            ("running", "requests_running", "gauge", "Requests running on the engine."),
            ("kv_blocks_used", "kv_blocks_used", "gauge", "KV cache blocks in use."),
            ("kv_blocks_total", "kv_blocks_total", "gauge", "KV cache blocks in all."),
            ("prefix_cache_hit_rate", "prefix_cache_hit_rate", "gauge", "Share of prompt blocks found in the prefix cache."),
        )
        for key, name, kind, help_ in gauges:
            if key in st:
                metric(name, kind, help_, [({}, st[key])])
        if st.get("busy_s"):
            metric("tokens_per_busy_second", "gauge", "Generated tokens per second the engine was busy (prefill included).",
                   [({}, st.get("tokens_generated", 0) / st["busy_s"])])
        choice = getattr(self.runtime, "backend_choice", None)
        backend = getattr(choice, "backend", None) or getattr(self.runtime, "backend", None)
        if backend:
            metric("backend_info", "gauge", "The backend the generator runs on.", [({"backend": backend}, 1)])
        try:
            import psutil

            vm = psutil.virtual_memory()
            metric("process_resident_bytes", "gauge", "Resident memory of this process.",
                   [({}, psutil.Process(os.getpid()).memory_info().rss)])
            metric("memory_available_bytes", "gauge", "Memory available on the machine (unified on a Jetson).", [({}, vm.available)])
            metric("memory_total_bytes", "gauge", "Memory of the machine.", [({}, vm.total)])
        except Exception:  # noqa: BLE001 - a scrape must not fail for a sensor
            pass
        from edge.board import read_power_rails, read_thermal

        temps = read_thermal(self.sysfs_root)
        if temps:
            metric("temperature_celsius", "gauge", "Thermal zone temperatures.", [({"sensor": k}, v) for k, v in sorted(temps.items())])
        rails = read_power_rails(self.sysfs_root)
        if rails:
            metric("power_milliwatts", "gauge", "Power rails (INA3221).", [({"rail": k}, v) for k, v in sorted(rails.items())])
        return "\n".join(lines) + "\n"


def metrics_route(metrics: ServeMetrics):
    """The Starlette route for GET /metrics."""
    from starlette.responses import Response
    from starlette.routing import Route

    async def endpoint(request):
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return Route("/metrics", endpoint, methods=["GET"])
