"""Ingest: incremental updates, bad input, embedder mismatch, and crash safety (SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_rag_fakes import HashEmbedder  # noqa: E402
from test_rag_loaders import make_pdf  # noqa: E402

from edge.errors import IndexError_, UsageError  # noqa: E402
from edge.paths import index_dir  # noqa: E402
from rag.ingest import check_collection, ingest  # noqa: E402
from rag.retrieve import Retriever  # noqa: E402
from rag.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def corpus(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "pump.md").write_text("# Pump\n\n## E-100\n\nError E-100: the pump inlet is blocked. Clean the strainer.\n")
    (d / "fan.txt").write_text("Fan guide\n\nThe cooling fan spins at 3000 rpm. A rattling fan needs new bearings.\n")
    (d / "dock.rst").write_text("Dock\n====\n\nThe charging dock needs a 16 A circuit and a flat floor.\n")
    return d


def texts(collection: str = "default") -> set[str]:
    with Store(index_dir(collection), readonly=True) as s:
        return {r[0] for r in s.db.execute("SELECT text FROM chunks")}


def test_incremental_ingest_only_embeds_changes(tmp_path):
    emb = HashEmbedder()
    docs = corpus(tmp_path / "docs")
    r1 = ingest(docs, embedder=emb, progress=False)
    assert sorted(r1.added) == ["docs/dock.rst", "docs/fan.txt", "docs/pump.md"] and r1.generation == 1
    assert r1.total_chunks == r1.chunks_added >= 3
    r2 = ingest(docs, embedder=emb, progress=False)
    assert (r2.unchanged, r2.chunks_added, r2.generation) == (3, 0, 1)
    # change one, delete one, add one
    (docs / "fan.txt").write_text("Fan guide\n\nThe fan was replaced by a blower model B-7.\n")
    (docs / "dock.rst").unlink()
    (docs / "new.md").write_text("# New\n\nThe lift raises 600 kg.\n")
    r3 = ingest(docs, embedder=emb, progress=False)
    assert r3.updated == ["docs/fan.txt"] and r3.removed == ["docs/dock.rst"] and r3.added == ["docs/new.md"]
    assert r3.unchanged == 1 and r3.generation == 2
    t = texts()
    assert any("blower" in x for x in t) and not any("rattling" in x or "16 A" in x for x in t)
    assert check_collection(index_dir()) == []
    with Retriever(emb) as r:
        hits = r.search("blower B-7", k=2).hits
        assert "blower" in hits[0].chunk.text and hits[0].chunk.path == "docs/fan.txt"
        assert all("16 A" not in h.chunk.text for h in r.search("charging dock circuit", k=5).hits)


class RecordingEmbedder(HashEmbedder):
    """The hash embedder, keeping every text it was asked to embed (in `seen`)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def embed(self, texts, batch_size: int = 32, progress: bool = False, **kw):
        self.seen += list(texts)
        self.kw = kw
        return super().embed(texts, batch_size, progress, **kw)


def test_repeated_chunks_are_embedded_once_and_share_the_vector(tmp_path):
    emb = RecordingEmbedder()
    docs = tmp_path / "docs"
    for sub in ("a", "b"):  # same file name, same text: the same embedded text (title + chunk)
        (docs / sub).mkdir(parents=True)
        (docs / sub / "notes.md").write_text("# Notes\n\nThe valve V-9 opens at 4 bar.\n")
    (docs / "other.md").write_text("# Other\n\nThe belt tension is 80 N.\n")
    rep = ingest(docs, embedder=emb, progress=False)
    assert rep.chunks_added == 3 and len(emb.seen) == 2 == len(set(emb.seen))
    with Store(index_dir("default"), readonly=True) as s:
        rows = s.db.execute("SELECT c.text, c.vec FROM chunks c ORDER BY c.id").fetchall()
    vecs = {}
    for text, blob in rows:
        vecs.setdefault(text, []).append(np.frombuffer(blob, np.float32))
    (a, b), (c,) = vecs["The valve V-9 opens at 4 bar."], vecs["The belt tension is 80 N."]
    np.testing.assert_array_equal(a, b)
    valve = next(t for t in emb.seen if "valve" in t)
    np.testing.assert_allclose(a, HashEmbedder().embed([valve])[0], rtol=1e-6)
    assert not np.allclose(a, c)


def test_a_chunk_is_embedded_with_its_overlap_unless_told_not_to(tmp_path):
    from rag.chunk import ChunkParams

    assert ChunkParams().embed_overlap is False  # own-span vectors: 13% fewer tokens embedded (docs/measurements.md #15, session 17)

    docs = tmp_path / "docs"
    docs.mkdir()
    paras = [" ".join(f"s{k}w{i}" for i in range(30)) + "." for k in range(6)]
    (docs / "long.txt").write_text("\n\n".join(paras) + "\n")
    seen = {}
    for carried in (False, True):
        emb = RecordingEmbedder()
        ingest(docs, embedder=emb, progress=False, directory=tmp_path / f"col-{carried}",
               params=ChunkParams(max_tokens=100, overlap=40, embed_overlap=carried))
        seen[carried] = emb.seen
        with Store(tmp_path / f"col-{carried}", readonly=True) as s:  # stored text keeps the overlap either way
            stored = [r[0] for r in s.db.execute("SELECT text FROM chunks ORDER BY id")]
        assert sum(p in t for t in stored for p in paras) > len(paras)
    count = lambda texts, p: sum(p in t for t in texts)
    assert [count(seen[False], p) for p in paras] == [1] * len(paras)  # each paragraph embedded once
    assert sum(count(seen[True], p) for p in paras) > len(paras)
    assert len(seen[False]) == len(seen[True])  # the same chunks, shorter texts


def test_embed_tokens_is_passed_to_the_embedder_and_recorded(tmp_path, caplog):
    """ChunkParams.embed_tokens caps what the embedder reads of each chunk (embed(..., max_tokens=N));
    unset, embed() gets no such argument (embedders without it keep working); the collection records it."""
    from rag.chunk import ChunkParams

    assert ChunkParams().embed_tokens is None  # whole chunks until the answer sets are re-asked with the cap (chunk.py note)
    docs = corpus(tmp_path / "docs")
    for cap in (None, 64):
        emb = RecordingEmbedder()
        ingest(docs, embedder=emb, progress=False, directory=tmp_path / f"col-{cap}", params=ChunkParams(embed_tokens=cap))
        assert emb.kw == ({} if cap is None else {"max_tokens": 64})
        with Store(tmp_path / f"col-{cap}", readonly=True) as s:
            assert s.get_meta("chunk_params")["embed_tokens"] == cap
    with pytest.raises(UsageError, match="embed_tokens"):
        ChunkParams(embed_tokens=4)
    with pytest.raises(UsageError, match="embed_tokens"):
        ChunkParams(embed_tokens=True)
    (docs / "new.md").write_text("# New\n\nThe lift raises 600 kg.\n")
    ingest(docs, embedder=RecordingEmbedder(), progress=False, directory=tmp_path / "col-64",
           params=ChunkParams(embed_tokens=64))
    assert "chunk parameters changed" not in caplog.text
    (docs / "new.md").write_text("# New\n\nThe lift raises 700 kg.\n")
    ingest(docs, embedder=RecordingEmbedder(), progress=False, directory=tmp_path / "col-64")
    assert "chunk parameters changed" in caplog.text


def test_a_collection_from_before_embed_overlap_and_embed_tokens_is_warned_only_when_its_vectors_differ(tmp_path, caplog):
    """Written before those fields: the overlap was embedded and nothing was capped. Ingesting into it
    with those settings is quiet; with other vectors (own spans, a cap) it says to --rebuild."""
    from rag.chunk import ChunkParams

    as_before = ChunkParams(embed_overlap=True, embed_tokens=None)
    docs = corpus(tmp_path / "docs")
    ingest(docs, embedder=HashEmbedder(), progress=False, params=as_before)
    with Store(index_dir(), readonly=False) as s, s.transaction():
        s.set_meta({"chunk_params": {"max_tokens": 200, "overlap": 40}})  # as written before
    (docs / "new.md").write_text("# New\n\nThe lift raises 600 kg.\n")
    ingest(docs, embedder=HashEmbedder(), progress=False, params=as_before)
    assert "chunk parameters changed" not in caplog.text
    (docs / "new.md").write_text("# New\n\nThe lift raises 700 kg.\n")
    ingest(docs, embedder=HashEmbedder(), progress=False, params=ChunkParams(embed_overlap=False, embed_tokens=None))
    assert "chunk parameters changed" in caplog.text
    caplog.clear()
    (docs / "new.md").write_text("# New\n\nThe lift raises 800 kg.\n")
    ingest(docs, embedder=HashEmbedder(), progress=False, params=ChunkParams(embed_overlap=True, embed_tokens=128))
    assert "chunk parameters changed" in caplog.text and "use --rebuild" in caplog.text


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no documents"):
        ingest(tmp_path / "empty", embedder=HashEmbedder(), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.bin").write_bytes(b"\x00")
    with pytest.raises(UsageError, match="1 files of other types"):
        ingest(tmp_path / "other", embedder=HashEmbedder(), progress=False)
    with pytest.raises(UsageError, match="no such"):
        ingest(tmp_path / "missing", embedder=HashEmbedder(), progress=False)


def test_bad_files_are_skipped_and_counted(tmp_path):
    docs = corpus(tmp_path / "docs")
    (docs / "binary.txt").write_bytes(b"\x7fELF\x00\x00\x01")
    (docs / "latin1.md").write_bytes("Caf\xe9 manual".encode("latin-1"))
    (docs / "corrupt.pdf").write_bytes(b"%PDF-1.7\nthis is not really a pdf\n")
    (docs / "empty.txt").write_text("   \n\n")
    make_pdf(docs / "good.pdf", ["The quick start says: press the green button."])
    import pypdf

    w = pypdf.PdfWriter(clone_from=str(docs / "good.pdf"))
    w.encrypt(user_password="pw", owner_password="owner")
    with open(docs / "locked.pdf", "wb") as f:
        w.write(f)
    (docs / "notes.docx").write_bytes(b"PK\x03\x04")
    rep = ingest(docs, embedder=HashEmbedder(), progress=False)
    skipped = dict(rep.skipped)
    assert set(skipped) == {"docs/binary.txt", "docs/latin1.md", "docs/corrupt.pdf", "docs/empty.txt", "docs/locked.pdf"}
    assert "binary" in skipped["docs/binary.txt"] and "UTF-8" in skipped["docs/latin1.md"]
    assert "encrypted" in skipped["docs/locked.pdf"] and "PDF" in skipped["docs/corrupt.pdf"]
    assert rep.unsupported == 1
    assert "docs/good.pdf" in rep.added and len(rep.added) == 4
    with Retriever(HashEmbedder()) as r:
        h = r.search("green button", k=1, mode="keyword").hits[0]
        assert h.chunk.path == "docs/good.pdf" and h.chunk.location() == "page 1"


def test_other_embedder_is_refused_with_the_fix(tmp_path):
    docs = corpus(tmp_path / "docs")
    ingest(docs, embedder=HashEmbedder(64, "a"), progress=False)
    with pytest.raises(IndexError_, match="--rebuild"):
        ingest(docs, embedder=HashEmbedder(32, "b"), progress=False)
    with pytest.raises(IndexError_, match="built with embedder a-bow-64"):
        Retriever(HashEmbedder(32, "b"))
    # the fixes work: a new collection, or --rebuild
    assert ingest(docs, embedder=HashEmbedder(32, "b"), collection="b", progress=False).total_chunks > 0
    rep = ingest(docs, embedder=HashEmbedder(32, "b"), rebuild=True, progress=False)
    assert rep.generation == 2 and len(rep.added) == 3
    with Retriever(HashEmbedder(32, "b")) as r:
        assert r.index.dim == 32 and r.search("strainer", k=1).hits


def test_index_mismatch_is_repaired_or_refused(tmp_path):
    emb = HashEmbedder()
    ingest(corpus(tmp_path / "docs"), embedder=emb, progress=False)
    d = index_dir()
    q = "pump inlet blocked strainer"
    with Retriever(emb) as r:
        before = [(h.chunk.id, round(h.score, 5)) for h in r.search(q, k=3, mode="vector").hits]
    (d / "vectors.faiss").unlink()
    with Store(d, readonly=True) as s:
        from rag.index import open_index

        with pytest.raises(IndexError_, match="disagree"):
            open_index(s, d, repair=False)
    with Retriever(emb) as r:  # repairs from the stored vectors
        assert [(h.chunk.id, round(h.score, 5)) for h in r.search(q, k=3, mode="vector").hits] == before
    assert check_collection(d) == []


_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_rag_fakes import HashEmbedder
    from rag.ingest import ingest
    ingest({docs!r}, embedder=HashEmbedder(), progress=False, batch_size=1)
    print("DONE", flush=True)
""")


def _spawn(docs: Path, env_extra: dict) -> subprocess.Popen:
    code = _SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), docs=str(docs))
    env = {**os.environ, **env_extra}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _search_paths(q: str) -> list[str]:
    with Retriever(HashEmbedder()) as r:
        return [h.chunk.text for h in r.search(q, k=5, mode="keyword").hits]


def test_sigkill_midway_keeps_store_and_index_consistent(tmp_path):
    docs = corpus(tmp_path / "docs")
    ingest(docs, embedder=HashEmbedder(), progress=False)
    d = index_dir()
    gen0 = Store(d, readonly=True).generation
    # a big change: many new files, one removed
    for i in range(30):
        (docs / f"extra{i}.md").write_text(f"# Extra {i}\n\nZebra crossing rule number {i}.\n")
    (docs / "fan.txt").unlink()

    # 1. killed while embedding (nothing written yet)
    p = _spawn(docs, {"EDGE_RAG_TEST_EMBED_DELAY": "0.2"})
    for line in p.stderr:  # the first group of batches embedded, not the last
        if line.startswith("TEST-EMBEDDED "):
            done, total = map(int, line.split()[1].split("/"))
            assert done < total
            break
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    assert p.returncode == -signal.SIGKILL
    assert check_collection(d) == []
    assert Store(d, readonly=True).generation == gen0
    assert _search_paths("zebra") == [] and _search_paths("rattling fan")  # previous generation served

    # 2. killed inside the store transaction, before COMMIT: rolled back
    p = _spawn(docs, {"EDGE_RAG_TEST_CRASH_AT": "before_commit"})
    p.wait(60)
    assert p.returncode == -signal.SIGKILL
    assert check_collection(d) == [] and Store(d, readonly=True).generation == gen0
    assert _search_paths("zebra") == []

    # 3. killed after COMMIT, before the index file was replaced: detected, never served stale
    p = _spawn(docs, {"EDGE_RAG_TEST_CRASH_AT": "after_commit"})
    p.wait(60)
    assert p.returncode == -signal.SIGKILL
    problems = check_collection(d)
    assert any("generation" in x for x in problems), problems
    with Retriever(HashEmbedder()) as r:  # repairs the index from the committed vectors
        hit = r.search("zebra crossing rule number 7", k=1, mode="vector").hits[0]
        assert "number 7." in hit.chunk.text
    assert check_collection(d) == []

    # 4. the next ingest completes
    (docs / "late.md").write_text("# Late\n\nA late addition about the horn.\n")
    p = _spawn(docs, {})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "DONE" in out, err
    assert check_collection(d) == []
    assert _search_paths("horn") and not _search_paths("rattling")
    assert Store(d, readonly=True).count_chunks() == len(texts())
