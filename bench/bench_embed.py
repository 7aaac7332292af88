"""Embedding throughput and latency: edge-rag (ONNX Runtime fp32 and int8; the native encoder on the int8 bundle where
this CPU runs it) vs sentence-transformers
(torch, CPU), same machine, same run, same thread count, same texts.

Figures (one JSON line each):
  throughput  texts/s embedding ~200-token chunks at batch 32
  latency     single-query embed p50 / p95 ms (short questions, one at a time)
  ratio       edge-rag / sentence-transformers for each figure (target: >= 2x texts/s)

Rounds alternate engine order so that load from other processes on a shared machine hits
both alike; the median round is reported. Warm-up runs are excluded.

    python bench/bench_embed.py [--threads 2] [--chunks 128] [--rounds 3] [--queries 100]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUERIES = [
    "What does error E-214 mean?", "How long does a full charge take?", "battery replacement steps",
    "Which port does MQTT use?", "how do I calibrate the lidar", "firmware rollback", "robot drives in circles",
    "minimum wifi signal strength", "stopping distance at full speed", "wheel tread depth limit",
    "Why is the robot slow on its route?", "part number of the drive belt", "what is KS-FUS-10T",
    "cold storage battery capacity", "how to provision many robots", "safety field sizes",
]


def varied_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Short and long prose, code, numbers / part numbers, unicode, edge cases; deterministic."""
    import pydoc_data.topics as topics
    import random

    rng = random.Random(seed)
    paras = [p.strip() for k in sorted(topics.topics) for p in topics.topics[k].split("\n\n") if len(p.strip()) > 30]
    code = ["def f(x):\n    return x ** 2 + 1", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
            "SELECT id, name FROM chunks WHERE hash = ?;", "kestrel-cli logs bundle --since 24h --out x.tar.gz",
            "{\"question\": \"E-214?\", \"k\": 5}", "x = np.zeros((32, 384), dtype=np.float32)"]
    numbers = ["E-214", "KS-LDR-360-R2", "57.6 V at 60 A", "3.14159 2.71828 1.41421", "192.168.77.1/24",
               "Part KS-BAT-48105, 105 Ah, 5.0 kWh", "0x7fff_ffff", "1,050 x 650 x 320 mm", "+1-555-0142"]
    uni = ["Ünïcödé façade naïve café", "日本語のテキストです", "中文文本测试", "Привет, мир", "مرحبا بالعالم",
           "emoji 🚀🔋⚠️ done", "Ελληνικά γράμματα", "tab\tand\nnewline", "  leading and trailing spaces  "]
    short = ["What does error E-214 mean?", "battery life", "how do I calibrate the lidar", "a", "OK", "",
             "reset", "Why is the robot slow?", "firmware rollback steps"]
    out: list[str] = []
    while len(out) < n:
        kind = rng.randrange(6)
        if kind == 0:
            out.append(rng.choice(paras))
        elif kind == 1:  # long: several paragraphs, longer than max_seq_length (truncation)
            out.append(" ".join(rng.sample(paras, 4)))
        elif kind == 2:
            out.append(rng.choice(code))
        elif kind == 3:
            out.append(rng.choice(numbers) + " " + str(rng.randint(0, 10**6)))
        elif kind == 4:
            out.append(rng.choice(uni))
        else:
            out.append(rng.choice(short))
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_chunks(tokenizer, n: int, tokens: int) -> list[str]:
    """n texts of about `tokens` tokens ([CLS]/[SEP] included), cut from pydoc_data.topics."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    body = tokens - 2
    if len(ids) < n * body:
        ids = ids * (n * body // len(ids) + 1)
    return [tokenizer.decode(ids[i * body:(i + 1) * body]) for i in range(n)]


def timed(fn, repeat: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=128, help="texts per throughput round (multiple of the batch)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=100, help="single-query calls per latency round")
    ap.add_argument("--model", default=None, help="sentence-transformers folder (default: bundled all-MiniLM-L6-v2)")
    ap.add_argument("--avx2-format", action="store_true",
                    help="also the int8 build an x86 CPU without VNNI makes (EDGE_RAG_U8S8=saturates: uint8 weights), "
                         "timed on this CPU")
    args = ap.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from edge.build.encoder import build_embedder_bundle
    from edge.models.defaults import default_embedder_path
    from edge.runtime.embedder import Embedder

    torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else default_embedder_path()
    common = {"bench": "embed", "device": f"cpu: {cpu_name()}", "threads": args.threads,
              "torch": torch.__version__}

    st = SentenceTransformer(str(folder), device="cpu")
    engines = {"sentence-transformers": st}
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    import os

    builds = [("fp32", "fp32", None), ("int8", "int8", None)] + ([("int8-avx2", "int8", "saturates")] if args.avx2_format else [])
    for label, quant, u8s8 in builds:
        saved = dict(os.environ)
        if u8s8:
            os.environ["EDGE_RAG_U8S8"] = u8s8  # edge.cpu: build for that CPU
        try:
            bundle = build_embedder_bundle(folder, tmp / label, quant=quant, progress=False)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        engines[f"edge-rag-{label}"] = Embedder.from_bundle(bundle, threads=args.threads, backend="onnxruntime")
        if quant == "int8":  # the CPU default where it runs: the native encoder (edge.runtime.cpu.encoder)
            native = Embedder.from_bundle(bundle, threads=args.threads, backend="cpu")
            if native.backend == "native":
                engines[f"edge-rag-{label}-native"] = native
    emb0 = engines["edge-rag-fp32"]
    chunks = make_chunks(emb0.tokenizer, args.chunks, args.tokens)
    n_tok = [len(e.ids) for e in emb0.tokenizer.encode_batch(chunks)]
    queries = [QUERIES[i % len(QUERIES)] for i in range(args.queries)]

    def encode(name: str, texts: list[str]):
        eng = engines[name]
        if name == "sentence-transformers":
            return eng.encode(texts, batch_size=args.batch, convert_to_numpy=True)
        return eng.embed(texts, batch_size=args.batch)

    def query(name: str, q: str):
        eng = engines[name]
        return eng.encode(q, convert_to_numpy=True) if name == "sentence-transformers" else eng.embed_query(q)

    # parity sanity check on the bench texts themselves (a fast engine that is wrong is no win)
    ref = encode("sentence-transformers", chunks[: args.batch])
    for name in [n for n in engines if n.startswith("edge-rag-")]:
        cos = (encode(name, chunks[: args.batch]) * ref).sum(1)
        emit(**common, figure="parity", engine=name, min_cosine=round(float(cos.min()), 5),
             mean_cosine=round(float(cos.mean()), 5))

    names = list(engines)
    tput: dict[str, list[float]] = {n: [] for n in names}
    lat: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up: first calls allocate and pick kernels
        encode(name, chunks[: args.batch])
        for q in queries[:5]:
            query(name, q)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            tput[name].append(len(chunks) / timed(lambda: encode(name, chunks)))
        for name in order:
            for q in queries:
                lat[name].append(1000 * timed(lambda: query(name, q)))

    for name in names:
        quant = "fp32" if name == "sentence-transformers" else name.split("-", 2)[2].removesuffix("-native")
        backend = "torch" if name == "sentence-transformers" else engines[name].backend
        emit(**common, figure="throughput", engine=name, backend=backend, quant=quant, batch=args.batch,
             tokens_per_text=round(statistics.mean(n_tok), 1), texts=len(chunks), rounds=args.rounds,
             texts_per_s=round(statistics.median(tput[name]), 1), all_rounds=[round(x, 1) for x in tput[name]])
        emit(**common, figure="latency", engine=name, backend=backend, quant=quant, batch=1, queries=len(lat[name]),
             p50_ms=round(float(np.percentile(lat[name], 50)), 2), p95_ms=round(float(np.percentile(lat[name], 95)), 2))
    base_t = statistics.median(tput["sentence-transformers"])
    base_p50 = float(np.percentile(lat["sentence-transformers"], 50))
    for name in names[1:]:
        ratio = statistics.median(tput[name]) / base_t
        emit(**common, figure="ratio", engine=name, vs="sentence-transformers",
             throughput_ratio=round(ratio, 2), target=2.0, met=ratio >= 2.0,
             latency_p50_speedup=round(base_p50 / float(np.percentile(lat[name], 50)), 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
