"""Peak RSS of `edge-rag build` per stage, against the model's fp16 size (issue #14's target: ~2x).

    python bench/build_memory.py --model qwen2.5-coder-1.5b-instruct-q4_k_m --quant int8 \
        --profile orin-nano-8gb --context 4096 --out /tmp/b15

A thread samples /proc/self/status every 10 ms while the build runs in this process; the build
names its stages (read, tokenizer, calibration, each layer, LM head, weights, ONNX, commit).
One JSON line per stage (its peak RSS, anonymous and file-backed parts), then a total line: the
peak (VmHWM, the kernel's high-water mark that `/usr/bin/time -v` reports, or a higher sample),
the model's fp16 weight bytes (the planner's fp16 row) and their ratio. Linux only (/proc). No peer: nothing else builds our bundles.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """The peak of VmRSS (with its anon / file parts) per stage name."""

    def __init__(self, every_s: float = 0.01):
        super().__init__(daemon=True)
        self.every_s = every_s
        self.stage = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self.started: dict[str, float] = {}
        self.done = threading.Event()
        self.t0 = time.perf_counter()

    def enter(self, stage: str) -> None:
        self.stage = stage
        self.started.setdefault(stage, time.perf_counter() - self.t0)
        self._sample(stage)  # a stage shorter than the sampling period still gets a line

    def _sample(self, stage: str) -> None:
        s = _status()
        if stage not in self.peaks or s["VmRSS"] > self.peaks[stage]["VmRSS"]:
            self.peaks[stage] = s

    def run(self) -> None:
        while not self.done.is_set():
            self._sample(self.stage)
            time.sleep(self.every_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quant", default="auto")
    ap.add_argument("--group-size", type=int)
    ap.add_argument("--rtn", action="store_true", help="int4 without AWQ / GPTQ")
    ap.add_argument("--profile", default="orin-nano-8gb")
    ap.add_argument("--context", type=int)
    a = ap.parse_args(argv)

    from edge.build.generator import build_generator_bundle
    from edge.models.defaults import resolve_model
    from edge.models.spec import read_spec
    from edge.plan import plan_model

    spec = read_spec(resolve_model(a.model))
    fp16_bytes = plan_model(spec, a.profile, context=a.context or min(4096, spec.max_position)).row("fp16", 0).weight_bytes
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    build_generator_bundle(a.model, a.out, profile=a.profile, quant=a.quant, group_size=a.group_size, awq=not a.rtn,
                           context=a.context, progress=False, on_stage=sampler.enter)
    wall = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    conditions = {"model": spec.name or a.model, "quant": a.quant, "group_size": a.group_size, "rtn": a.rtn, "profile": a.profile,
                  "context": a.context}
    for stage, s in sampler.peaks.items():
        print(json.dumps({"bench": "build_memory", "stage": stage, "at_s": round(sampler.started.get(stage, 0.0), 1),
                          "peak_rss_bytes": s["VmRSS"], "anon_bytes": s["RssAnon"], "file_bytes": s["RssFile"]}))
    hwm = _status()["VmHWM"]
    top = max(sampler.peaks, key=lambda k: sampler.peaks[k]["VmRSS"])
    # NOTE: the kernel's per-thread RSS counters make VmHWM lag a sample by a few pages at times
    peak = max(hwm, sampler.peaks[top]["VmRSS"])
    print(json.dumps({"bench": "build_memory", **conditions, "wall_s": round(wall, 1), "peak_rss_bytes": peak, "vmhwm_bytes": hwm,
                      "peak_stage": top,
                      "fp16_weight_bytes": int(fp16_bytes), "peak_over_fp16": round(peak / fp16_bytes, 3),
                      "load_avg": open("/proc/loadavg").read().split()[:3]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
