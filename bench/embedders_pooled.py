"""Would a larger embedder retrieve better at scale? Vector-only recall@5 / MRR of sentence-transformers folders
against edge-rag's default int8 MiniLM on the scale corpus, by pooling (issue #15: "consider the embedders a user can
install here").

    python bench/embedders_pooled.py --corpus /tmp/scale-corpus --model DIR [--model DIR ...] [--pool 50]

Every chunk of the corpus (the default chunking, own spans) is embedded with edge-rag's default embedder; a question's
pool is its top `--pool` chunks there, plus every chunk of its documents where that embedder misses them in its top 5.
The union of the pools is embedded with each `--model` (fp32, torch, 2 threads) and every question ranked over the
union. The default embedder's figures over the union equal its whole-corpus ones (its own top `--pool` are in it);
another model's are an estimate that favours it (its own confusers outside the union are absent). A model as large as
all-mpnet-base-v2 takes hours for the whole corpus on 2 cores, which is why the pool.
One JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, type=Path, help="bench/scale_corpus.py's output")
    ap.add_argument("--questions", type=Path, default=ROOT / "bench" / "scale_questions.jsonl")
    ap.add_argument("--model", action="append", default=[], help="a sentence-transformers folder (repeat)")
    ap.add_argument("--pool", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from edge.engines import default_embedder_bundle
    from edge.runtime.embedder import Embedder
    from rag.chunk import ChunkParams, Chunker
    from rag.ingest import _title
    from rag.loaders import load

    qs = [json.loads(line) for line in a.questions.read_text().splitlines() if line.strip()]
    docs = sorted(str(p.relative_to(a.corpus)) for p in a.corpus.rglob("*.txt"))
    emb = Embedder.from_bundle(default_embedder_bundle(progress=False), threads=a.threads)
    chunker = Chunker(emb.count_tokens, ChunkParams(), getattr(emb, "count_tokens_many", None))
    texts, owner = [], []
    for d in docs:
        p = a.corpus / d
        for c in chunker.chunk(load(p)):
            texts.append(c.embed_text(_title(p), overlap=False))
            owner.append(d)
    owner = np.array(owner)
    t = time.perf_counter()
    V = np.asarray(emb.embed(texts), np.float32)
    print(json.dumps({"figure": "corpus", "documents": len(docs), "chunks": len(texts),
                      "default_embedder_seconds": round(time.perf_counter() - t, 1)}), flush=True)
    Q = np.asarray(emb.embed([q["q"] for q in qs]), np.float32)

    def ranks(vecs: np.ndarray, qv: np.ndarray, ids: np.ndarray) -> list[int | None]:
        out = []
        for i, q in enumerate(qs):
            top = ids[np.argsort(-(vecs @ qv[i]))[:5]]
            out.append(next((k + 1 for k, j in enumerate(top) if owner[j] in q["docs"]), None))
        return out

    def report(name: str, rs: list[int | None], **extra) -> None:
        hit = [r is not None for r in rs]
        rr = [1.0 / r if r else 0.0 for r in rs]
        by = {s: [i for i, q in enumerate(qs) if q["split"] == s] for s in ("tune", "heldout")}
        print(json.dumps({"figure": "retrieval", "embedder": name, "recall@5": round(float(np.mean(hit)), 3),
                          "mrr": round(float(np.mean(rr)), 3),
                          **{s: {"recall@5": round(float(np.mean([hit[i] for i in ix])), 3),
                                 "mrr": round(float(np.mean([rr[i] for i in ix])), 3)} for s, ix in by.items()},
                          "missed": [qs[i]["q"] for i, r in enumerate(rs) if r is None], **extra}), flush=True)

    whole = ranks(V, Q, np.arange(len(texts)))
    report("edge-rag default (int8 MiniLM), whole corpus", whole)
    pool: set[int] = set()
    for i, q in enumerate(qs):
        pool.update(np.argsort(-(V @ Q[i]))[: a.pool].tolist())
        if whole[i] is None:
            pool.update(np.flatnonzero(np.isin(owner, q["docs"])).tolist())
    ids = np.array(sorted(pool))
    report("edge-rag default (int8 MiniLM), pool", ranks(V[ids], Q, ids), pool_chunks=len(ids))
    if not a.model:
        return
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(a.threads)
    sub = [texts[j] for j in ids]
    for folder in a.model:
        st = SentenceTransformer(str(folder), device="cpu")
        t = time.perf_counter()
        W = st.encode(sub, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        dt = time.perf_counter() - t
        QW = st.encode([q["q"] for q in qs], normalize_embeddings=True, convert_to_numpy=True)
        report(f"{Path(folder).name} fp32 (sentence-transformers), pool", ranks(W, QW, ids), pool_chunks=len(ids),
               embed_seconds=round(dt, 1), texts_per_s=round(len(sub) / dt, 2))


if __name__ == "__main__":
    main()
