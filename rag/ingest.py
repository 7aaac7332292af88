"""Ingest: a folder -> load -> chunk -> embed -> one SQLite transaction -> atomic FAISS write.

Incremental: a file whose sha256 is unchanged is not re-read or re-embedded; changed files are
replaced, files gone from the folder are dropped. Crash safety, in order:

    1. scan, load, chunk and embed everything that changed      (nothing written yet)
    2. BEGIN IMMEDIATE; delete/insert rows; generation += 1; COMMIT (atomic, WAL + fsync)
    3. update or rebuild the FAISS index; temp file + fsync + os.replace, header = generation

A kill during 1 or 2 leaves the previous generation intact (store and index agree and keep
serving). A kill during 3 leaves store = G+1, index = G: readers detect it (`open_index`) and
rebuild the index from the vectors stored in SQLite; nothing half-written is ever served.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sqlite3
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from edge.errors import IndexError_, StorageError, UsageError
from rag.chunk import ChunkParams, Chunker, stored_chunk_params
from rag.index import INDEX_NAME, VectorIndex, choose_index, open_index, rebuild_from, storage_error
from rag.loaders import LOADERS, LoadError, file_sha256, load, scan
from rag.store import NewChunk, Store

log = logging.getLogger("edge_rag")

# Test-only hooks (never set by users): slow down embedding, or kill this process at a stage.
_ENV_EMBED_DELAY = "EDGE_RAG_TEST_EMBED_DELAY"  # seconds to sleep per embedded batch
_ENV_CRASH_AT = "EDGE_RAG_TEST_CRASH_AT"  # "before_commit" | "after_commit"


class EmbedderLike(Protocol):
    embedder_id: str
    dim: int

    def embed(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray: ...
    # an embedder that reads at most max_tokens of a text also takes embed(..., max_tokens=N)
    # (edge.runtime.embedder.Embedder); ingest passes it only when ChunkParams.embed_tokens is set

    def count_tokens(self, text: str) -> int: ...


@dataclass
class IngestReport:
    """What an ingest did. Paths are as shown to users."""

    collection: str
    generation: int
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unsupported: int = 0  # files with no loader for their extension
    chunks_added: int = 0
    chunks_removed: int = 0
    total_documents: int = 0
    total_chunks: int = 0
    index_kind: str = ""
    embed_seconds: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def collection_dir(collection: str) -> Path:
    from edge.paths import index_dir

    return index_dir(collection)  # checks the name


@contextmanager
def _ingest_lock(directory: Path):
    """One writer per collection (readers never block)."""
    f = open(directory / ".ingest.lock", "w")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{directory}: another ingest is running on this collection",
                             fix="wait for it to finish") from None
        yield
    finally:
        f.close()


def _crash_if(stage: str) -> None:
    if os.environ.get(_ENV_CRASH_AT) == stage:
        sys.stderr.write(f"TEST-CRASH {stage}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _display_path(p: Path, root: Path) -> str:
    base = root.parent  # "manuals/x.md" for an ingest of ./manuals
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return p.name


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def ingest(path: str | Path, *, embedder: EmbedderLike, collection: str = "default", rebuild: bool = False,
           params: ChunkParams = ChunkParams(), progress: bool = True, memory_budget: int | None = None,
           batch_size: int = 32, directory: Path | None = None, embedder_path: str | None = None,
           follow_links: bool = False) -> IngestReport:
    """Bring `collection` in line with the documents under `path`. See the module docstring."""
    t0 = time.perf_counter()
    root = Path(path).expanduser().resolve()
    found = scan(root, follow_links=follow_links)  # raises UsageError for a missing path
    files, unsupported = found.files, found.unsupported
    for p, why in found.refused:
        log.warning("skipped %s: %s", _display_path(p, root), why)
    if not files:
        exts = ", ".join(sorted(LOADERS))
        raise UsageError(f"{root}: no documents to ingest ({unsupported} files of other types)",
                         fix=f"point at a folder holding {exts} files")
    try:
        d = Path(directory) if directory else collection_dir(collection)
        d.mkdir(parents=True, exist_ok=True)
        with _ingest_lock(d), Store(d) as store:
            rep = _ingest_locked(root, files, unsupported, store, d, embedder, collection, rebuild, params,
                                 progress, memory_budget, batch_size, t0, embedder_path)
    except OSError as e:  # a full disk, a read-only home: one line; nothing half-written is served
        raise storage_error(e, f"cannot write collection '{collection}'") from None
    except sqlite3.OperationalError as e:
        if not _is_storage_failure(e):
            raise
        raise StorageError(f"cannot write collection '{collection}' ({e})",
                           fix="free some space, or make EDGE_RAG_HOME writable, and run it again; "
                               "the collection keeps serving its previous generation") from None
    rep.skipped[:0] = [(_display_path(p, root), why) for p, why in found.refused]
    return rep


def _ingest_locked(root, files, unsupported, store: Store, d: Path, embedder: EmbedderLike, collection: str,
                   rebuild: bool, params: ChunkParams, progress: bool, memory_budget, batch_size: int,
                   t0: float, embedder_path: str | None = None) -> IngestReport:
    old_emb = store.get_meta("embedder_id")
    if old_emb is not None and old_emb != embedder.embedder_id and store.count_chunks() and not rebuild:
        raise IndexError_(
            f"collection '{collection}' was built with embedder {old_emb}, not {embedder.embedder_id}",
            fix=f"re-ingest with --rebuild, or use another collection (--collection NAME)")
    old_params = stored_chunk_params(store.get_meta("chunk_params"))
    if old_params is not None and old_params != asdict(params) and not rebuild:
        log.warning("chunk parameters changed (%s -> %s): only changed files are re-chunked; use --rebuild",
                    old_params, asdict(params))
    gen0 = store.generation
    if memory_budget is None:  # the detected device's share (edge.plan.INDEX_MEMORY_SHARE)
        from edge.plan import index_budget_bytes

        memory_budget = index_budget_bytes()
    # Make sure the index we update in place matches the store (repairs a crash of a previous run).
    base: VectorIndex | None = None
    if store.count_chunks() and not rebuild:
        base = open_index(store, d, repair=True, budget_bytes=memory_budget)

    report = IngestReport(collection=collection, generation=gen0, unsupported=unsupported)
    known = store.documents()
    under_root = {p: row for p, row in known.items() if rebuild or _is_under(Path(p), root)}
    seen: set[str] = set()
    todo: list[tuple[Path, str, os.stat_result, str]] = []  # (path, sha, stat, display)
    for p in files:
        key = p.as_posix()
        try:
            st = p.stat()
            sha = file_sha256(p)
        except OSError as e:
            report.skipped.append((_display_path(p, root), f"unreadable ({e.strerror or e})"))
            continue
        row = known.get(key)
        if row is not None and row.sha256 == sha and not rebuild:
            seen.add(key)
            report.unchanged += 1
            continue
        todo.append((p, sha, st, _display_path(p, root)))

    chunker = Chunker(embedder.count_tokens, params, getattr(embedder, "count_tokens_many", None))
    loaded: list[tuple[Path, str, os.stat_result, str, str, list]] = []
    for p, sha, st, disp in todo:
        try:
            doc = load(p)
            chunks = chunker.chunk(doc)
        except LoadError as e:
            log.warning("skipped %s", e)
            report.skipped.append((disp, str(e).split(": ", 1)[-1]))
            continue
        if not chunks:
            report.skipped.append((disp, "no text"))
            continue
        loaded.append((p, sha, st, disp, doc.unit, chunks))
        seen.add(p.as_posix())

    # 1. embed (the slow part; nothing is written before it ends)
    texts = [c.embed_text(_title(p), overlap=params.embed_overlap) for p, *_, chunks in loaded for c in chunks]
    te = time.perf_counter()
    vecs = _embed_all(embedder, texts, batch_size, progress, params.embed_tokens)
    report.embed_seconds = time.perf_counter() - te

    # nothing changed: keep the generation (and the files) as they are
    gone = [k for k in under_root if k not in seen]
    if not loaded and not gone and base is not None:
        report.total_chunks = store.count_chunks()
        report.total_documents = len(known)
        report.index_kind = base.kind
        report.seconds = time.perf_counter() - t0
        return report

    # 2. one transaction for the store
    removed_ids: list[int] = []
    added_ids: list[int] = []
    gen = gen0 + 1
    with store.transaction():
        for key, row in under_root.items():
            replaced = any(key == p.as_posix() for p, *_ in loaded)
            if key in seen and not replaced:
                continue
            removed_ids += store.delete_document(row.id)
            if not replaced:
                report.removed.append(row.relpath)
        off = 0
        for p, sha, st, disp, unit, chunks in loaded:
            rows = [NewChunk(c.ordinal, c.text, c.heading, c.loc_start, c.loc_end, c.char_start, c.char_end,
                             c.n_tokens, vecs[off + i]) for i, c in enumerate(chunks)]
            off += len(chunks)
            added_ids += store.add_document(p.as_posix(), disp, sha, st.st_mtime, st.st_size, unit, rows)
            (report.updated if p.as_posix() in known and not rebuild else report.added).append(disp)
        store.set_meta({"generation": gen, "embedder_id": embedder.embedder_id, "dim": int(embedder.dim),
                        "chunk_params": asdict(params), "updated": time.time(),
                        **({"embedder_path": embedder_path} if embedder_path else {})})
        _crash_if("before_commit")
    _crash_if("after_commit")
    report.generation = gen
    report.chunks_added = len(added_ids)
    report.chunks_removed = len(removed_ids)

    # 3. the index: update in place when the kind still fits, else rebuild from the store
    n = store.count_chunks()
    plan = choose_index(n, int(embedder.dim), memory_budget)
    if base is not None and base.kind == plan.kind and base.supports_remove:
        base.remove(removed_ids)
        base.add(np.array(added_ids, np.int64), vecs)
        base.generation = gen
        vi = base
    else:
        vi = rebuild_from(store.iter_vectors, n, int(embedder.dim), embedder.embedder_id, gen, memory_budget)
    try:
        vi.save(d)
    except StorageError as e:
        base = str(e)[: -len(f" ({e.fix})")] if e.fix else str(e)
        raise StorageError(f"{base} after the documents were stored (generation {gen})",
                           fix="free some space and ingest again; until then searches rebuild the index from the store") from None
    report.index_kind = vi.kind
    report.total_chunks = n
    report.total_documents = len(store.documents())
    report.seconds = time.perf_counter() - t0
    return report


def _is_storage_failure(e: Exception) -> bool:
    msg = str(e).lower()
    return any(w in msg for w in ("disk is full", "disk i/o error", "readonly", "read-only", "unable to open database"))


def _title(p: Path) -> str:
    """A file's name as words ('error_codes.md' -> 'error codes'): context for short chunks."""
    return p.stem.replace("_", " ").replace("-", " ")


def _is_under(p: Path, root: Path) -> bool:
    if root.is_file():
        return p == root
    try:
        p.relative_to(root)
        return True
    except ValueError:
        return False


# NOTE: embed() is called with EMBED_GROUP batches at a time, not one: on CPU it runs its calls on
# `threads` streams at once (edge.runtime.embedder STREAMS_NOTE) and returns when the last one ends,
# so a stream idles at the end of every embed() while the other finishes its last call (~2 texts):
# up to one call in 16 with one batch of 32 per embed() (an estimate, not measured on its own; the
# docs/measurements.md's session-6 A/B measures it together with the flash-attention graph).
EMBED_GROUP = 16


def _embed_all(embedder: EmbedderLike, texts: list[str], batch_size: int, progress: bool,
               max_tokens: int | None = None) -> np.ndarray:
    """float32 [n, dim], with a progress bar. Sorted by length so that batches pad little; a text
    that occurs several times is embedded once (its copies get the same vector). `max_tokens`:
    the embedder reads at most that many tokens of a text (ChunkParams.embed_tokens)."""
    dim = int(embedder.dim)
    out = np.zeros((len(texts), dim), np.float32)
    if not texts:
        return out
    delay = float(os.environ.get(_ENV_EMBED_DELAY, "0") or 0)
    # NOTE: repeated chunks are common in real corpora (man pages' shared AUTHORS / SEE ALSO
    # sections, pydoc's inherited-method lists): 3.6% of the scale corpus's chunks (bench/
    # scale_corpus.py, every 10th document). Embedding is deterministic per text, so this is exact.
    first: dict[str, int] = {}
    copy_of = np.array([first.setdefault(t, i) for i, t in enumerate(texts)], np.int64)
    unique = np.flatnonzero(copy_of == np.arange(len(texts)))
    order = sorted(unique.tolist(), key=lambda i: len(texts[i]))
    done = 0
    with _progress(progress) as bar:
        task = bar.add_task("embedding", total=len(order))
        for s in range(0, len(order), batch_size * EMBED_GROUP):
            idx = order[s:s + batch_size * EMBED_GROUP]
            cap = {"max_tokens": max_tokens} if max_tokens is not None else {}
            v = np.asarray(embedder.embed([texts[i] for i in idx], batch_size=batch_size, **cap), dtype=np.float32)
            out[idx] = v
            done += len(idx)
            bar.update(task, advance=len(idx))
            if delay:
                sys.stderr.write(f"TEST-EMBEDDED {done}/{len(order)}\n")
                sys.stderr.flush()
                time.sleep(delay)
    if len(unique) < len(texts):
        out[:] = out[copy_of]
    return out


def check_collection(directory: Path) -> list[str]:
    """Consistency problems of a collection without repairing anything (empty = consistent)."""
    directory = Path(directory)
    with Store(directory, readonly=True) as store:
        problems = store.check()
        path = directory / INDEX_NAME
        if store.count_chunks() == 0 and not path.exists():
            return problems
        try:
            vi = VectorIndex.load(path)
        except (IndexError_, OSError) as e:
            return problems + [str(e)]
        if vi.generation != store.generation:
            problems.append(f"index generation {vi.generation} != store generation {store.generation}")
        if vi.ntotal != store.count_chunks():
            problems.append(f"index holds {vi.ntotal} vectors, store {store.count_chunks()} chunks")
        if vi.kind in ("flat", "hnsw"):
            ids = np.sort(_idmap_ids(vi))
            if not np.array_equal(ids, store.chunk_ids()):
                problems.append("index ids differ from the store's chunk ids")
    return problems


def _idmap_ids(vi: VectorIndex) -> np.ndarray:
    import faiss

    return faiss.vector_to_array(vi.index.id_map).astype(np.int64)
