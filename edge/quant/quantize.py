"""Quantize a whole decoder into bundle tensors, layer by layer, with the error report.

    float weights (HF names) --[calibration forward, one layer at a time]--> linear inputs
      --[AWQ scale search + fold (int4, optional)]--> scaled float weights
      --[policy: int4 / int8 / fp16 / fp32 per module]--> bundle tensors (edge.quant.format)
      --[effective weight vs float weight, on the calibration inputs]--> QuantReport

Precision per module comes only from edge.quant.policy.module_precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edge.models.reference import LayerWeights, lm_head_weight
from edge.models.spec import ModelSpec
from edge.quant.awq import AwqResult, awq_layer, search_clip
from edge.quant.calib import CalibrationSet, LayerwiseActivations
from edge.quant.policy import Precision, module_precision
from edge.quant.report import LayerError, QuantReport, linear_error
from edge.quant.rtn import fake_quant, quantize_linear

# short name -> (HF suffix, capture point of its input)
LINEARS = {
    "q": ("self_attn.q_proj", "attn_in"),
    "k": ("self_attn.k_proj", "attn_in"),
    "v": ("self_attn.v_proj", "attn_in"),
    "o": ("self_attn.o_proj", "o_in"),
    "gate": ("mlp.gate_proj", "mlp_in"),
    "up": ("mlp.up_proj", "mlp_in"),
    "down": ("mlp.down_proj", "down_in"),
}
NO_CLIP = ("q", "k")  # AWQ skips clipping q/k: attention logits are sensitive to their range


@dataclass
class QuantResult:
    tensors: dict[str, np.ndarray]  # bundle tensors (edge.quant.format)
    report: QuantReport
    awq_alphas: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> point -> alpha


def _store_dtype(recipe: str):
    return np.float32 if recipe == "fp32" else np.float16


def quantize_model(
    spec: ModelSpec,
    weights: dict[str, np.ndarray],
    recipe: str,
    group_size: int,
    *,
    calib: CalibrationSet | None = None,
    awq: bool = False,
    clip: bool = True,
    on_layer: Callable[[int], None] | None = None,
) -> QuantResult:
    """Bundle tensors for `recipe` ("fp32" | "fp16" | "int8" | "int4").

    calib: calibration sequences; needed for AWQ and for output errors in the report.
    awq: int4 only; search and fold activation-aware scales (and clip ranges when `clip`).
    on_layer(i): progress callback after layer i (i == n_layers for the LM head)."""
    dt = _store_dtype(recipe)
    use_awq = awq and recipe == "int4" and calib is not None
    acts_runner = LayerwiseActivations(spec, weights, calib.seqs) if calib is not None and recipe not in ("fp32",) else None
    out: dict[str, np.ndarray] = {}
    errors: list[LayerError] = []
    alphas: dict[str, dict[str, float]] = {}

    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        lw = LayerWeights.from_weights(weights, i)
        acts = acts_runner.run(i, lw) if acts_runner is not None else None
        arr = {n: getattr(lw, n) for n in LINEARS} | {"ln1": lw.ln1, "ln2": lw.ln2, "v_bias": lw.v_bias}
        precs: dict[str, Precision] = {n: module_precision(p + suf, recipe, group_size, arr[n].shape[1]) for n, (suf, _) in LINEARS.items()}
        res = AwqResult()
        if use_awq:
            arr, res = awq_layer(arr, acts, precs, spec.n_heads, spec.n_kv_heads)
            alphas[str(i)] = res.alphas
        for n, (suf, point) in LINEARS.items():
            w_scaled = arr[n]
            prec = precs[n]
            col = res.col.get(n)
            row = res.row.get(n)
            clip_r = None
            if use_awq and clip and prec.kind == "int4" and n not in NO_CLIP:
                x_scaled = acts[point] / col[None, :] if col is not None else acts[point]
                clip_r = search_clip(x_scaled, w_scaled, prec.group_size)
            out.update(quantize_linear(p + suf, w_scaled, prec, clip_r))
            if recipe != "fp32":
                w_eff = fake_quant(w_scaled, prec, clip_r)
                if col is not None:  # back to the float basis: W_eff = deq * row / col
                    w_eff = w_eff * row[:, None] / col[None, :]
                x = acts[point] if acts is not None else None
                w_float = getattr(lw, n)
                scaled = use_awq and (not np.all(col == 1) or not np.all(row == 1))
                errors.append(linear_error(p + suf, prec.kind, w_float, w_eff, x, awq=bool(scaled)))
        out[p + "input_layernorm.weight"] = arr["ln1"].astype(dt)
        out[p + "post_attention_layernorm.weight"] = arr["ln2"].astype(dt)
        for b in ("q", "k", "v"):
            bias = arr["v_bias"] if b == "v" else getattr(lw, f"{b}_bias")
            if bias is not None:
                out[p + f"self_attn.{b}_proj.bias"] = np.asarray(bias).astype(dt)
        if on_layer:
            on_layer(i)

    # Embeddings, final norm, LM head (policy: head int8 under int4/int8; a tied head becomes a
    # separate quantized copy of the embedding table; fp16/fp32 tied heads are not duplicated).
    emb = weights["model.embed_tokens.weight"]
    out["model.embed_tokens.weight"] = emb.astype(dt)
    out["model.norm.weight"] = weights["model.norm.weight"].astype(dt)
    head = lm_head_weight(spec, weights)
    hprec = module_precision("lm_head", recipe, group_size, spec.hidden_size)
    if hprec.kind in ("int8", "int4") or not spec.tie_embeddings:
        out.update(quantize_linear("lm_head", head, hprec))
    if recipe != "fp32":
        x = acts_runner.final_normed(weights["model.norm.weight"]) if acts_runner is not None else None
        errors.append(linear_error("lm_head", hprec.kind, head, fake_quant(head, hprec), x))
    if on_layer:
        on_layer(spec.n_layers)
    return QuantResult(out, QuantReport(errors), alphas)
