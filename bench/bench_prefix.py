"""Prefix reuse: time to first token of a chat's second turn, with and without the generator
keeping the first turn's KV cache (Generator.reuse_prefix), on the default engine.

    python bench/bench_prefix.py [--engine BUNDLE] [--threads 2] [--runs 5]

Turn 1: a ~600-token user message (a manual excerpt) and a 32-token reply; turn 2: the history
plus a short question. One JSON line per mode: median TTFT of turn 2 over runs, the prompt and
cached token counts, and that both modes produced the same reply (greedy)."""

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
    args = ap.parse_args()
    from edge.engines import default_generator_bundle
    from edge.runtime.generator import Generator
    from edge.runtime.sampler import SamplingParams

    gen = Generator.from_bundle(args.engine or default_generator_bundle(), backend="onnxruntime", threads=args.threads)
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
            gen.reset()
            a = gen.generate(turn1, p)
            turn2 = turn1 + [{"role": "assistant", "content": a}, {"role": "user", "content": "Which error is the most serious?"}]
            b = gen.generate(turn2, p)
            ttfts.append(gen.stats.ttft_s * 1e3)
        replies[reuse] = b
        print(json.dumps({"figure": "second_turn_ttft", "reuse_prefix": reuse, "ttft_ms": round(statistics.median(ttfts), 1),
                          "prompt_tokens": gen.stats.n_prompt, "cached_tokens": gen.stats.cached_tokens,
                          "threads": args.threads}), flush=True)
    print(json.dumps({"figure": "second_turn_same_reply", "same": replies[False] == replies[True]}), flush=True)


if __name__ == "__main__":
    main()
