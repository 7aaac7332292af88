"""One eager batch-1 decode step under Nsight Compute: per kernel its duration, DRAM and L1 / L2
figures, occupancy and the warps' main stall reasons (what events and leave-one-out replays do
not show). Kernels run one at a time under ncu (no PDL overlap): their times are the plain ones.

    ncu --clock-control none --profile-from-start off --launch-count 12 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --csv --page details --log-file $OUT/ncu.csv \
        python3 bench/profile_step_ncu.py --config llama-3-8b
    python3 bench/profile_step_ncu.py --summarize $OUT/ncu.csv

The profiled range is one decode step after a 128-token prompt (cudaProfilerStart / Stop around
it); --launch-count 12 covers the embedding and the first layer and a half. The session autotunes
while ncu is attached (its picks can differ from a plain process's: printed at the end).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KEEP = {  # (section, metric) -> short name
    "Duration": "us",
    "DRAM Throughput": "dram_%",
    "Memory Throughput": "mem_%",
    "L1/TEX Hit Rate": "l1_hit_%",
    "L2 Hit Rate": "l2_hit_%",
    "Achieved Occupancy": "occ_%",
    "Registers Per Thread": "regs",
    "Block Limit Registers": "blk_lim_regs",
    "Waves Per SM": "waves",
    "Warp Cycles Per Issued Instruction": "cyc_per_issue",
    "Issued Warp Per Scheduler": "issue_per_sched",
    "Max Bandwidth": "max_bw_%",
}


def summarize(path: Path) -> None:
    rows = list(csv.reader(open(path)))
    head = next(i for i, r in enumerate(rows) if "Metric Name" in r)
    cols = rows[head]
    ki, si, mi, ui, vi, ii = (cols.index(c) for c in ("Kernel Name", "Section Name", "Metric Name", "Metric Unit", "Metric Value", "ID"))
    out: dict = {}
    for r in rows[head + 1 :]:
        if len(r) <= vi:
            continue
        key = (r[ii], r[ki][:48])
        d = out.setdefault(key, {})
        name, unit, val = r[mi], r[ui], r[vi]
        if name in KEEP:
            v = val.replace(",", "")
            short = KEEP[name]
            if name == "Duration" and unit in ("ns", "nsecond", "us", "usecond"):
                v = str(round(float(v) / (1000 if unit.startswith("n") else 1), 2))
            elif unit and unit != "%":
                short, v = f"{short}[{unit}]", v
            if name == "Memory Throughput" and unit != "%":
                short = f"mem_bw[{unit}]"
            d[short] = v
    for (i, k), d in out.items():
        print(i, k, " ".join(f"{n}={v}" for n, v in d.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama-3-8b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-bench-bundles"))
    ap.add_argument("--summarize", type=Path)
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    import cupy as cp

    from bench.random_bundle import make_random_bundle
    from edge.bundle import Bundle
    from edge.runtime.cuda.session import CudaDecoderSession

    path = args.work / f"{args.config}-int4"
    if not (path / "manifest.json").exists():
        t0 = time.perf_counter()
        make_random_bundle(args.config, path, recipe="int4", group_size=128, max_context=4096)
        print(f"bundle built in {time.perf_counter() - t0:.1f} s", flush=True)
    sess = CudaDecoderSession(Bundle.open(path, kind="generator", verify=False), max_batch=1, max_context=512)
    prompt = np.random.default_rng(1).integers(0, sess.vocab_size, size=128)
    sess.add_sequence(0)
    tok = sess.prefill_greedy(0, prompt)
    sess.use_graphs = False
    tok = int(sess.decode_greedy([0], np.array([tok]))[0])  # warm
    cp.cuda.Device().synchronize()
    cp.cuda.profiler.start()
    sess.decode_greedy([0], np.array([tok]))
    cp.cuda.Device().synchronize()
    cp.cuda.profiler.stop()
    lins = [lin for lin in (*sess.layers[0].values(), sess.lm_head) if getattr(lin, "m1", None) is not None]
    print("picks", {f"{lin.shape_key}|{lin.role}": sess._cand_name((lin.m1, lin.fused)) for lin in lins}, flush=True)


if __name__ == "__main__":
    main()
