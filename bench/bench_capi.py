"""The C API's overhead: the same questions through libedgerag.so (bench/capi_ask.c) and through the
Python API (EdgeRuntime.ask), on the same engines and collection, CPU.

    python bench/bench_capi.py [--engine DIR] [--threads 2] [--rounds 3] [--questions 8] [--max-tokens 64]

Each side runs in its own process (load, one warm-up ask, then every question once), alternating
C, Python, C, Python ... for --rounds rounds so that machine load drifts hit both alike. Time to
first token and total are measured by the caller (C: clock_gettime around er_ask and at its first
token callback; Python: perf_counter around ask() and at its first on_token). The answers of both
sides must be identical. Prints one JSON line per figure: medians over every (round, question),
and the C/Python ratio (target: <= 1.05).

Needs the default embedder and the collection `bench-capi` (ingested from examples/manuals here
on first use) under $EDGE_RAG_HOME; --engine defaults to the default generator (built on first use).
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
COLLECTION = "bench-capi"


def python_driver(engine: str, threads: int, max_tokens: int, qfile: str, warmup: int) -> None:
    """The Python API side (run in its own process): one JSON line per answer, like capi_ask.c."""
    from edge.cli.rag_cmd import _embedder
    from edge.runtime.generator import Generator
    from edge.runtime.host import EdgeRuntime

    questions = [q for q in Path(qfile).read_text().splitlines() if q]
    emb, _ = _embedder(None, COLLECTION)
    gen = Generator.from_bundle(engine, backend="onnxruntime", threads=threads)
    rt = EdgeRuntime(COLLECTION, embedder=emb, generator=gen)
    for i in range(warmup + len(questions)):
        q = questions[0 if i < warmup else i - warmup]
        first = None

        def on_token(piece: str) -> None:
            nonlocal first
            if first is None:
                first = time.perf_counter()

        t0 = time.perf_counter()
        ans = rt.ask(q, max_tokens=max_tokens, on_token=on_token)
        t1 = time.perf_counter()
        if i >= warmup:
            d = ans.to_dict()
            print(json.dumps({"q": i - warmup, "ttft_ms": ((first or t1) - t0) * 1e3, "total_ms": (t1 - t0) * 1e3,
                              "n_answer_tokens": ans.n_answer_tokens, "answer": d}, default=str), flush=True)
    rt.close()
    gen.close()


def run_side(cmd: list[str]) -> list[dict]:
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{p.stderr[-3000:]}")
    return [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default=None, help="generator bundle (default: the default engine)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--questions", type=int, default=8, help="first N of examples/questions.jsonl")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--workdir", default=str(ROOT / ".bench" / "capi"))
    ap.add_argument("--python-driver", nargs=5, metavar=("ENGINE", "THREADS", "MAX_TOKENS", "QFILE", "WARMUP"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.python_driver:
        e, t, m, qf, w = a.python_driver
        python_driver(e, int(t), int(m), qf, int(w))
        return

    from edge.capi.build import build_library, build_program
    from edge.engines import default_embedder_bundle, default_generator_bundle
    from edge.paths import collection_exists

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    engine = a.engine or str(default_generator_bundle(progress=True))
    if not collection_exists(COLLECTION):
        from edge.runtime.embedder import Embedder
        from rag.ingest import ingest

        emb_path = default_embedder_bundle(progress=True)
        ingest(ROOT / "examples" / "manuals", embedder=Embedder.from_bundle(emb_path), collection=COLLECTION,
               progress=False, embedder_path=str(Path(emb_path).resolve()))
    lib = build_library(work / "lib")
    prog = build_program(ROOT / "bench" / "capi_ask.c", work / "capi_ask", lib)
    rows = [json.loads(ln) for ln in (ROOT / "examples" / "questions.jsonl").read_text().splitlines() if ln.strip()]
    qfile = work / "questions.txt"
    qfile.write_text("\n".join(r["question"] for r in rows[: a.questions]) + "\n")

    c_cmd = [str(prog), engine, COLLECTION, str(a.threads), str(a.max_tokens), str(qfile), "1"]
    py_cmd = [sys.executable, __file__, "--python-driver", engine, str(a.threads), str(a.max_tokens), str(qfile), "1"]
    res: dict[str, list[dict]] = {"c": [], "python": []}
    for r in range(a.rounds):
        for side, cmd in (("c", c_cmd), ("python", py_cmd)) if r % 2 == 0 else (("python", py_cmd), ("c", c_cmd)):
            res[side] += [x | {"round": r} for x in run_side(cmd)]
            print(f"round {r + 1}/{a.rounds} {side} done", file=sys.stderr)
    (work / "raw.json").write_text(json.dumps(res, default=str))
    texts = {side: [x["answer"]["text"] for x in v] for side, v in res.items()}
    same = texts["c"] == texts["python"]
    cond = {"device": platform.processor() or platform.machine(), "backend": "onnxruntime", "threads": a.threads,
            "engine": Path(engine).name, "questions": a.questions, "rounds": a.rounds, "max_tokens": a.max_tokens,
            "answers_identical": same, "load_avg_1m": os.getloadavg()[0]}
    for fig in ("ttft_ms", "total_ms"):
        med = {side: statistics.median(x[fig] for x in v) for side, v in res.items()}
        for side in ("c", "python"):
            print(json.dumps({"figure": f"{fig} median", "api": side, "value": round(med[side], 2), **cond}))
        ratio = med["c"] / med["python"]
        print(json.dumps({"figure": f"{fig} C / Python", "value": round(ratio, 4), "target": "<= 1.05",
                          "met": ratio <= 1.05, **cond}))
        # the same question in the same round (adjacent processes): less exposed to load drift
        paired = statistics.median(c[fig] / p[fig] for c, p in zip(res["c"], res["python"]))
        print(json.dumps({"figure": f"{fig} C / Python, median of paired (round, question) ratios",
                          "value": round(paired, 4), **cond}))
    if not same:
        sys.exit("the C and Python answers differ")


if __name__ == "__main__":
    main()
