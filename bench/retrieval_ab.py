"""Does an embedder backend retrieve what another retrieves? Same bundle, same chunks, two backends
(or one backend with two ChunkParams.embed_overlap settings: the same chunks, vectors of other spans).

For each answer-bench corpus (bench/bench_answers.py: manuals, pydoc, man) every file is ingested
twice, once with each backend's vectors, and every question of the corpus's sets (test, held-out,
uncovered included) is searched in both collections as `ask` searches (hybrid, k = 5). One JSON line
per set: questions whose top-5 chunk list is identical, whose top-1 is identical, whose relevance-gate
decision is the same, recall@5 and MRR of each backend (an expected source among the hits), the
lowest cosine between the two backends' stored vectors of one chunk; and one line per question whose
list differs.

    python bench/retrieval_ab.py [--a onnxruntime] [--b cpu] [--corpus manuals,pydoc,man]
    python bench/retrieval_ab.py --a cpu --b cpu --b-embed-overlap no
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_answers import CORPORA, HELDOUT, RENDERED, UNCOVERED  # noqa: E402


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="onnxruntime", help="embedder backend A (edge.runtime.embedder.BACKENDS)")
    ap.add_argument("--b", default="cpu", help="embedder backend B")
    ap.add_argument("--corpus", default="manuals,pydoc,man")
    ap.add_argument("--a-embed-overlap", choices=("yes", "no"), default=None, help="A's ChunkParams.embed_overlap "
                    "(default: the ingest's default)")
    ap.add_argument("--b-embed-overlap", choices=("yes", "no"), default=None, help="B's")
    ap.add_argument("-k", type=int, default=5)
    args = ap.parse_args()

    from edge.engines import default_embedder_bundle
    from edge.runtime.embedder import Embedder
    from rag.chunk import ChunkParams
    from rag.eval import EvalItem, load_questions, source_matches
    from rag.ingest import ingest
    from rag.retrieve import Retriever
    from rag.store import Store

    bundle = default_embedder_bundle(progress=False)
    def side(backend: str, overlap: str | None) -> str:
        return backend + ("" if overlap is None else f"/overlap-{overlap}")

    names = side(args.a, args.a_embed_overlap), side(args.b, args.b_embed_overlap)
    if names[0] == names[1]:
        sys.exit("A and B are the same: give another --b or --b-embed-overlap")
    embs = {names[0]: Embedder.from_bundle(bundle, backend=args.a), names[1]: Embedder.from_bundle(bundle, backend=args.b)}
    params = {n: ChunkParams() if o is None else ChunkParams(embed_overlap=o == "yes")
              for n, o in zip(names, (args.a_embed_overlap, args.b_embed_overlap))}
    tmp = Path(tempfile.mkdtemp(prefix="retrieval-ab-"))
    try:
        for corpus in args.corpus.split(","):
            docs = RENDERED[corpus]() if CORPORA[corpus][0] is None else CORPORA[corpus][0]
            dirs = {}
            for name, emb in embs.items():
                dirs[name] = tmp / f"{corpus}-{name.replace('/', '-')}"
                ingest(docs, embedder=emb, directory=dirs[name], progress=False, params=params[name])
            # the same chunks both ways (ids included): compare their stored vectors
            with Store(dirs[names[0]], readonly=True) as sa, Store(dirs[names[1]], readonly=True) as sb:
                (ia, va), (ib, vb) = sa.vectors(), sb.vectors()
            assert np.array_equal(ia, ib), "the two ingests made different chunks"
            min_cos = round(float((va * vb).sum(1).min()), 6)
            sets = [(f.name, load_questions(f)) for f in (CORPORA[corpus][1], HELDOUT[corpus]) if f is not None]
            sets.append(("uncovered", [EvalItem(q, [], []) for q in UNCOVERED[corpus]]))
            for qname, items in sets:
                hits, ranks, passed = {}, {}, {}
                for name, emb in embs.items():
                    with Retriever(emb, directory=dirs[name]) as r:
                        res = [r.search(it.question, k=args.k) for it in items]
                    hits[name] = [[h.chunk.id for h in x.hits] for x in res]
                    passed[name] = [bool(x.passed_on) for x in res]
                    ranks[name] = [next((i + 1 for i, h in enumerate(x.hits)
                                         if any(source_matches(h.chunk.path, e) for e in it.expected_sources)), None)
                                   for x, it in zip(res, items)]
                same = sum(a == b for a, b in zip(hits[names[0]], hits[names[1]]))
                same1 = sum(a[:1] == b[:1] for a, b in zip(hits[names[0]], hits[names[1]]))
                covered = [i for i, it in enumerate(items) if it.expected_sources]
                row = {"figure": "retrieval_ab", "corpus": corpus, "questions": qname, "n": len(items),
                       "same_top5": same, "same_top1": same1, "same_gate": sum(a == b for a, b in zip(*passed.values())),
                       "min_chunk_cosine": min_cos}
                for name in embs:
                    rk = [ranks[name][i] for i in covered]
                    row[f"recall@{args.k}_{name}"] = round(sum(r is not None for r in rk) / max(len(rk), 1), 4)
                    row[f"mrr_{name}"] = round(sum(1 / r for r in rk if r) / max(len(rk), 1), 4)
                    row[f"passed_gate_{name}"] = sum(passed[name])
                emit(**row)
                for i, (a, b) in enumerate(zip(hits[names[0]], hits[names[1]])):
                    if a != b:
                        emit(figure="retrieval_ab_differs", corpus=corpus, questions=qname, index=i, question=items[i].question,
                             rank_a=ranks[names[0]][i], rank_b=ranks[names[1]][i], top5_a=a, top5_b=b)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
