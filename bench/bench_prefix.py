"""Prefix cache: time to first token with and without the engine's prefix cache (Generator.reuse_prefix),
on the default engine.

    python bench/bench_prefix.py [--engine BUNDLE] [--threads 2] [--runs 5] [--questions 32]

RAG: --questions questions (examples/questions.jsonl) asked one after another, each prompt = the
RAG system prompt + the same ~600-token passage set + the question, 16 greedy tokens: p50 / p90
TTFT per mode and whether every answer is the same with and without the cache.
Chat: turn 1 a ~600-token user message (a manual excerpt) and a 32-token reply; turn 2 the history
plus a short question: median TTFT of turn 2 over runs, and that both modes give the same reply."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--questions", type=int, default=32)
    args = ap.parse_args()
    from edge.engines import tiny_generator_bundle as default_generator_bundle  # SmolLM2: the GGUF the peer runs
    from edge.runtime.generator import Generator
    from edge.runtime.sampler import SamplingParams

    gen = Generator.from_bundle(args.engine or default_generator_bundle(), backend="onnxruntime", threads=args.threads)
    rag_figures(gen, args)
    text = (ROOT / "examples" / "manuals" / "error_codes.md").read_text()
    words = text.split()
    excerpt = " ".join(words[: 450])
    turn1 = [{"role": "user", "content": f"Here is part of a manual:\n{excerpt}\n\nSummarise it in one sentence."}]
    p = SamplingParams(max_tokens=32, temperature=0)
    replies = {}
    for reuse in (False, True):
        gen.reuse_prefix = reuse
        ttfts = []
        for _ in range(args.runs):
            a = gen.generate(turn1, p)
            turn2 = turn1 + [{"role": "assistant", "content": a}, {"role": "user", "content": "Which error is the most serious?"}]
            b = gen.generate(turn2, p)
            ttfts.append(gen.stats.ttft_s * 1e3)
        replies[reuse] = b
        print(json.dumps({"figure": "second_turn_ttft", "reuse_prefix": reuse, "ttft_ms": round(statistics.median(ttfts), 1),
                          "prompt_tokens": gen.stats.n_prompt, "cached_tokens": gen.stats.cached_tokens,
                          "threads": args.threads}), flush=True)
    print(json.dumps({"figure": "second_turn_same_reply", "same": replies[False] == replies[True]}), flush=True)


def rag_figures(gen, args) -> None:
    from rag.prompt import SYSTEM_PROMPT

    from edge.runtime.sampler import SamplingParams

    tok = gen.tokenizer
    words = (ROOT / "examples" / "manuals" / "error_codes.md").read_text().split()
    n = 400
    while len(tok.encode(" ".join(words[:n]))) < 600 and n < len(words):
        n += 10
    passages = " ".join(words[:n])
    qs = [json.loads(line)["question"] for line in (ROOT / "examples" / "questions.jsonl").read_text().splitlines() if line.strip()]
    qs = (qs * 4)[: args.questions]
    p = SamplingParams(max_tokens=16, temperature=0)
    answers = {}
    for reuse in (False, True):
        gen.reuse_prefix = reuse
        ttfts, cached, out = [], [], []
        for q in qs:
            msgs = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"Passages:\n[1] {passages}\n\nQuestion: {q}"}]
            out.append(gen.generate(msgs, p))
            ttfts.append(gen.stats.ttft_s * 1e3)
            cached.append(gen.stats.cached_tokens)
        answers[reuse] = out
        print(json.dumps({"figure": "rag_ttft", "prefix_cache": reuse, "questions": len(qs),
                          "p50_ttft_ms": round(statistics.median(ttfts), 1),
                          "p90_ttft_ms": round(statistics.quantiles(ttfts, n=10)[-1], 1),
                          "prompt_tokens": gen.stats.n_prompt, "median_cached_tokens": statistics.median(cached),
                          "threads": args.threads}), flush=True)
    print(json.dumps({"figure": "rag_same_answers", "same": answers[False] == answers[True],
                      "differing": sum(a != b for a, b in zip(answers[False], answers[True]))}), flush=True)


if __name__ == "__main__":
    main()
