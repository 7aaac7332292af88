"""Store: one SQLite file (WAL) per collection, the source of truth for everything but the ANN
structure.

    meta(key, value)                 embedder_id, dim, generation, chunk params, created
    documents(id, path, sha256, mtime, size, unit, n_chunks)
    chunks(id, doc_id, ordinal, text, heading, loc_start, loc_end, char_start, char_end,
           n_tokens, vec)            vec = float32[dim] bytes (the index is rebuilt from these)
    chunks_fts(text, heading, source) FTS5, rowid = chunks.id, porter stemming

Chunk ids come from AUTOINCREMENT and are never reused, so a FAISS id always means one chunk
text. Every ingest is one transaction that also bumps `generation`; the FAISS file carries the
generation it was built from, and a reader that finds them different repairs the index from the
stored vectors (or refuses when it cannot write).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from edge.errors import IndexError_

SCHEMA_VERSION = 1
DB_NAME = "store.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    relpath TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    mtime REAL NOT NULL,
    size INTEGER NOT NULL,
    unit TEXT NOT NULL,
    n_chunks INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    heading TEXT NOT NULL,
    loc_start INTEGER NOT NULL,
    loc_end INTEGER NOT NULL,
    char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    vec BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, heading, source, tokenize='porter unicode61');
"""


@dataclass
class DocRow:
    id: int
    path: str
    relpath: str
    sha256: str
    mtime: float
    size: int
    unit: str
    n_chunks: int


@dataclass
class ChunkRow:
    """A stored chunk with its source. `path` is what users see (relative to the ingested
    folder's parent); `unit` is "line" or "page"."""

    id: int
    doc_id: int
    path: str
    unit: str
    ordinal: int
    text: str
    heading: str
    loc_start: int
    loc_end: int
    char_start: int
    char_end: int
    n_tokens: int

    def location(self) -> str:
        """'lines 3-9' / 'page 4' / 'pages 4-5'."""
        a, b = self.loc_start, self.loc_end
        word = "page" if self.unit == "page" else "line"
        return f"{word} {a}" if a == b else f"{word}s {a}-{b}"

    def citation(self) -> str:
        return f"{self.path}, {self.location()}"


@dataclass
class NewChunk:
    """A chunk to insert (from rag.chunk.Chunk plus its vector)."""

    ordinal: int
    text: str
    heading: str
    loc_start: int
    loc_end: int
    char_start: int
    char_end: int
    n_tokens: int
    vec: np.ndarray  # float32 [dim]


class Closing:
    """`with obj:` closes obj on exit; subclasses define close()."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Store(Closing):
    """The SQLite side of a collection. Use as a context manager or call close()."""

    def __init__(self, directory: Path, *, readonly: bool = False):
        self.dir = Path(directory)
        self.path = self.dir / DB_NAME
        self.readonly = readonly
        if readonly:
            if not self.path.exists():
                raise IndexError_(f"{self.dir}: no document store", fix="run `edge-rag ingest PATH` first")
            # mode=ro still reads the WAL; a crashed writer's uncommitted frames are ignored.
            # Any thread may read, one at a time (the HTTP server serializes requests with a lock
            # and runs them on worker threads); writers stay on the thread that opened them.
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        self.db.execute("PRAGMA foreign_keys=ON")
        try:
            v = self.get_meta("schema_version")
        except sqlite3.DatabaseError as e:
            raise IndexError_(f"{self.path}: not a readable edge-rag store ({e})",
                              fix="delete the collection folder or use --rebuild") from None
        if v is None and not readonly:
            self._set_meta_now({"schema_version": SCHEMA_VERSION, "generation": 0, "created": time.time()})
        elif v is not None and int(v) != SCHEMA_VERSION:
            raise IndexError_(f"{self.path}: store schema {v}, this edge-rag reads {SCHEMA_VERSION}",
                              fix="re-ingest with --rebuild")

    # -- meta
    def get_meta(self, key: str):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def _set_meta_now(self, items: dict) -> None:
        with self.transaction():
            self.set_meta(items)

    def set_meta(self, items: dict) -> None:
        """Inside a transaction."""
        self.db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                            [(k, json.dumps(v)) for k, v in items.items()])

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    # -- transactions
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error). One ingest = one transaction."""
        return _Txn(self.db)

    # -- documents
    def documents(self) -> dict[str, DocRow]:
        rows = self.db.execute("SELECT id, path, relpath, sha256, mtime, size, unit, n_chunks FROM documents")
        return {r[1]: DocRow(*r) for r in rows}

    def delete_document(self, doc_id: int) -> list[int]:
        """Remove a document and its chunks (and their FTS rows). Returns the removed chunk ids."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id=?", (doc_id,))]
        self.db.executemany("DELETE FROM chunks_fts WHERE rowid=?", [(i,) for i in ids])
        self.db.execute("DELETE FROM chunks WHERE doc_id=?", (doc_id,))
        self.db.execute("DELETE FROM documents WHERE id=?", (doc_id,))
        return ids

    def add_document(self, path: str, relpath: str, sha256: str, mtime: float, size: int, unit: str,
                     chunks: list[NewChunk]) -> list[int]:
        """Insert a document and its chunks; returns the new chunk ids (in order)."""
        cur = self.db.execute(
            "INSERT INTO documents(path, relpath, sha256, mtime, size, unit, n_chunks) VALUES (?,?,?,?,?,?,?)",
            (path, relpath, sha256, mtime, size, unit, len(chunks)))
        doc_id = cur.lastrowid
        ids = []
        for c in chunks:
            cur = self.db.execute(
                "INSERT INTO chunks(doc_id, ordinal, text, heading, loc_start, loc_end, char_start, char_end,"
                " n_tokens, vec) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (doc_id, c.ordinal, c.text, c.heading, c.loc_start, c.loc_end, c.char_start, c.char_end,
                 c.n_tokens, np.ascontiguousarray(c.vec, dtype=np.float32).tobytes()))
            ids.append(cur.lastrowid)
            self.db.execute("INSERT INTO chunks_fts(rowid, text, heading, source) VALUES (?,?,?,?)",
                            (cur.lastrowid, c.text, c.heading, Path(path).stem.replace("_", " ").replace("-", " ")))
        return ids

    def touch_document(self, doc_id: int, mtime: float) -> None:
        self.db.execute("UPDATE documents SET mtime=? WHERE id=?", (mtime, doc_id))

    # -- chunks
    _CHUNK_SQL = ("SELECT c.id, c.doc_id, d.relpath, d.unit, c.ordinal, c.text, c.heading, c.loc_start, c.loc_end,"
                  " c.char_start, c.char_end, c.n_tokens FROM chunks c JOIN documents d ON d.id = c.doc_id")

    def get_chunks(self, ids: Iterable[int]) -> dict[int, ChunkRow]:
        ids = [int(i) for i in ids]
        out: dict[int, ChunkRow] = {}
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            q = f"{self._CHUNK_SQL} WHERE c.id IN ({','.join('?' * len(part))})"
            for r in self.db.execute(q, part):
                out[r[0]] = ChunkRow(*r)
        return out

    def count_chunks(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def chunk_ids(self) -> np.ndarray:
        return np.array([r[0] for r in self.db.execute("SELECT id FROM chunks ORDER BY id")], dtype=np.int64)

    def vectors(self, ids: Iterable[int] | None = None, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, dim]) for the given ids (or all, ordered by id)."""
        dim = dim or int(self.get_meta("dim"))
        if ids is None:
            rows = list(self.db.execute("SELECT id, vec FROM chunks ORDER BY id"))
        else:
            ids = [int(i) for i in ids]
            rows = []
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                rows += self.db.execute(f"SELECT id, vec FROM chunks WHERE id IN ({','.join('?' * len(part))})", part).fetchall()
        out_ids = np.array([r[0] for r in rows], dtype=np.int64)
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim) if rows \
            else np.zeros((0, dim), np.float32)
        return out_ids, vecs

    def iter_vectors(self, batch: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, vectors) in id order, `batch` rows at a time (bounded memory)."""
        dim = int(self.get_meta("dim"))
        last = -1
        while True:
            rows = self.db.execute("SELECT id, vec FROM chunks WHERE id > ? ORDER BY id LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield (np.array([r[0] for r in rows], dtype=np.int64),
                   np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim))

    # -- keyword search
    def keyword_search(self, match: str, k: int) -> list[tuple[int, float]]:
        """FTS5 BM25 over an already-escaped MATCH expression; [(chunk_id, score)], best first.
        FTS5's bm25() is lower-is-better; the score returned is its negation (higher is better)."""
        if not match:
            return []
        rows = self.db.execute(
            "SELECT rowid, bm25(chunks_fts, 1.0, 0.5, 0.5) AS s FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY s LIMIT ?",
            (match, k)).fetchall()
        return [(int(r), -float(s)) for r, s in rows]

    def check(self) -> list[str]:
        """Consistency problems of the SQLite side (empty list = consistent)."""
        problems = []
        ok = self.db.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            problems.append(f"sqlite integrity: {ok}")
        n_fts = self.db.execute("SELECT COUNT(*) FROM chunks_fts").fetchone()[0]
        n = self.count_chunks()
        if n_fts != n:
            problems.append(f"fts rows {n_fts} != chunks {n}")
        bad = self.db.execute(
            "SELECT COUNT(*) FROM documents d WHERE n_chunks != (SELECT COUNT(*) FROM chunks c WHERE c.doc_id = d.id)"
        ).fetchone()[0]
        if bad:
            problems.append(f"{bad} documents whose chunk count does not match")
        return problems

    def close(self) -> None:
        self.db.close()


class _Txn:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, et, ev, tb):
        if et is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
        return False
