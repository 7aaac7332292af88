"""Quantize a whole decoder into bundle tensors, layer by layer, with the error report.

    float weights (HF names) --[calibration forward, one layer at a time]--> linear inputs
      --[AWQ scale search + fold (int4, optional)]--> scaled float weights
      --[GPTQ rounding (int4, optional; edge.quant.gptq) or RTN]--> same int4 layout
      --[policy: int4 / int8 / fp16 / fp32 per module]--> bundle tensors (edge.quant.format)
      --[effective weight vs float weight, on the calibration inputs]--> QuantReport

Precision per module comes only from edge.quant.policy.module_precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edge.models.checkpoint import read_rows, tensor_shape
from edge.models.reference import LayerWeights, layer_forward
from edge.models.spec import ModelSpec
from edge.quant.awq import AwqResult, awq_layer, search_clip
from edge.quant.format import QTensor, has_linear
from edge.quant.gptq import GptqConfig, gptq_quantize, hessian
from edge.quant.calib import CalibrationSet, LayerwiseActivations
from edge.quant.policy import Precision, module_precision
from edge.quant.report import LayerError, QuantReport, RowBlockError, linear_error
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
# Rows of the embedding / LM head handled at a time: float32 blocks of 4096 x 1536 are 25 MB, where
# the whole 151,936-row table is 0.9 GB per copy (and the head's quantize / fake-quant / error
# steps each made one or two). Every step is row-wise, so the stored tensors are the same bytes.
HEAD_BLOCK_ROWS = 4096


@dataclass
class QuantResult:
    tensors: dict[str, np.ndarray]  # bundle tensors (edge.quant.format); empty when given to a sink
    report: QuantReport
    awq_alphas: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> point -> alpha


def _gptq_layer(
    arr: dict[str, np.ndarray],
    acts: dict[str, np.ndarray],
    precs: dict[str, Precision],
    res: AwqResult,
    clips: dict[str, np.ndarray | None],
    config: GptqConfig,
) -> dict[str, QTensor]:
    """GPTQ-round this layer's int4 linears (AWQ-scaled weights `arr`, inputs scaled to match).

    Linears reading the same capture point share one Hessian and are rounded together (rows
    are independent given H), so q/k/v and gate/up cost one column sweep each."""
    out: dict[str, QTensor] = {}
    by_point: dict[str, list[str]] = {}
    for n, (_, point) in LINEARS.items():
        if precs[n].kind == "int4":
            by_point.setdefault(point, []).append(n)
    for point, names in by_point.items():
        g = precs[names[0]].group_size
        col = res.col.get(names[0])
        x = acts[point] / col[None, :] if col is not None else acts[point]  # [T, K], matches W * col
        h = hessian(x)
        w = np.concatenate([arr[n] for n in names], axis=0)
        ng = w.shape[1] // g
        cl = None
        if any(clips[n] is not None for n in names):
            cl = np.concatenate([clips[n] if clips[n] is not None else np.ones((arr[n].shape[0], ng), np.float32) for n in names], axis=0)
        qt = gptq_quantize(w, h, g, clip=cl, config=config)
        r0 = 0
        for n in names:
            r1 = r0 + arr[n].shape[0]
            out[n] = QTensor(qt.qweight[r0:r1], qt.scales[r0:r1], 4, g, (r1 - r0, w.shape[1]))
            r0 = r1
    return out


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
    gptq: bool = False,
    gptq_config: GptqConfig = GptqConfig(),
    sequential: bool = False,
    on_layer: Callable[[int], None] | None = None,
    sink: Callable[[str, np.ndarray], None] | None = None,
) -> QuantResult:
    """Bundle tensors for `recipe` ("fp32" | "fp16" | "int8" | "int4").

    calib: calibration sequences; needed for AWQ and for output errors in the report.
    awq: int4 only; search and fold activation-aware scales (and clip ranges when `clip`).
    gptq: int4 only; round with GPTQ (edge.quant.gptq) after AWQ's folding instead of RTN.
    sequential: with gptq, the next layer's calibration inputs come from this layer's quantized
      weights. Off by default: on SmolLM2-135M g64 it was WORSE (held-out ppl 12.18 vs 12.00
      at 4096 calibration tokens), the small calibration set over-fits further downstream.
    on_layer(i): progress callback after layer i (i == n_layers for the LM head).
    sink(name, tensor): takes each bundle tensor as soon as it is made (edge.bundle.WeightsSpool.add)
      instead of the result holding them all: the build then holds one layer at a time."""
    dt = _store_dtype(recipe)
    use_awq = awq and recipe == "int4" and calib is not None
    use_gptq = gptq and recipe == "int4" and calib is not None
    acts_runner = LayerwiseActivations(spec, weights, calib.seqs) if calib is not None and recipe not in ("fp32",) else None
    out: dict[str, np.ndarray] = {}

    def put(tensors: dict[str, np.ndarray]) -> None:
        if sink is None:
            out.update(tensors)
        else:
            for name, t in tensors.items():
                sink(name, t)

    errors: list[LayerError] = []
    alphas: dict[str, dict[str, float]] = {}

    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        lw = LayerWeights.from_weights(weights, i, spec)
        hidden_in = list(acts_runner.hidden) if use_gptq and sequential else None  # run() rebinds, never mutates
        acts = acts_runner.run(i, lw) if acts_runner is not None else None
        arr = {n: getattr(lw, n) for n in LINEARS} | {"ln1": lw.ln1, "ln2": lw.ln2, "v_bias": lw.v_bias}
        precs: dict[str, Precision] = {n: module_precision(p + suf, recipe, group_size, arr[n].shape[1]) for n, (suf, _) in LINEARS.items()}
        res = AwqResult()
        if use_awq:
            arr, res = awq_layer(arr, acts, precs, spec.n_heads, spec.n_kv_heads)
            alphas[str(i)] = res.alphas
        clips: dict[str, np.ndarray | None] = {}
        for n, (suf, point) in LINEARS.items():
            if use_awq and clip and precs[n].kind == "int4" and n not in NO_CLIP:
                col = res.col.get(n)
                x_scaled = acts[point] / col[None, :] if col is not None else acts[point]
                clips[n] = search_clip(x_scaled, arr[n], precs[n].group_size)
            else:
                clips[n] = None
        qts = _gptq_layer(arr, acts, precs, res, clips, gptq_config) if use_gptq else {}
        w_effs: dict[str, np.ndarray] = {}
        for n, (suf, point) in LINEARS.items():
            w_scaled = arr[n]
            prec = precs[n]
            col = res.col.get(n)
            row = res.row.get(n)
            clip_r = clips[n]
            if n in qts:
                put({p + suf + ".qweight": qts[n].qweight, p + suf + ".scales": qts[n].scales})
            else:
                put(quantize_linear(p + suf, w_scaled, prec, clip_r))
            if recipe != "fp32":
                w_eff = qts[n].dequantize() if n in qts else fake_quant(w_scaled, prec, clip_r)
                w_effs[n] = w_eff
                if col is not None:  # back to the float basis: W_eff = deq * row / col
                    w_eff = w_eff * row[:, None] / col[None, :]
                x = acts[point] if acts is not None else None
                w_float = getattr(lw, n)
                scaled = use_awq and (not np.all(col == 1) or not np.all(row == 1))
                errors.append(linear_error(p + suf, prec.kind, w_float, w_eff, x, awq=bool(scaled)))
        # norms (AWQ-scaled ln1/ln2), the architecture's other norms and the (v-scaled) biases
        folded = LayerWeights(ln1=arr["ln1"], ln2=arr["ln2"], q_bias=lw.q_bias, k_bias=lw.k_bias, v_bias=arr["v_bias"],
                              norms=lw.norms, **{n: arr[n] for n in LINEARS})
        put({name: np.asarray(t).astype(dt) for name, t in folded.tensors(spec, i).items()})
        if hidden_in is not None:  # advance the calibration states through the QUANTIZED layer
            qlw = LayerWeights(ln1=arr["ln1"], ln2=arr["ln2"], q_bias=lw.q_bias, k_bias=lw.k_bias, v_bias=arr["v_bias"],
                               norms=lw.norms, **{n: w_effs[n] for n in LINEARS})
            acts_runner.hidden = [layer_forward(spec, i, qlw, h, rope) for h, rope in zip(hidden_in, acts_runner.rope)]
        if on_layer:
            on_layer(i)

    # Embeddings, final norm, LM head (policy: head int8 under int4/int8; a tied head becomes a
    # separate quantized copy of the embedding table; fp16/fp32 tied heads are not duplicated),
    # HEAD_BLOCK_ROWS rows at a time; a tied table is read once for both.
    emb_name = "model.embed_tokens.weight"
    head_name = "lm_head.weight" if has_linear(weights, "lm_head") else emb_name  # as reference.lm_head_weight
    hprec = module_precision("lm_head", recipe, group_size, spec.hidden_size)
    store_head = hprec.kind in ("int8", "int4") or not spec.tie_embeddings
    x = None
    if recipe != "fp32" and acts_runner is not None:
        x = acts_runner.final_normed(weights["model.norm.weight"])
    err = RowBlockError("lm_head", hprec.kind, x) if recipe != "fp32" else None
    emb_out = np.empty(tensor_shape(weights, emb_name), dt)
    head_out: dict[str, np.ndarray] = {}
    n_rows = emb_out.shape[0]  # the head's too: both are [vocab, hidden] (edge.models.hf.check_weights)
    for r0 in range(0, n_rows, HEAD_BLOCK_ROWS):
        rows = slice(r0, r0 + HEAD_BLOCK_ROWS)
        emb = read_rows(weights, emb_name, rows)  # float32 [rows, H]
        emb_out[rows] = emb.astype(dt)
        head = emb if head_name == emb_name else read_rows(weights, head_name, rows)
        if store_head:
            for name, t in quantize_linear("lm_head", head, hprec).items():  # every part is [N, ...]
                if name not in head_out:
                    head_out[name] = np.empty((n_rows, *t.shape[1:]), t.dtype)
                head_out[name][rows] = t
        if err is not None:
            err.add(head, fake_quant(head, hprec))
    put({emb_name: emb_out, "model.norm.weight": np.asarray(weights["model.norm.weight"]).astype(dt)} | head_out)
    del emb_out, head_out
    if err is not None:
        errors.append(err.result())
    if on_layer:
        on_layer(spec.n_layers)
    return QuantResult(out, QuantReport(errors), alphas)
