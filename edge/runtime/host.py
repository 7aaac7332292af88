"""EdgeRuntime: the embedder, the generator and a collection's index side by side in one process.

    rt = EdgeRuntime("default")            # default engines, built on first use
    rt.search("E-214")                     # -> rag.retrieve.Retrieval
    rt.ask("What does E-214 mean?", on_token=print)   # -> rag.ask.Answer
    rt.memory_report()                     # what each part costs, against the plan

Memory is measured as the growth of this process's RSS while each part loads (what it really
costs on a unified-memory Jetson), next to the size of its files and, where the engine's
manifest carries a memory plan, the planned bytes. The generator loads lazily on the first
`ask` unless `load_generator=True`, so `search` never pays for it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from edge.bundle import Manifest, read_manifest
from edge.errors import BundleError
from rag.store import Closing


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # pragma: no cover - psutil is a runtime dependency
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _dir_bytes(path: Path | None) -> int:
    if path is None:
        return 0
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@dataclass
class PartMemory:
    """One loaded part. `rss_delta_bytes` is the RSS growth while it loaded; `planned_bytes`
    is what the generator's memory plan set aside for it (None without a plan)."""

    name: str
    path: str
    file_bytes: int
    rss_delta_bytes: int
    load_s: float
    planned_bytes: int | None = None

    @property
    def over_plan(self) -> bool:
        return self.planned_bytes is not None and self.rss_delta_bytes > self.planned_bytes


def planned_bytes(gen_manifest: Manifest | None) -> dict[str, int]:
    """What the generator's memory plan (edge.plan, stored in its manifest) set aside for each
    part: generator = weights of the built quant + KV for one sequence at max_context + workspace;
    embedder = weights + workspace; index = the plan's index budget. Empty when there is no plan."""
    if gen_manifest is None or gen_manifest.plan is None:
        return {}
    from edge.models.spec import ModelSpec
    from edge.plan import kv_bytes_per_token

    budget = gen_manifest.plan["budget"]
    out: dict[str, int] = {}
    lim = gen_manifest.limits
    if gen_manifest.planned_weight_bytes is not None and lim is not None:
        kv = kv_bytes_per_token(ModelSpec.from_dict(gen_manifest.model), lim.kv_dtype)
        out["generator"] = int(gen_manifest.planned_weight_bytes + kv * lim.max_context + budget.get("workspace", 0))
    if "embedder" in budget:
        out["embedder"] = int(budget["embedder"] + budget.get("embedder_workspace", 0))
    if "index" in budget:
        out["index"] = int(budget["index"])
    return out


class EdgeRuntime(Closing):
    """Hosts both engines and one collection. ask() and search() may be called from several
    threads: retrieval (embedder, SQLite, FAISS) runs one at a time under `lock`, generation is
    batched by the generator's engine."""

    def __init__(self, collection: str = "default", *, embedder_path: str | Path | None = None,
                 generator_path: str | Path | None = None, backend: str = "auto", load_generator: bool = False,
                 progress: bool = True, embedder=None, generator=None):
        self.collection = collection
        self.lock = threading.RLock()
        self.backend = backend
        self.progress = progress
        self.parts: dict[str, PartMemory] = {}
        self.rss_start = _rss()
        self._generator_path = generator_path
        self._generator = generator
        self._gen_manifest: Manifest | None = None
        t = time.perf_counter()
        r0 = _rss()
        if embedder is None:
            from edge.runtime.embedder import Embedder

            path = Path(embedder_path) if embedder_path else self._default_embedder()
            embedder = Embedder.from_bundle(path)
            self._add_part("embedder", path, r0, t)
        self.embedder = embedder
        t, r0 = time.perf_counter(), _rss()
        from rag.retrieve import Retriever

        self.retriever = Retriever(self.embedder, collection)
        self._add_part("index", self.retriever.dir, r0, t)
        if load_generator:
            _ = self.generator

    def _default_embedder(self) -> Path:
        from edge.engines import default_embedder_bundle

        return default_embedder_bundle(progress=self.progress)

    def _add_part(self, name: str, path: Path, r0: int, t0: float) -> None:
        self.parts[name] = PartMemory(name, str(path), _dir_bytes(path), max(0, _rss() - r0), time.perf_counter() - t0)

    @property
    def generator(self):
        """The generator engine, loaded on first use."""
        if self._generator is None:
            from edge.runtime.generator import Generator

            t, r0 = time.perf_counter(), _rss()
            path = Path(self._generator_path) if self._generator_path else self._default_generator()
            self._generator = Generator.from_bundle(path, backend=self.backend)
            self._add_part("generator", path, r0, t)
            self._gen_manifest = _manifest_or_none(path)
        return self._generator

    def _generator_once(self):
        with self.lock:  # two first questions at once load it once
            return self.generator

    def _default_generator(self) -> Path:
        from edge.engines import default_generator_bundle

        return default_generator_bundle(progress=self.progress)

    # -- the two operations
    def search(self, query: str, k: int = 5, mode: str = "hybrid"):
        with self.lock:
            return self.retriever.search(query, k=k, mode=mode)

    def ask(self, question: str, *, k: int = 5, mode: str = "hybrid", max_tokens: int | None = None,
            on_token: Callable[[str], None] | None = None, gate: bool = True):
        from rag.ask import ask

        # the generator is loaded only when the relevance gate lets the question through
        return ask(question, _Locked(self.retriever, self.lock), self._generator_once, k=k, mode=mode, max_tokens=max_tokens,
                   on_token=on_token, gate=gate)

    # -- memory
    def memory_report(self) -> dict[str, Any]:
        """Per part: RSS growth at load, file bytes, planned bytes; plus the process total and
        the device profile's usable memory when a profile can be detected."""
        planned = planned_bytes(self._gen_manifest)
        for p in self.parts.values():
            p.planned_bytes = planned.get(p.name)
        rep: dict[str, Any] = {"parts": [asdict(p) | {"over_plan": p.over_plan} for p in self.parts.values()],
                               "rss_bytes": _rss(), "rss_at_start_bytes": self.rss_start}
        rep["loaded_bytes"] = sum(p.rss_delta_bytes for p in self.parts.values())
        if planned:
            rep["planned_bytes"] = sum(planned.get(p.name, 0) for p in self.parts.values())
            rep["within_plan"] = rep["loaded_bytes"] <= rep["planned_bytes"]
        try:
            from edge.profiles import detect_profile, load_profile

            prof = load_profile(detect_profile())
            rep["profile"] = prof.name
            rep["usable_bytes"] = prof.usable_bytes
            rep["fits"] = rep["rss_bytes"] <= prof.usable_bytes
        except Exception as e:  # no profile matches this machine: report without one
            rep["profile"] = None
            rep["profile_error"] = str(e)
        return rep

    def close(self) -> None:
        self.retriever.close()


def _manifest_or_none(path: Path) -> Manifest | None:
    """The generator's manifest for the memory report (None: not a bundle we can read, no plan)."""
    try:
        return read_manifest(path)
    except BundleError:
        return None


class _Locked:
    """A retriever whose search runs under the runtime's lock (it embeds and reads SQLite/FAISS)."""

    def __init__(self, retriever, lock):
        self._r, self._lock = retriever, lock

    def search(self, *a, **kw):
        with self._lock:
            return self._r.search(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._r, name)
