"""What int8 KV costs on the native CPU backend: the same bundle with fp16 and with int8 K/V pools.

    python bench/kv_int8_quality.py --engine BUNDLE [--tokens 4096] [--window 512] [--max-tokens 128] [--threads 2]

- Perplexity on the held-out text of bench/perplexity.py (the last 20% of pydoc_data.topics), in
  windows of --window tokens scored token by token through the native step (every window a row of
  one decode step), once per KV dtype.
- Greedy streams: bench.serve_harness.PROMPTS (the serving benchmark's prompts, chat template),
  --max-tokens greedy tokens each with either pool: how many streams are identical, and where the
  others first differ.

One JSON line per figure. Correctness only: no timing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def window_nll(bundle, kv: str, windows: list[np.ndarray], threads: int) -> np.ndarray:
    """Negative log-likelihood of tokens 1..W-1 of every window, all windows as rows of one step."""
    from bench.perplexity import _nll_from_logits
    from edge.runtime.cpu.backend import NativeBackend
    from edge.runtime.step import StepBatch

    B, W = len(windows), len(windows[0])
    be = NativeBackend(bundle, max_batch=B, max_context=W, threads=threads, kv_dtype=kv, kv_tokens=B * (W + 16))
    bs = be.block_size
    bpr = -(-W // bs)
    tables = np.arange(B * bpr, dtype=np.int32).reshape(B, bpr)
    arr = np.stack(windows).astype(np.int32)
    one = np.ones(B, np.int32)
    out = []
    for p in range(W - 1):
        pos = np.full(B, p, np.int32)
        slots = (tables[:, p // bs] * bs + p % bs).astype(np.int32)
        sb = StepBatch(bs, arr[:, p].copy(), pos, slots, np.arange(B + 1, dtype=np.int32), pos + 1, tables, one,
                       np.zeros(B, np.float32), np.ones(B, np.float32), np.zeros(B, np.int32), np.zeros(B, np.float32), one.copy())
        out.append(_nll_from_logits(be.execute(sb).logits[:B], arr[:, p + 1]))
    return np.stack(out, 1).reshape(-1)


def greedy(bundle, kv: str, prompts: list[str], max_tokens: int, threads: int) -> list[list[int]]:
    from edge.runtime.cpu.backend import NativeBackend
    from edge.runtime.generator import Generator
    from edge.runtime.sampler import SamplingParams
    from edge.runtime.tokenizer import Tokenizer

    gen = Generator(NativeBackend(bundle, threads=threads, kv_dtype=kv), Tokenizer.from_bundle(bundle), bundle)
    toks = []
    for p in prompts:
        s = gen.submit([{"role": "user", "content": p}], SamplingParams(max_tokens=max_tokens, temperature=0))
        s.text()
        toks.append(list(s.request.output_ids))
    return toks


def main() -> None:
    from bench.perplexity import heldout_windows
    from bench.serve_harness import PROMPTS
    from edge.bundle import Bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True, type=Path)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    b = Bundle.open(a.engine, kind="generator")
    windows = heldout_windows(a.engine, a.tokens, a.window)
    ppl = {}
    for kv in ("fp16", "int8"):
        nll = window_nll(b, kv, windows, a.threads)
        ppl[kv] = math.exp(float(nll.mean()))
        print(json.dumps({"figure": "perplexity", "kv": kv, "ppl": round(ppl[kv], 4), "tokens": int(nll.size)}), flush=True)
    print(json.dumps({"figure": "perplexity_ratio", "int8_over_fp16": round(ppl["int8"] / ppl["fp16"], 5)}), flush=True)
    streams = {kv: greedy(b, kv, list(PROMPTS), a.max_tokens, a.threads) for kv in ("fp16", "int8")}
    first_diff = []
    for x, y in zip(streams["fp16"], streams["int8"]):
        n = min(len(x), len(y))
        d = next((i for i in range(n) if x[i] != y[i]), None if len(x) == len(y) else n)
        first_diff.append(d)
    same = sum(d is None for d in first_diff)
    print(json.dumps({"figure": "greedy_streams", "prompts": len(first_diff), "identical": same, "max_tokens": a.max_tokens,
                      "first_difference_at": first_diff,
                      "tokens_fp16": sum(map(len, streams["fp16"])), "tokens_int8": sum(map(len, streams["int8"]))}), flush=True)


if __name__ == "__main__":
    main()
