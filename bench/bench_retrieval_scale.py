"""Retrieval at scale: ingest rate and memory, then recall@5 / MRR / latency per mode and index kind.

    python bench/scale_corpus.py --out /tmp/scale-corpus          # 1,428 real documents (once)
    python bench/bench_retrieval_scale.py ingest --corpus /tmp/scale-corpus --dir /tmp/scale-col \
        [--part pydoc|man|all] [--shards N --shard I] [--tree OTHER_CHECKOUT] [--embedder BUNDLE]
        [--chunk-tokens N] [--overlap N] [--embed-overlap yes|no] [--embed-tokens N]
    python bench/bench_retrieval_scale.py search --dir /tmp/scale-col [--split tune|heldout|both] \
        [--indexes flat,hnsw,ivfpq] [--modes hybrid,vector,keyword]

`ingest` runs in a child process (its peak RSS is the ingest's own) with this checkout, or with
`--tree` another one (the peer: the same ingest before a change, on the same documents, in the same
run); without `--embedder`, each tree's own code builds the default embedder (first use; cached in
a home next to --dir, not timed), so a change of the embedder's format is part of the comparison; a part ingested into an existing collection adds to it (`--part pydoc`, then `--part man`
keeps each locked job short). `search` builds each index kind over the collection's stored vectors
(`rag.index.plan_for`) and asks every question of bench/scale_questions.jsonl: a question is
answered at rank r when the r-th hit comes from one of its documents; recall@5 counts r <= 5, MRR
averages 1/r over the top 5 (0 beyond). Latency: the whole `Retriever.search` (query embedding,
vector and keyword search, fusion, fetching the rows), each question 3 times, warm.
One JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = ROOT / "bench" / "scale_questions.jsonl"

_WORKER = r"""
import json, resource, sys, time
from pathlib import Path
from edge.runtime.embedder import Embedder
from rag.ingest import ingest
path, directory, bundle, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
chunking = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}  # ChunkParams fields; {}: the defaults
if not bundle:  # the default embedder as this tree's code builds it (cached in its EDGE_RAG_HOME)
    from edge.engines import default_embedder_bundle
    bundle = default_embedder_bundle(progress=False)
emb = Embedder.from_bundle(bundle, threads=threads)
q = emb.bundle.manifest.quant
t = time.perf_counter()
kw = {}
if chunking:
    from rag.chunk import ChunkParams
    kw["params"] = ChunkParams(**chunking)
rep = ingest(path, embedder=emb, directory=Path(directory), progress=False, **kw)
dt = time.perf_counter() - t
print(json.dumps({"documents": len(rep.added) + len(rep.updated), "chunks": rep.chunks_added,
                  "seconds": round(dt, 2), "embed_seconds": round(rep.embed_seconds, 2),
                  "total_documents": rep.total_documents, "total_chunks": rep.total_chunks,
                  "index_kind": rep.index_kind, "embedder": str(bundle), "embedder_quant": q.method or q.recipe,
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def emit(fig: str, **kw) -> None:
    print(json.dumps({"figure": fig, "machine": f"{platform.machine()} {os.cpu_count()} cores",
                      "load": round(os.getloadavg()[0], 2), **kw}, default=str), flush=True)


def default_bundle() -> Path:
    from edge.engines import default_embedder_bundle

    return default_embedder_bundle(progress=False)


def run_ingest(args) -> None:
    import hashlib

    tree = Path(args.tree).resolve() if args.tree else ROOT
    env = dict(os.environ, PYTHONPATH=str(tree))
    bundle = args.embedder or ""
    if not bundle:  # each tree builds its own default embedder (the format is part of what is compared)
        env["EDGE_RAG_HOME"] = str(Path(args.dir).resolve().parent / f".bench-home-{hashlib.sha1(str(tree).encode()).hexdigest()[:8]}")
    parts = ["pydoc", "man"] if args.part == "all" else [args.part]
    for part in parts:
        src = Path(args.corpus) / part
        if args.shards > 1:  # every shards-th file from shard on, staged in a folder of its own
            import shutil

            stage = Path(args.dir).parent / f".stage-{part}-{args.shard}-of-{args.shards}" / part
            shutil.rmtree(stage.parent, ignore_errors=True)
            stage.mkdir(parents=True)
            for f in sorted(src.iterdir())[args.shard::args.shards]:
                shutil.copy2(f, stage / f.name)
            src = stage
        chunking = {k: v for k, v in (("max_tokens", args.chunk_tokens), ("overlap", args.overlap),
                                      ("embed_overlap", args.embed_overlap)) if v is not None}
        if args.embed_tokens is not None:
            chunking["embed_tokens"] = args.embed_tokens or None  # 0: the embedder's whole limit
        r = subprocess.run([sys.executable, "-c", _WORKER, str(src), str(args.dir), str(bundle), str(args.threads),
                            json.dumps(chunking)],
                           capture_output=True, text=True, env=env, cwd=str(tree))
        if r.returncode != 0:
            sys.exit(f"ingest of {src} failed:\n{r.stderr[-3000:]}")
        o = json.loads(r.stdout.strip().splitlines()[-1])
        emit("ingest", tree=str(tree), part=part, shard=f"{args.shard}/{args.shards}", threads=args.threads,
             chunking=chunking or "default", **o,
             docs_per_s=round(o["documents"] / o["seconds"], 2), chunks_per_s=round(o["chunks"] / o["seconds"], 1),
             embed_chunks_per_s=round(o["chunks"] / max(o["embed_seconds"], 1e-9), 1))


def load_questions(path: Path, split: str) -> list[dict]:
    qs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [q for q in qs if split == "both" or q["split"] == split]


def rank_of(hits, docs: list[str]) -> int | None:
    for r, h in enumerate(hits, start=1):
        if any(h.chunk.path.endswith("/" + d) or h.chunk.path == d for d in docs):
            return r
    return None


def run_search(args) -> None:
    import numpy as np

    from edge.plan import EMBED_DIM, index_bytes
    from edge.runtime.embedder import Embedder
    from rag.index import VectorIndex, plan_for, rebuild_from
    from rag.retrieve import Fusion, Retriever
    from rag.store import Store

    bundle = Path(args.embedder) if args.embedder else default_bundle()
    emb = Embedder.from_bundle(bundle, threads=args.threads)
    d = Path(args.dir)
    ret = Retriever(emb, directory=d)
    store: Store = ret.store
    n, dim = store.count_chunks(), int(store.get_meta("dim"))
    db_bytes = sum(f.stat().st_size for f in d.glob("*.sqlite*")) + sum(f.stat().st_size for f in d.glob("*.db*"))
    qs = load_questions(Path(args.questions), args.split)
    modes = args.modes.split(",")
    fusions = [Fusion.parse(f) for f in args.fusions.split(",")] if args.fusions else [ret.fusion]
    for kind in args.indexes.split(","):
        import faiss

        plan = plan_for(kind, n, dim)
        t = time.perf_counter()
        vi = rebuild_from(store.iter_vectors, n, dim, ret.index.embedder_id, ret.index.generation, plan=plan)
        build_s = time.perf_counter() - t
        ret.index = vi
        ser = int(faiss.serialize_index(vi.index).nbytes)
        emit("index", kind=kind, chunks=n, build_seconds=round(build_s, 1), index_bytes=ser,
             index_bytes_per_chunk=round(ser / n, 1), planned_index_bytes_per_chunk=round(plan.est_bytes / n, 1),
             plan_vector_bytes_per_chunk=EMBED_DIM * 4, plan_total_bytes_per_chunk=index_bytes(1),
             sqlite_bytes_per_chunk=round(db_bytes / n, 1), params=plan.params)
        runs = [(m, f) for m in modes for f in (fusions if m == "hybrid" else [None])]
        for mode, fusion in runs:
            lat, ranks = [], []
            for q in qs:
                for rep in range(args.repeats):
                    t = time.perf_counter()
                    res = ret.search(q["q"], k=args.k, mode=mode, fusion=fusion, fetch_k=args.fetch_k)
                    lat.append((time.perf_counter() - t) * 1e3)
                ranks.append(rank_of(res.hits, q["docs"]))
            splits = ["tune", "heldout", "both"] if args.split == "both" else [args.split]
            for split in splits:  # one row per split, from the same searches
                sel = [i for i, q in enumerate(qs) if split == "both" or q["split"] == split]
                rk = [ranks[i] for i in sel]
                rr = [1.0 / r if r else 0.0 for r in rk]
                emit("retrieval", index=kind, mode=mode, split=split, n=len(sel), k=args.k, fetch_k=args.fetch_k,
                     fusion=f"{fusion.method}:{fusion.vector_weight}" if fusion else None,
                     recall_at_k=round(sum(r is not None for r in rk) / len(sel), 3), mrr=round(float(np.mean(rr)), 3),
                     p50_ms=round(float(np.percentile(lat, 50)), 2), p99_ms=round(float(np.percentile(lat, 99)), 2),
                     **({"missed": [qs[i]["q"][:60] for i, r in zip(sel, rk) if r is None]} if args.show_missed else {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ingest")
    a.add_argument("--corpus", default="/tmp/scale-corpus")
    a.add_argument("--dir", required=True, help="collection folder (created; parts add to it)")
    a.add_argument("--part", default="all", choices=["pydoc", "man", "all"])
    a.add_argument("--tree", default=None, help="run the ingest with another checkout's code (the peer)")
    a.add_argument("--embedder", default=None, help="embedder bundle (default: the default one)")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--shards", type=int, default=1, help="ingest the part in this many pieces (short locked jobs)")
    a.add_argument("--shard", type=int, default=0)
    a.add_argument("--chunk-tokens", type=int, default=None, help="chunk size in tokens (default: rag.chunk.ChunkParams)")
    a.add_argument("--overlap", type=int, default=None, help="tokens carried between chunks (default: ChunkParams)")
    a.add_argument("--embed-overlap", default=None, type=lambda v: {"yes": True, "no": False}[v], choices=[True, False],
                   help="yes|no: embed the carried tokens too (default: ChunkParams; a tree before it has no choice)")
    a.add_argument("--embed-tokens", type=int, default=None,
                   help="embed at most N tokens of each chunk, 0: no cap (default: ChunkParams; a tree before it has no choice)")
    s = sub.add_parser("search")
    s.add_argument("--dir", required=True)
    s.add_argument("--questions", default=str(QUESTIONS))
    s.add_argument("--split", default="both", choices=["tune", "heldout", "both"])
    s.add_argument("--indexes", default="flat,hnsw,ivfpq")
    s.add_argument("--modes", default="hybrid,vector,keyword")
    s.add_argument("--embedder", default=None)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--fetch-k", type=int, default=None, help="candidates per list before fusion (default: the retriever's)")
    s.add_argument("--show-missed", action="store_true")
    s.add_argument("--fusions", default=None, help="hybrid fusions to compare, e.g. rrf:0.5,convex:0.6 (default: the shipped one)")
    args = ap.parse_args()
    run_ingest(args) if args.cmd == "ingest" else run_search(args)


if __name__ == "__main__":
    main()
