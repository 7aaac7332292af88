"""The embedder on the GPU: edge-rag's cuda encoder vs sentence-transformers (torch, fp16) on the
same GPU, same run, same texts.

Figures (one JSON line each):
  accuracy    cosine of each engine's vectors to sentence-transformers fp32 (CPU) on 200 varied
              texts (target: edge-rag min >= 0.999)
  throughput  texts/s embedding ~200-token chunks at batch 64, texts in -> vectors on the host
              (tokenizing included, as in sentence-transformers' encode) (target: >= 1.5x)
  latency     one short query at a time, p50 / p95 ms
  gpu_time    edge-rag's GPU time for one batch of 64 x 200 tokens (CUDA events), next to the
              tensor-core FLOP it does
  ratio       edge-rag / sentence-transformers

Rounds alternate engine order; the median round is reported; warm-up excluded; every timing
ends with the vectors on the host.

    python bench/bench_embed_gpu.py [--model DIR] [--chunks 2048] [--batch 64] [--rounds 5] [--queries 200]
    python bench/bench_embed_gpu.py --write-texts texts.json   # the texts, for a machine of another Python
                                                               # (pydoc_data differs between versions)
    python bench/bench_embed_gpu.py --texts texts.json ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_embed import QUERIES, make_chunks, varied_texts  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def cosines(a, b):
    import numpy as np

    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def _folder(model: str | None) -> Path:
    if model:
        return Path(model)
    from edge.models.defaults import default_embedder_path

    return Path(default_embedder_path())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="sentence-transformers folder (default: the installed all-MiniLM-L6-v2)")
    ap.add_argument("--chunks", type=int, default=2048, help="texts per throughput round")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--queries", type=int, default=200, help="single-query calls per latency round")
    ap.add_argument("--texts", default=None, help="read the varied texts, chunks and queries from this JSON file")
    ap.add_argument("--write-texts", default=None, help="write them to this JSON file and stop")
    args = ap.parse_args()
    if args.write_texts:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(_folder(args.model) / "tokenizer.json"))
        tok.no_padding()
        Path(args.write_texts).write_text(json.dumps({"varied": varied_texts(200), "queries": QUERIES,
                                                      "chunks": make_chunks(tok, args.chunks, args.tokens)}))
        return 0

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    import cupy as cp

    from edge.build.encoder import build_embedder_bundle
    from edge.runtime.embedder import Embedder

    folder = _folder(args.model)
    given = json.loads(Path(args.texts).read_text()) if args.texts else None
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = torch.cuda.get_device_name(0)
    common = {"bench": "embed_gpu", "device": gpu, "torch": torch.__version__, "cupy": cp.__version__}

    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-gpu-"))
    ours = Embedder.from_bundle(build_embedder_bundle(folder, tmp / "b", quant="fp32", progress=False), backend="cuda")
    assert ours.backend == "cuda"
    st16 = SentenceTransformer(str(folder), device="cuda").half()
    st32_cpu = SentenceTransformer(str(folder), device="cpu")
    emit(**common, figure="setup", model=ours.info.name, kernels_compile_s=round(ours.session.compile_s, 2),
         weight_mib=round(ours.session.weight_bytes / 2**20, 1), st_attn=str(getattr(st16[0].auto_model.config, "_attn_implementation", "?")))

    # accuracy: 200 varied texts against sentence-transformers fp32 on the CPU
    texts = given["varied"] if given else varied_texts(200)
    ref = st32_cpu.encode(texts, batch_size=32, convert_to_numpy=True)
    for name, vecs in (("edge-rag-cuda", ours.embed(texts, batch_size=32)),
                       ("sentence-transformers-fp16", st16.encode(texts, batch_size=32, convert_to_numpy=True).astype(np.float32))):
        c = cosines(vecs, ref)
        emit(**common, figure="accuracy", engine=name, vs="sentence-transformers fp32 (cpu)", texts=len(texts),
             min_cosine=round(float(c.min()), 6), mean_cosine=round(float(c.mean()), 6),
             **({"target": 0.999, "met": bool(c.min() >= 0.999)} if name == "edge-rag-cuda" else {}))

    chunks = given["chunks"][: args.chunks] if given else make_chunks(ours.tokenizer, args.chunks, args.tokens)
    n_tok = [len(e.ids) for e in ours.tokenizer.encode_batch(chunks)]
    qs = given["queries"] if given else QUERIES
    queries = [qs[i % len(qs)] for i in range(args.queries)]
    c = cosines(ours.embed(chunks[:256], batch_size=args.batch), st32_cpu.encode(chunks[:256], batch_size=32, convert_to_numpy=True))
    emit(**common, figure="accuracy", engine="edge-rag-cuda", vs="sentence-transformers fp32 (cpu)", texts=256,
         tokens_per_text=round(statistics.mean(n_tok), 1), min_cosine=round(float(c.min()), 6), mean_cosine=round(float(c.mean()), 6))

    def encode(name: str, batch: list[str]):
        if name == "sentence-transformers-fp16":
            return st16.encode(batch, batch_size=args.batch, convert_to_numpy=True)
        return ours.embed(batch, batch_size=args.batch)

    def query(name: str, q: str):
        if name == "sentence-transformers-fp16":
            return st16.encode(q, convert_to_numpy=True)
        return ours.embed_query(q)

    names = ["edge-rag-cuda", "sentence-transformers-fp16"]
    for name in names:  # warm-up: kernel selection, allocations
        for _ in range(3):
            encode(name, chunks[: 4 * args.batch])
        for q in queries[:20]:
            query(name, q)
    tput: dict[str, list[float]] = {n: [] for n in names}
    lat: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            torch.cuda.synchronize()
            t = time.perf_counter()
            encode(name, chunks)
            torch.cuda.synchronize()
            tput[name].append(len(chunks) / (time.perf_counter() - t))
        for name in order:
            for q in queries:
                t = time.perf_counter()
                query(name, q)
                lat[name].append(1000 * (time.perf_counter() - t))

    for name in names:
        backend = "torch fp16 (sdpa)" if name.startswith("sentence") else "cuda fp16 (cuBLAS + own kernels)"
        emit(**common, figure="throughput", engine=name, backend=backend, batch=args.batch, texts=len(chunks),
             tokens_per_text=round(statistics.mean(n_tok), 1), rounds=args.rounds,
             texts_per_s=round(statistics.median(tput[name]), 1), all_rounds=[round(x, 1) for x in tput[name]])
        emit(**common, figure="latency", engine=name, backend=backend, batch=1, queries=len(lat[name]),
             p50_ms=round(float(np.percentile(lat[name], 50)), 3), p95_ms=round(float(np.percentile(lat[name], 95)), 3))

    # the GPU part of one batch (tokenizing and the host excluded): CUDA events around launch
    ids = [ours.tokenizer.encode(t).ids for t in chunks[: args.batch]]
    enc = ours.session
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(3):
        enc.launch(ids)
    times, host = [], []
    for _ in range(20):
        start.record()
        t = time.perf_counter()
        enc.launch(ids)
        host.append(1000 * (time.perf_counter() - t))
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    t_tok = sum(map(len, ids))
    s = ours.session.spec
    flop = 2 * t_tok * s.n_layers * (4 * s.hidden_size ** 2 + 2 * s.hidden_size * s.intermediate_size) \
        + 4 * s.n_layers * s.hidden_size * sum(len(x) ** 2 for x in ids)
    ms = statistics.median(times)
    emit(**common, figure="gpu_time", engine="edge-rag-cuda", batch=args.batch, tokens=t_tok, ms=round(ms, 3),
         tflop_s=round(flop / ms / 1e9, 1), host_queue_ms=round(statistics.median(host), 3),
         note="launch() of one batch between CUDA events (the GPU waits where Python queues slower than it runs)")
    t = time.perf_counter()
    for _ in range(10):
        ours.tokenizer.encode_batch(chunks[: args.batch])
    emit(**common, figure="tokenize", batch=args.batch, ms=round((time.perf_counter() - t) * 100, 3))

    base_t = statistics.median(tput["sentence-transformers-fp16"])
    ratio = statistics.median(tput["edge-rag-cuda"]) / base_t
    p50 = {n: float(np.percentile(lat[n], 50)) for n in names}
    emit(**common, figure="ratio", engine="edge-rag-cuda", vs="sentence-transformers-fp16", throughput_ratio=round(ratio, 2),
         target=1.5, met=ratio >= 1.5, latency_p50_speedup=round(p50["sentence-transformers-fp16"] / p50["edge-rag-cuda"], 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
