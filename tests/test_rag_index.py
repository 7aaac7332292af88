"""FAISS index: choice by size and budget, approximate recall against the exact index, files."""

from __future__ import annotations

import numpy as np
import pytest

from rag.index import (FLAT_MAX, HNSW_EF_SEARCH, HNSW_M, INDEX_NAME, IndexPlan, VectorIndex, choose_index, estimate_bytes,
                       rebuild_from)


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Normalized vectors around random centres (embeddings of a corpus cluster by topic)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = c[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_choose_index_by_size_and_budget():
    dim = 384
    assert choose_index(1000, dim).kind == "flat"
    assert choose_index(FLAT_MAX + 1, dim).kind == "hnsw"
    n = 200_000
    hnsw = estimate_bytes("hnsw", n, dim)
    assert choose_index(n, dim, budget_bytes=hnsw + 1).kind == "hnsw"
    p = choose_index(n, dim, budget_bytes=hnsw // 4)
    assert p.kind == "ivfpq" and p.est_bytes < hnsw // 4
    # a small corpus stays flat even under a tight budget (PQ cannot be trained on it)
    assert choose_index(500, dim, budget_bytes=1).kind == "flat"


def _recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx_ids, exact_ids)]))


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_recall_against_exact(kind):
    dim, n, k = 64, 6000, 10
    x = clustered(n, dim)
    q = clustered(200, dim, seed=1)
    ids = np.arange(100, 100 + n, dtype=np.int64)  # ids are not row numbers
    exact = VectorIndex.build(IndexPlan("flat", 0), dim, "e", 1, [(ids, x)])
    _, E = exact.search(q, k)
    # brute force in numpy agrees with the flat index
    np.testing.assert_array_equal(ids[np.argsort(-(q @ x.T), axis=1)[:, :k]][:, 0], E[:, 0])
    if kind == "hnsw":
        plan = IndexPlan("hnsw", 0, {"M": HNSW_M, "efSearch": HNSW_EF_SEARCH})  # the shipped settings
        approx = VectorIndex.build(plan, dim, "e", 1, [(ids, x)])
        _, A = approx.search(q, k)
    else:
        plan = IndexPlan("ivfpq", 0, {"nlist": 64, "m": 16, "nprobe": 64 // 4})  # nprobe = nlist/4 as shipped
        approx = VectorIndex.build(plan, dim, "e", 1, [(ids, x)])
        lookup = {int(i): r for r, i in enumerate(ids)}

        def fetch(c):
            return c, x[[lookup[int(i)] for i in c]]

        _, A_raw = approx.search(q, k)  # PQ codes only
        _, A = approx.search(q, k, fetch=fetch)  # + exact re-rank of k*4 candidates
        assert _recall(A, E) >= _recall(A_raw, E)
    r = _recall(A, E)
    print(f"{kind} recall@{k} = {r:.3f}")
    assert r >= 0.95, f"{kind} recall@{k} {r:.3f} < 0.95"


def test_save_load_header_and_incremental(tmp_path):
    dim = 32
    x = clustered(300, dim)
    ids = np.arange(1, 301, dtype=np.int64)
    vi = VectorIndex.build(IndexPlan("flat", 0), dim, "emb-a", 7, [(ids, x)])
    assert vi.remove([1, 2, 3]) == 3
    vi.add(np.array([1000], np.int64), x[:1])
    vi.save(tmp_path)
    assert VectorIndex.read_header(tmp_path / INDEX_NAME)["generation"] == 7
    back = VectorIndex.load(tmp_path / INDEX_NAME)
    assert (back.kind, back.generation, back.embedder_id, back.ntotal) == ("flat", 7, "emb-a", 298)
    S, I = back.search(x[:1], 1)
    assert I[0, 0] == 1000 and S[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file was renamed into place


def test_rebuild_from_batches_uses_plan():
    dim, n = 16, 50
    x = clustered(n, dim)
    ids = np.arange(n, dtype=np.int64)
    vi = rebuild_from(lambda: iter([(ids[:25], x[:25]), (ids[25:], x[25:])]), n, dim, "e", 3)
    assert vi.kind == "flat" and vi.ntotal == n and vi.generation == 3


def test_ivfpq_collection_end_to_end(tmp_path, monkeypatch):
    """A collection whose budget forces IVF-PQ: the retriever re-ranks PQ candidates with the exact
    vectors read back from SQLite and agrees with brute force; incremental updates keep working."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_rag_fakes import HashEmbedder

    import rag.index as ri
    import rag.ingest as ing
    from edge.paths import index_dir
    from rag.ingest import check_collection, ingest
    from rag.retrieve import Retriever
    from rag.store import Store

    plan = IndexPlan("ivfpq", 0, {"nlist": 4, "m": 8, "nprobe": 4})
    monkeypatch.setattr(ri, "choose_index", lambda n, dim, budget=None: plan)
    monkeypatch.setattr(ing, "choose_index", lambda n, dim, budget=None: plan)
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    vocab = [f"term{i}" for i in range(400)]
    for f in range(30):
        paras = [" ".join(rng.choice(vocab, 12)) + "." for _ in range(12)]
        (docs / f"f{f}.txt").write_text("\n\n".join(paras) + "\n")
    emb = HashEmbedder(32)
    rep = ingest(docs, embedder=emb, progress=False, params=ing.ChunkParams(max_tokens=14, overlap=0))
    assert rep.index_kind == "ivfpq" and rep.total_chunks >= 300
    (docs / "f0.txt").unlink()
    rep = ingest(docs, embedder=emb, progress=False, params=ing.ChunkParams(max_tokens=14, overlap=0))
    assert rep.index_kind == "ivfpq" and rep.removed == ["docs/f0.txt"]
    assert check_collection(index_dir()) == []
    with Store(index_dir(), readonly=True) as s:
        ids, vecs = s.vectors()
    agree = 0
    with Retriever(emb) as r:
        assert r.index.kind == "ivfpq"
        for qi in range(20):
            q = " ".join(rng.choice(vocab, 6))
            got = [h.chunk.id for h in r.search(q, k=5, mode="vector").hits]
            want = ids[np.argsort(-(vecs @ emb.embed_query(q)))[:5]]
            agree += len(set(got) & set(want.tolist()))
    assert agree / 100 >= 0.95, agree


@pytest.mark.parametrize("profile,n,kind", [
    ("orin-nano-4gb", 10_000, "flat"), ("orin-nano-4gb", 28_000, "hnsw"), ("orin-nano-4gb", 100_000, "ivfpq"),
    ("orin-nano-8gb", 60_000, "hnsw"), ("agx-orin-64gb", 500_000, "hnsw"), ("agx-orin-64gb", 2_000_000, "ivfpq"),
])
def test_index_kind_follows_the_profile_memory_and_the_chunk_count(profile, n, kind):
    from edge.plan import INDEX_MEMORY_SHARE, index_budget_bytes
    from edge.profiles import load_profile

    budget = index_budget_bytes(profile)
    assert budget == int(load_profile(profile).usable_bytes * INDEX_MEMORY_SHARE)
    plan = choose_index(n, 384, budget)
    assert plan.kind == kind
    assert plan.est_bytes <= budget or kind == "ivfpq"
