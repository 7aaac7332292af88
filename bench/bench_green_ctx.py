"""edge-rag's CUDA decode and prefill inside a CUDA green context limited to N SMs: the Orin
projection's measurement (Orin Nano / NX: 8 SMs, AGX Orin: 16; the H200 has 132).

    PYTHONPATH=. python3 bench/bench_green_ctx.py --sms 8,16,132 [--config llama-3.2-1b] [--out DIR]

Each SM count runs in its own process: the driver's green-context API (cuda-python:
cuDeviceGetDevResource -> cuDevSmResourceSplitByCount -> cuDevResourceGenerateDesc ->
cuGreenCtxCreate -> cuGreenCtxStreamCreate) gives a stream whose kernels run on those SMs only; the
session's stream is replaced by it (memory and modules are the primary context's, which green
contexts share), the tensor-core GEMM plan and the GEMV autotune are redone for N SMs, and the
decode graphs are captured on it. N = the device's SM count runs without a green context.

Figures (one JSON line per N): decode b1 tok/s (prompt 128, 127 greedy steps through the
host-free stream), prefill of 512 and 2048 tokens in ms, and the SM count the driver granted.
The H200 keeps its clocks (~1.98 GHz) and its memory bandwidth (shared by the few SMs); the
projection (edge.speed) scales these by the Orin profile's clocks and bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT, NEW = 128, 128


def _ok(res):
    err, *vals = res
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err}")
    return vals[0] if len(vals) == 1 else vals


def green_stream(sms: int):
    """A stream of a green context of `sms` SMs on device 0; (stream handle, SMs granted)."""
    from cuda.bindings import driver as drv

    _ok(drv.cuInit(0))
    dev = _ok(drv.cuDeviceGet(0))
    whole = _ok(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    groups, n, _rem = _ok(drv.cuDevSmResourceSplitByCount(1, whole, 0, sms))
    desc = _ok(drv.cuDevResourceGenerateDesc([groups[0]], 1))
    gctx = _ok(drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
    st = _ok(drv.cuGreenCtxStreamCreate(gctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
    granted = int(groups[0].sm.smCount)
    return int(st), granted, gctx  # keep gctx alive


def worker(bundle: Path, sms: int) -> dict:
    import cupy as cp

    from edge.runtime.cuda.autotune import autotune_int4_m1, autotune_tc
    from edge.runtime.cuda.gemm import TcWorkspace, plan_tc
    from edge.runtime.cuda.session import CudaDecoderSession

    cp.cuda.runtime.setDevice(0)  # the primary context first (green contexts share its memory)
    total = int(cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"])
    sess = CudaDecoderSession(bundle, max_batch=1, max_context=2304, verify=False)
    granted, keep = total, None
    if sms < total:
        handle, granted, keep = green_stream(sms)
        sess.stream = cp.cuda.ExternalStream(handle, device_id=0)
        sess.sms = granted
        for lin in sess.linears():
            plan_tc(lin, granted)
        sess._tc = TcWorkspace.for_linears(cp, sess.linears())
        sess._graphs.clear()
        sess.int4_m1_us = autotune_int4_m1(sess)
        sess.tc_us = autotune_tc(sess)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, sess.vocab_size, size=PROMPT)
    sess.generate_greedy(prompt, 8)  # warm-up: graphs captured on this stream
    decs = []
    for rep in range(3):
        sess.add_sequence(rep)
        tok = sess.prefill_greedy(rep, prompt)
        t1 = time.perf_counter()
        toks = list(sess.greedy_stream(rep, tok, NEW - 1))
        decs.append((NEW - 1) / (time.perf_counter() - t1))
        sess.release(rep)
        assert len(toks) == NEW - 1
    from edge.quant.policy import bytes_read_per_token

    spec = sess.spec
    props = cp.cuda.runtime.getDeviceProperties(0)
    out = {"figure": "green_ctx", "sms_asked": sms, "sms": granted, "sms_total": total,
           "decode_b1_tok_s": round(statistics.median(decs), 1), "n_params": int(spec.n_params),
           "bytes_per_token": int(bytes_read_per_token(spec, "int4", 128) + (PROMPT + NEW // 2) * spec.kv_bytes_per_token(2)),
           "sm_clock_mhz_max": int(props["clockRate"]) // 1000}
    for n in (512, 2048):
        ids = rng.integers(0, sess.vocab_size, size=n)
        ts = []
        for rep in range(4):
            sess.add_sequence(50)
            sess.stream.synchronize()
            t0 = time.perf_counter()
            sess.prefill_greedy(50, ids)
            ts.append(time.perf_counter() - t0)
            sess.release(50)
        out[f"prefill_{n}_ms"] = round(1e3 * statistics.median(ts[1:]), 2)
    del keep
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sms", default="8,16,132")
    ap.add_argument("--config", default="llama-3.2-1b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-bench-bundles"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    bundle = a.work / f"{a.config}-int4"
    if a.worker is not None:
        print(json.dumps({**worker(bundle, a.worker), "model": a.config}), flush=True)
        return
    if not (bundle / "manifest.json").exists():
        from bench.random_bundle import make_random_bundle

        make_random_bundle(a.config, bundle, recipe="int4", group_size=128, max_context=4096)
    lines = []
    for sms in (int(s) for s in a.sms.split(",")):
        p = subprocess.run([sys.executable, __file__, "--worker", str(sms), "--config", a.config, "--work", str(a.work)],
                           stdout=subprocess.PIPE, text=True)
        for line in p.stdout.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                lines.append(line)
        if p.returncode != 0:
            print(json.dumps({"figure": "green_ctx_failed", "sms": sms, "exit": p.returncode}), flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "green_ctx.jsonl").write_text("".join(x + "\n" for x in lines))


if __name__ == "__main__":
    main()
