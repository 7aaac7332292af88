"""RAG benchmark: retrieval quality per mode and `edge-rag ask` latency, cold and warm.

    python bench/bench_rag.py [--corpus examples/manuals] [--questions examples/questions.jsonl]
                              [-k 5] [--runs 3] [--generate-eval] [--no-ask]

Prints one JSON line per figure:
  ingest      documents, chunks, seconds, embedded chunks/s (default embedder)
  retrieval   recall@k, MRR and mean retrieval ms for hybrid, vector-only and keyword-only
              (vector-only is plain FAISS exact search over the same embeddings: the peer)
  answers     with --generate-eval: share of answers holding every expected keyword
  ask_cold    a fresh `edge-rag ask --json` process: wall time, engine load, retrieval, TTFT, total
  ask_warm    one process with both engines loaded: medians over `--runs` other questions of the
              questions file (a new prompt each, so the engine's prefix cache does not help)
  memory      EdgeRuntime.memory_report(): RSS growth per part against the plan

Uses the default engines (built on first use, cached under $EDGE_RAG_HOME) and its own
collection ("bench-rag"), re-ingested from scratch each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLLECTION = "bench-rag"


def emit(fig: str, **kw) -> None:
    print(json.dumps({"figure": fig, "machine": f"{platform.machine()} {os.cpu_count()} cores", **kw}, default=str),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=str(ROOT / "examples" / "manuals"))
    ap.add_argument("--questions", default=str(ROOT / "examples" / "questions.jsonl"))
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3, help="warm ask repetitions")
    ap.add_argument("--question", default="What does error E-214 mean?")
    ap.add_argument("--max-tokens", type=int, default=None, help="answer budget (default: the model's recipe)")
    ap.add_argument("--generate-eval", action="store_true", help="also score generated answers (slow)")
    ap.add_argument("--no-ask", action="store_true", help="retrieval figures only")
    args = ap.parse_args()

    from edge.engines import default_embedder_bundle, default_generator_bundle
    from edge.runtime.embedder import Embedder
    from rag.eval import evaluate, load_questions
    from rag.ingest import ingest
    from rag.retrieve import MODES, Retriever

    emb_path = default_embedder_bundle(progress=True)
    emb = Embedder.from_bundle(emb_path)
    rep = ingest(args.corpus, embedder=emb, collection=COLLECTION, rebuild=True, progress=False,
                 embedder_path=str(emb_path))
    emit("ingest", embedder=emb.embedder_id, documents=rep.total_documents, chunks=rep.total_chunks,
         skipped=len(rep.skipped), seconds=round(rep.seconds, 3), embed_seconds=round(rep.embed_seconds, 3),
         chunks_per_s=round(rep.chunks_added / max(rep.embed_seconds, 1e-9), 1), index=rep.index_kind)

    items = load_questions(args.questions)
    with Retriever(emb, COLLECTION) as r:
        r.search(items[0].question, k=args.k)  # warm-up (faiss, sqlite page cache)
        for mode in MODES:
            res = evaluate(items, r, k=args.k, mode=mode)
            emit("retrieval", mode=mode, k=args.k, n=res.n, recall_at_k=round(res.recall_at_k, 4),
                 mrr=round(res.mrr, 4), retrieval_ms_mean=round(res.retrieval_ms_mean, 2),
                 missed=[p["question"] for p in res.per_question if p["rank"] is None])
    if args.no_ask:
        return

    gen_path = default_generator_bundle(progress=True)
    # cold: a fresh process, engines loaded from disk, one question
    cmd = [sys.executable, "-c", "import sys; from edge.cli import main; sys.exit(main(sys.argv[1:]))",
           "ask", args.question, "--json", "-c", COLLECTION, "-k", str(args.k)]
    if args.max_tokens:
        cmd += ["--max-tokens", str(args.max_tokens)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    wall = (time.perf_counter() - t0) * 1e3
    if out.returncode != 0:
        emit("ask_cold", error=out.stderr.strip()[-500:])
    else:
        a = json.loads(out.stdout)
        t = a["timings"]
        emit("ask_cold", question=args.question, process_wall_ms=round(wall, 1),
             startup_ms=round(t.get("startup_ms", 0), 1), generator_load_ms=round(t.get("load_ms", 0), 1),
             retrieval_ms=round(t["retrieval_ms"], 2), ttft_ms=round(t["ttft_ms"], 1), total_ms=round(t["total_ms"], 1),
             answer_tokens=a["n_answer_tokens"], prompt_tokens=a["n_prompt_tokens"])

    # warm: one process, both engines loaded, `runs` questions it has not seen (no prefix-cache hit)
    from edge.runtime.host import EdgeRuntime

    with EdgeRuntime(COLLECTION, embedder=None, embedder_path=emb_path, generator_path=gen_path,
                     load_generator=True, progress=False) as rt:
        rt.ask(args.question, k=args.k, max_tokens=args.max_tokens)  # warm-up
        others = [it.question for it in items if it.question != args.question][: args.runs]
        runs = [rt.ask(q, k=args.k, max_tokens=args.max_tokens) for q in others]
        med = {key: statistics.median(a.timings[key] for a in runs) for key in ("retrieval_ms", "ttft_ms", "total_ms")}
        g = runs[-1].timings.get("generator", {})
        emit("ask_warm", questions=others, **{k: round(v, 2) for k, v in med.items()},
             prompt_tokens=runs[-1].n_prompt_tokens, answer_tokens=runs[-1].n_answer_tokens,
             prefill_s=g.get("prefill_s"), decode_s=g.get("decode_s"), n_generated=g.get("n_generated"),
             backend=rt.backend, answer=runs[-1].text[:200])
        mem = rt.memory_report()
        emit("memory", **mem)
        if args.generate_eval:
            res = evaluate(items, rt.retriever, k=args.k, mode="hybrid", generator=rt.generator,
                           max_tokens=args.max_tokens)
            emit("answers", mode="hybrid", n=res.n, keyword_hit_rate=round(res.keyword_hit_rate, 4),
                 keyword_recall=round(res.keyword_recall, 4), covered_rate=round(res.covered_rate, 4))


if __name__ == "__main__":
    main()
