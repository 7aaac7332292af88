"""The engine's host work per step against a stand-in GPU (no GPU needed): a fake backend whose
steps take `--step-ms` on a simulated device timeline (launch queues the step behind the last
one and returns; result() sleeps until its step is done), with the CUDA backend's capabilities
(device sampling, async steps, prev_rows resolved "on the device"). Same measure as
bench_cuda_engine.py's engine_N: n tokens per step over the steps where all n rows decode, each
step from its launch to the next launch, as a ratio to the device's own pace (n / step time).

    python bench/bench_engine_host.py [--concurrency 16,64] [--step-ms 1.15,2.6] [--repeat 3]

overlap=true: async steps; overlap=false: one step at a time (the engine before async steps).
One JSON line per run; host_ms = step_ms - the device step (the host work the device waited for).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.runtime.engine import Engine  # noqa: E402
from edge.runtime.sampler import SamplingParams  # noqa: E402
from edge.runtime.step import BackendCaps, StepOutput  # noqa: E402

PROMPT, NEW, V, BS = 128, 128, 128256, 16


class SleepyGpu:
    """Steps of a fixed device time on a simulated timeline; next id = f(row's last id, position)."""

    def __init__(self, max_seqs: int, step_s: float, prefill_s_per_token: float = 2e-6):
        ctx = PROMPT + NEW + 16
        self.caps = BackendCaps(num_blocks=max_seqs * -(-ctx // BS) + 8, block_size=BS, max_seqs=max_seqs, max_context=ctx,
                                vocab_size=V, device_sampling=True, greedy_stream=False, async_steps=True)
        self.step_s, self.per_tok = step_s, prefill_s_per_token
        self.busy_until = 0.0
        self.last = np.zeros(0, np.int32)

    def launch(self, b):
        ids = b.token_ids
        if b.has_prev_rows:
            ids = ids.copy()
            rows = np.nonzero(b.prev_rows >= 0)[0]
            ids[b.query_start[rows + 1] - 1] = self.last[b.prev_rows[rows]]
        last_tok = ids[b.query_start[1:] - 1].astype(np.int64)
        out = ((last_tok * 31 + b.seq_lens * 7) % V).astype(np.int32)
        out[b.logits_rows == 0] = -1
        self.last = out
        dt = self.step_s + (self.per_tok * b.num_tokens if not b.is_decode_only else 0.0)
        done = max(time.perf_counter(), self.busy_until) + dt
        self.busy_until = done

        class Handle:
            def result(self):  # as cudaEventSynchronize: spin (without the GIL) until the step is done
                if done - time.perf_counter() > 3e-4:
                    time.sleep(done - time.perf_counter() - 2e-4)
                while time.perf_counter() < done:
                    time.sleep(0)
                return StepOutput(out.copy())

        return Handle()

    def execute(self, b):
        return self.launch(b).result()


def run(n: int, step_s: float, overlap: bool, rng) -> dict:
    be = SleepyGpu(n, step_s)
    prompts = [rng.integers(0, V, size=PROMPT).tolist() for _ in range(n)]
    steps: list[tuple[float, bool]] = []
    launch = be.launch

    def timed(b):
        steps.append((time.perf_counter(), b.is_decode_only and b.num_rows == n))
        return launch(b)

    be.launch = timed
    with Engine(be, eos_ids=(), overlap=overlap) as eng:
        streams = [eng.submit(p, SamplingParams(max_tokens=NEW, temperature=0), detokenize=False) for p in prompts]
        for s in streams:
            list(s)
    assert all(s.request.stats.n_generated == NEW for s in streams)
    full = [i for i, st in enumerate(steps) if st[1] and i + 1 < len(steps)]
    cycle = [steps[i + 1][0] - steps[i][0] for i in full]
    step_ms = 1e3 * statistics.mean(cycle)
    return {"figure": f"engine_host_{n}", "overlap": overlap, "device_step_ms": 1e3 * step_s, "step_ms": round(step_ms, 4),
            "host_ms": round(step_ms - 1e3 * step_s, 4), "full_steps": len(full),
            "engine_over_device": round(1e3 * step_s / step_ms, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--step-ms", default="1.15,2.6", help="device step per concurrency (H200 1B int4: 1.15 ms at 16, 2.6 at 64)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ns = [int(x) for x in args.concurrency.split(",")]
    ms = [float(x) for x in args.step_ms.split(",")]
    rng = np.random.default_rng(0)
    for n, m in zip(ns, ms):
        for _ in range(args.repeat):
            for overlap in (True, False):
                print(json.dumps(run(n, m / 1e3, overlap, rng)), flush=True)


if __name__ == "__main__":
    main()
