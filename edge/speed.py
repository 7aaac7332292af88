"""Projected decode / prefill speed of the cuda backend on a Jetson, from measurements of the same
kernels on a large GPU run inside a CUDA green context of the Jetson's SM count
(bench/bench_green_ctx.py; the figures are in speed_ref.json beside this file).

The model, per term (every number it uses is in `Projection.assumptions`):

    decode step  = max(t_N * f_ref / f_dev,  bytes_per_token / (eta * bandwidth))
    prefill time = t_N * f_ref / f_dev * r_tensor

- t_N: the step (or prefill) measured on the reference GPU with N SMs, N = the Jetson's SM count
  (CUDA cores / 128 on Ampere's GA10B); with few SMs the time is SM work and the kernels' fixed
  latencies, both counted in clock cycles, so it scales with the SM clock ratio f_ref / f_dev.
  The reference GPU's memory is faster than any Jetson's: that is what the second term bounds.
- bytes_per_token / (eta * bandwidth): the weights and the KV of a short context (192 tokens, as
  measured) read once per step at eta of the module's peak bandwidth (eta = 0.75: an assumption,
  not a measurement on a Jetson).
- r_tensor: dense fp16 tensor-core FLOP per clock per SM, reference / device (Hopper 4096,
  Ampere incl. Orin 2048, datasheets): prefill is matrix work (a 2048-token prefill of a 1B model
  does ~4 TFLOP and moves ~9 GB: at Orin NX's 102 GB/s the bytes take a fifth of the time the
  arithmetic does, so no bandwidth term).
- A model other than the measured one is scaled from the nearest measured model by the ratio of
  bytes read per token (decode) and of parameters (prefill).

A projection, not a measurement on a Jetson: compare it with figures measured there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from edge.models.spec import ModelSpec
from edge.profiles import DeviceProfile, load_profile
from edge.quant.policy import bytes_read_per_token

CORES_PER_SM = {"8.7": 128, "8.6": 128, "8.0": 64, "9.0": 128}
TENSOR_FLOP_PER_CLK_SM = {"8.7": 2048, "8.6": 1024, "8.0": 2048, "9.0": 4096}  # dense fp16, fp32 accumulate
BANDWIDTH_EFFICIENCY = 0.75
SHORT_CONTEXT = 192  # KV read per decode step: a 128-token prompt + half of 128 new tokens (as measured)


@dataclass(frozen=True)
class Projection:
    profile: str
    power_mode: str
    sms: int
    decode_tok_s: float
    decode_bound: str  # "sm" (clock-scaled measurement) | "bandwidth"
    prefill_tokens: int
    prefill_ms: float
    reference: str  # the measured model and SM count it was scaled from
    assumptions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@lru_cache(maxsize=1)
def reference_data() -> dict[str, Any]:
    return json.loads(Path(__file__).with_name("speed_ref.json").read_text())


def _measure(data: dict, sms: int, n_params: float) -> tuple[dict, float]:
    """The measurement of the nearest model (by parameters) at the SM count nearest `sms`; the
    SM scale factor (measured SMs / sms, applied when the device has a count not measured)."""
    rows = data["measurements"]
    model = min({r["model"] for r in rows}, key=lambda m: abs(next(r["n_params"] for r in rows if r["model"] == m) - n_params))
    cand = [r for r in rows if r["model"] == model]
    row = min(cand, key=lambda r: (abs(r["sms"] - sms), -r["sms"]))
    return row, row["sms"] / sms


def project(spec: ModelSpec, profile: str | DeviceProfile, recipe: str = "int4", group_size: int = 128,
            power_mode: str | None = None, prefill_tokens: int = 2048) -> Projection | None:
    """Projected batch-1 decode tok/s and prefill time on a Jetson profile; None for profiles that
    are not Jetsons or lack the SM count / clock this needs."""
    prof = load_profile(profile)
    mode = prof.power_mode(power_mode)
    cc = prof.compute_capability
    if prof.kind != "jetson" or cc not in CORES_PER_SM or not mode.gpu_max_mhz or not prof.cuda_cores:
        return None
    data = reference_data()
    sms = max(1, prof.cuda_cores // CORES_PER_SM[cc])
    row, sm_scale = _measure(data, sms, spec.n_params)
    clock = data["sm_clock_mhz"] / mode.gpu_max_mhz
    bw = BANDWIDTH_EFFICIENCY * mode.bandwidth_bytes_s
    # decode
    bpt = bytes_read_per_token(spec, recipe, group_size) + SHORT_CONTEXT * spec.kv_bytes_per_token(2)
    t_sm = sm_scale * clock / row["decode_b1_tok_s"] * (bpt / row["bytes_per_token"])
    t_bw = bpt / bw
    decode_s = max(t_sm, t_bw)
    # prefill (measured at 2048 tokens; other lengths scale linearly from the nearest measured length)
    key = min((k for k in row if k.startswith("prefill_") and k.endswith("_ms")), key=lambda k: abs(int(k.split("_")[1]) - prefill_tokens))
    n_meas = int(key.split("_")[1])
    r_tensor = data["tensor_flop_per_clk_sm"] / TENSOR_FLOP_PER_CLK_SM[cc]
    prefill_s = row[key] / 1e3 * sm_scale * clock * r_tensor * (spec.n_params / row["n_params"]) * prefill_tokens / n_meas
    return Projection(
        profile=prof.name, power_mode=mode.name, sms=sms,
        decode_tok_s=round(1 / decode_s, 1), decode_bound="sm" if t_sm >= t_bw else "bandwidth",
        prefill_tokens=prefill_tokens, prefill_ms=round(1e3 * prefill_s, 1),
        reference=f"{row['model']} on {data['device']} with {row['sms']} SMs",
        assumptions={
            "sm_clock_ratio": round(clock, 3), "sm_scale": round(sm_scale, 3), "tensor_rate_ratio": r_tensor,
            "bandwidth_efficiency": BANDWIDTH_EFFICIENCY, "bandwidth_gbps": mode.bandwidth_gbps,
            "bytes_per_token": bpt, "measured": {k: v for k, v in row.items() if k != "model"},
        },
    )
