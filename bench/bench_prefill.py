"""Where a long prefill's time goes on the CUDA backend, in one process: the int4 dequantization alone
(all layer linears), the whole prefill with the side-stream dequantization ring off and on, and a
per-kernel timeline of one prefill (events around every launch; ring off).

    PYTHONPATH=. python3 bench/bench_prefill.py [--config llama-3.2-1b] [--tokens 2048] [--work DIR]

One JSON line per figure. Every variant's last-position logits must equal the first variant's bit
for bit (they run the same kernels on the same inputs), or the script stops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_cuda import event_ms  # noqa: E402
from bench.random_bundle import make_random_bundle  # noqa: E402


def emit(**fig) -> None:
    print(json.dumps(fig), flush=True)


def prefill_ms(sess, ids, reps: int = 6) -> tuple[float, float, np.ndarray]:
    """Median wall ms of prefill (as bench_cuda: prefill_greedy, synchronous) and of its GPU span."""
    cp = sess.cp
    walls, spans, logits = [], [], None
    s0, e0 = cp.cuda.Event(), cp.cuda.Event()
    for rep in range(reps + 2):
        sess.add_sequence(50)
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        s0.record(sess.stream)
        out = sess._prefill(50, ids)
        e0.record(sess.stream)
        e0.synchronize()
        t1 = time.perf_counter()
        logits = out.get()
        sess.release(50)
        if rep >= 2:
            walls.append(1e3 * (t1 - t0))
            spans.append(cp.cuda.get_elapsed_time(s0, e0))
    return statistics.median(walls), statistics.median(spans), logits


class _Timeline:
    """Stands in for session.k: an event pair around every launch, summed per kernel name."""

    def __init__(self, sess):
        self.sess, self.k, self.marks = sess, sess.k, []

    def __getitem__(self, name):
        f = self.k[name]
        cp = self.sess.cp

        def call(grid, block, args, **kw):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            f(grid, block, args, **kw)
            b.record()
            self.marks.append((name, a, b))

        return call

    def __getattr__(self, attr):
        return getattr(self.k, attr)


def timeline(sess, ids) -> None:
    import edge.runtime.cuda.linears as smod  # where _linear_cublas looks gemm_f16 up

    cp = sess.cp
    tl = _Timeline(sess)
    real_k, real_gemm = sess.k, smod.gemm_f16

    def gemm(cp_, x, w, y, m):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        real_gemm(cp_, x, w, y, m)
        b.record()
        tl.marks.append((f"cublas[{w.shape[0]}x{w.shape[1]}]", a, b))

    sess.k, smod.gemm_f16 = tl, gemm
    try:
        sess.add_sequence(51)
        s0, e0 = cp.cuda.Event(), cp.cuda.Event()
        with sess.stream:
            s0.record()
            sess._prefill(51, ids)
            e0.record()
        e0.synchronize()
        sess.release(51)
    finally:
        sess.k, smod.gemm_f16 = real_k, real_gemm
    per: dict[str, list] = {}
    for name, a, b in tl.marks:
        per.setdefault(name, []).append(cp.cuda.get_elapsed_time(a, b))
    total = sum(sum(v) for v in per.values())
    span = cp.cuda.get_elapsed_time(s0, e0)
    emit(figure="prefill_timeline", tokens=len(ids), span_ms=round(span, 3), kernels_ms=round(total, 3),
         gaps_ms=round(span - total, 3), launches=len(tl.marks),
         kernels={k: {"count": len(v), "ms": round(sum(v), 3)} for k, v in sorted(per.items(), key=lambda kv: -sum(kv[1]))})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama-3.2-1b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-bench-bundles"))
    args = ap.parse_args()
    import cupy as cp

    from edge.bundle import Bundle
    from edge.runtime.cuda.session import CudaDecoderSession

    path = args.work / f"{args.config}-int4"
    if not (path / "manifest.json").exists():
        make_random_bundle(args.config, path, recipe="int4", group_size=128, max_context=4096)
    sess = CudaDecoderSession(Bundle.open(path, kind="generator", verify=False), max_batch=1, max_context=args.tokens + 256)
    ids = np.random.default_rng(3).integers(0, sess.vocab_size, size=args.tokens)
    lins = [L[k] for L in sess.layers for k in ("qkv", "o", "gu", "down")]
    buf = sess._dequant_workspace(lins[0])
    ms = event_ms(cp, lambda: [sess.dequantize(lin, buf) for lin in lins], reps=5)
    nbytes = sum(lin.nbytes + 2 * lin.n * lin.k for lin in lins)
    emit(figure="dequant_all_layers", config=args.config, ms=round(ms, 3), tb_s=round(nbytes / ms / 1e9, 2))
    base = None
    for overlap in (False, True):
        sess.prefill_overlap = overlap
        wall, span, logits = prefill_ms(sess, ids)
        if base is None:
            base = logits
        same = bool(np.array_equal(logits, base))
        emit(figure="prefill_variant", config=args.config, tokens=args.tokens, overlap=overlap,
             wall_ms=round(wall, 3), gpu_ms=round(span, 3), same_logits=same)
        if not same:
            raise SystemExit(f"overlap={overlap}: logits differ (max abs {np.abs(logits - base).max():.3e})")
    sess.prefill_overlap = False
    timeline(sess, ids)


if __name__ == "__main__":
    main()
