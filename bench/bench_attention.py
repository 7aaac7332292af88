"""Decode attention kernels alone, in-graph, over contexts: which split count to use.

    PYTHONPATH=. python3 bench/bench_attention.py [--heads 32 --kv-heads 8 --head-dim 128]

One JSON line per (kernel, context): microseconds per launch, from a CUDA graph of 32
launches (a model's layers) replayed 7 times (median). Kernels: paged_attn_decode_d* (one block
per head and sequence) and paged_attn_split_d* with P blocks per (head, sequence)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--contexts", default="64,128,256,512,1024,2048,4096")
    ap.add_argument("--splits", default="1,2,4,5,8,16")
    args = ap.parse_args()
    import cupy as cp

    from edge.runtime.cuda.kernels import load

    k = load(0)
    hq, hkv, d, bs, threads = args.heads, args.kv_heads, args.head_dim, 16, 256
    ctxs = [int(c) for c in args.contexts.split(",")]
    max_ctx = max(ctxs)
    max_blocks = max_ctx // bs
    rng = np.random.default_rng(0)
    q = cp.asarray(rng.standard_normal((1, hq * d), dtype=np.float32).astype(np.float16))
    kc = cp.asarray(rng.standard_normal((max_ctx, hkv, d), dtype=np.float32).astype(np.float16))
    vc = cp.asarray(rng.standard_normal((max_ctx, hkv, d), dtype=np.float32).astype(np.float16))
    bt = cp.asarray(rng.permutation(max_blocks).astype(np.int32))  # scattered blocks
    out = cp.empty((1, hq * d), dtype=cp.float16)
    pmax = max(int(p) for p in args.splits.split(","))
    part_o = cp.zeros(hq * pmax * d, dtype=cp.float32)
    part_ml = cp.zeros(hq * pmax * 2, dtype=cp.float32)
    tickets = cp.zeros(hq, dtype=cp.uint32)
    smem = 4 * (max_ctx + d + 32 + 8 * threads + max_blocks)
    for name in (f"paged_attn_decode_d{d}", f"paged_attn_split_d{d}", f"paged_attn_split_tk_d{d}"):
        if smem > 48 * 1024:
            cp.cuda.driver.funcSetAttribute(k[name].ptr, 8, smem)
    scale = np.float32(1 / math.sqrt(d))
    st = cp.cuda.Stream(non_blocking=True)
    s0, e0 = cp.cuda.Event(), cp.cuda.Event()

    def timed(launch) -> float:
        with st:
            st.begin_capture()
            for _ in range(32):
                launch()
            g = st.end_capture()
            g.launch(st)
            ts = []
            for _ in range(7):
                s0.record(st)
                g.launch(st)
                e0.record(st)
                e0.synchronize()
                ts.append(cp.cuda.get_elapsed_time(s0, e0) * 1e3 / 32)
        return statistics.median(ts)

    ref = {}
    for L in ctxs:
        ctx = cp.asarray(np.array([L], dtype=np.int32))
        args_old = (q, kc, vc, bt, ctx, out, np.int32(hq), np.int32(hkv), np.int32(d), np.int32(bs), np.int32(max_blocks), np.int32(max_ctx), scale, np.int32(0), np.float32(0))
        us = timed(lambda: k[f"paged_attn_decode_d{d}"]((hq, 1), (threads,), args_old, shared_mem=smem))
        ref[L] = out.get().astype(np.float32)
        print(json.dumps({"kernel": f"paged_attn_decode_d{d}", "context": L, "us": round(us, 2)}), flush=True)
        for name in (f"paged_attn_split_d{d}", f"paged_attn_split_tk_d{d}"):  # K coalesced / one token per thread
            for p in (int(x) for x in args.splits.split(",")):
                a = (q, kc, vc, bt, ctx, out, part_o, part_ml, tickets, np.int32(hq), np.int32(hkv), np.int32(bs), np.int32(max_blocks), np.int32(max_ctx), scale, np.int32(1), np.int32(0), np.float32(0))
                us = timed(lambda: k[name]((hq, 1, p), (threads,), a, shared_mem=smem))
                err = float(np.abs(out.get().astype(np.float32) - ref[L]).max())
                print(json.dumps({"kernel": name, "splits": p, "context": L, "us": round(us, 2), "max_abs_diff_vs_decode": err}), flush=True)


if __name__ == "__main__":
    main()
