"""The native CPU backend's decode step against ONNX Runtime's, same bundle, same run (issue 9).

Times the whole decode step at batch 1 and 8 over a given past, for edge-rag's native step
(edge.runtime.cpu) and for the bundle's ONNX Runtime session (the peer), in process CPU time
(all threads summed: holds up under load) and wall time, and prints the step bound on the 8/1
serving ratio each implies: 8 x t(1) / t(8). With --linears, also each distinct linear shape of
the native kernels at M = 1 / 8 / 32 rows (CPU time).

    python bench/bench_native.py --engine BUNDLE [--threads 2] [--past 64,256] [--linears] [--no-ort]
                                 [--isa scalar,avx2,avx512,vnni] [--kv-dtype fp16|int8]

--isa: the native step once per kernel path named (same process, one after the other; default: the
best this CPU has, or $EDGE_RAG_NATIVE_ISA's); --kv-dtype: the native KV pool's dtype (default: the manifest's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn, n: int = 10, rounds: int = 3) -> tuple[float, float]:
    """(least process CPU ms, least wall ms) per call over `rounds` runs of n calls, after 2 warm-ups."""
    for _ in range(2):
        fn()
    cpu, wall = float("inf"), float("inf")
    for _ in range(rounds):
        c, w = time.process_time(), time.perf_counter()
        for _ in range(n):
            fn()
        cpu, wall = min(cpu, (time.process_time() - c) / n * 1e3), min(wall, (time.perf_counter() - w) / n * 1e3)
    return cpu, wall


def native_steps(bundle, threads: int, pasts: list[int], isa: str | None = None, kv_dtype: str | None = None):
    from edge.runtime.cpu.backend import NativeBackend
    from edge.runtime.step import StepBatch

    from edge.runtime.cpu import kernels

    be = NativeBackend(bundle, max_batch=8, max_context=2048, threads=threads, kv_dtype=kv_dtype)
    isa = be.isa if isa is None else kernels.set_isa(isa, be.lib)  # be.lib: $EDGE_RAG_NATIVE_ISA's build where set
    bs = be.block_size
    mb = -(-2048 // bs)
    rng = np.random.default_rng(0)

    def batch(rows: list[tuple[int, np.ndarray, int]]) -> StepBatch:
        """rows: (row index r, token ids, first position); row r owns blocks r * mb ..."""
        ids, pos, slots, qs, lens, tabs = [], [], [], [0], [], []
        for r, tok, p0 in rows:
            p = np.arange(p0, p0 + len(tok))
            table = np.arange(r * mb, (r + 1) * mb, dtype=np.int32)
            ids.append(tok), pos.append(p), slots.append(table[p // bs] * bs + p % bs)
            qs.append(qs[-1] + len(tok)), lens.append(p0 + len(tok)), tabs.append(table)
        n = len(rows)
        i32 = lambda a: np.ascontiguousarray(np.concatenate(a) if isinstance(a, list) else a, dtype=np.int32)  # noqa: E731
        return StepBatch(bs, i32(ids), i32(pos), i32(slots), i32(np.array(qs)), i32(np.array(lens)), np.stack(tabs).astype(np.int32),
                         np.ones(n, np.int32), np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.int32),
                         np.zeros(n, np.float32), np.ones(n, np.int32))

    for past in pasts:
        for r in range(8):
            for s in range(0, past, 256):
                be.execute(batch([(r, rng.integers(0, 1000, min(256, past - s)), s)]))
        t = {}
        for b in (1, 8):
            step = batch([(r, rng.integers(0, 1000, 1), past) for r in range(b)])
            t[b] = timed(lambda: be.execute(step))
        pre = batch([(0, rng.integers(0, 1000, 128), 0)])
        tp = timed(lambda: be.execute(pre), n=3)
        yield {"figure": "decode_step", "backend": "native", "isa": isa, "kv_dtype": be.kv_dtype, "past": past, "threads": threads,
               "cpu_ms": {str(b): round(x[0], 2) for b, x in t.items()}, "wall_ms": {str(b): round(x[1], 2) for b, x in t.items()},
               "scaling_bound_8_over_1_cpu": round(8 * t[1][0] / t[8][0], 2), "scaling_bound_8_over_1_wall": round(8 * t[1][1] / t[8][1], 2),
               "prefill_128_wall_ms": round(tp[1], 1)}


def ort_steps(bundle, threads: int, pasts: list[int]):
    from bench.bench_ort_ops import ort_decode_step
    from edge.runtime.ort_session import OrtDecoderSession

    sess = OrtDecoderSession(bundle, max_batch=8, threads=threads, max_context=2048)
    rng = np.random.default_rng(0)
    for past in pasts:
        t = {b: timed(ort_decode_step(sess, b, past, rng)) for b in (1, 8)}
        for s in list(sess._slot):
            sess.release(s)
        sess.add_sequence(0)
        pre = rng.integers(0, 1000, 128)

        def prefill():
            sess.truncate(0, 0)
            sess.prefill(0, pre)
        tp = timed(prefill, n=3)
        yield {"figure": "decode_step", "backend": "onnxruntime", "past": past, "threads": threads,
               "cpu_ms": {str(b): round(x[0], 2) for b, x in t.items()}, "wall_ms": {str(b): round(x[1], 2) for b, x in t.items()},
               "scaling_bound_8_over_1_cpu": round(8 * t[1][0] / t[8][0], 2), "scaling_bound_8_over_1_wall": round(8 * t[1][1] / t[8][1], 2),
               "prefill_128_wall_ms": round(tp[1], 1)}


def linears(bundle, threads: int):
    from edge.quant.format import read_linear
    from edge.runtime.cpu import kernels
    from edge.runtime.cpu.build import forced_isa, load, tile_name
    from edge.runtime.cpu.weights import pack_linear

    isa, flags = forced_isa()  # $EDGE_RAG_NATIVE_ISA's build (avx2, avxvnni: another CPU's), else this CPU's
    lib = load(flags)
    isa = isa or tile_name(lib, lib.er_isa_max())

    w = bundle.load_weights()
    p = "model.layers.0."
    shapes = {"qkv": [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"], "o": [p + "self_attn.o_proj"],
              "gate_up": [p + "mlp.gate_proj", p + "mlp.up_proj"], "down": [p + "mlp.down_proj"], "lm_head": ["lm_head"]}
    rng = np.random.default_rng(0)
    for name, names in shapes.items():
        if not all(n + ".qweight" in w or n + ".weight" in w for n in names):
            continue
        lin = pack_linear([read_linear(w, n) for n in names])
        t = {}
        for m in (1, 8, 32):
            x = rng.standard_normal((m, lin.k)).astype(np.float32)
            t[m] = timed(lambda: kernels.linear(lin, x, threads=threads, build_flags=flags), n=20)[0] * 1e3
        yield {"figure": "native_linear", "name": name, "kind": f"int{lin.kind}", "n": lin.n, "k": lin.k, "isa": isa,
               "cpu_us": {str(m): round(v, 1) for m, v in t.items()}, "m8_over_m1": round(t[8] / t[1], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", help="generator bundle (default: the SmolLM2 int4 g32 benchmark bundle)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", default="64,256")
    ap.add_argument("--linears", action="store_true")
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime peer")
    ap.add_argument("--isa", default=None, help="native kernel paths to time, comma-separated (default: the best this CPU has)")
    ap.add_argument("--kv-dtype", default=None, choices=("fp16", "int8"), help="the native KV pool (default: the manifest's)")
    a = ap.parse_args()
    from edge.bundle import Bundle

    if a.engine is None:
        from edge.engines import tiny_generator_bundle

        a.engine = str(tiny_generator_bundle())
    b = Bundle.open(a.engine, kind="generator", verify=False)
    pasts = [int(x) for x in a.past.split(",")]
    print(json.dumps({"figure": "conditions", "engine": a.engine, "load_avg_1m": round(os.getloadavg()[0], 2), "threads": a.threads}), flush=True)
    for isa in (a.isa.split(",") if a.isa else [None]):
        for line in native_steps(b, a.threads, pasts, isa, a.kv_dtype):
            print(json.dumps(line), flush=True)
    if not a.no_ort:
        for line in ort_steps(b, a.threads, pasts):
            print(json.dumps(line), flush=True)
    if a.linears:
        for line in linears(b, a.threads):
            print(json.dumps(line), flush=True)
    print(json.dumps({"figure": "conditions_end", "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
    return 0


if __name__ == "__main__":
    from edge.errors import EdgeRagError

    try:
        sys.exit(main())
    except EdgeRagError as e:  # a path this CPU or build lacks, a bundle that is not there: one line
        print(f"bench_native: {e}", file=sys.stderr)
        sys.exit(2)
