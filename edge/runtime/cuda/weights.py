"""Loading a bundle's weights onto the GPU for the CUDA session: fused linears (q|k|v, gate|up)
with their rows reordered for the fused epilogues (layout.qkv_row_order / gu_row_order), int4
words repacked for the dequantization trick, norms and the embedding in fp16. A session in the fp32 compute mode (act_dtype float32,
edge.runtime.cuda.fp32) gets every array in float32, each linear one float32 [N, K] weight
(int4 / int8 ones dequantized: the numbers the numpy reference computes with).

Norms per the architecture's features (edge.models.arch.layer_norm_names): "ln1" / "ln2" before
attention / the MLP, "post_attn" / "post_mlp" after them (sandwich norms; None otherwise),
"q_norm" / "k_norm" per head (qk_norm; None otherwise), in the paired row order of the qkv
weight (layout.head_pair_order)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edge.errors import BackendError
from edge.models.arch import layer_norm_names
from edge.quant.format import read_linear
from edge.runtime.cuda.layout import Linear, gu_row_order, head_pair_order, host_linear, qkv_row_order


def load_weights(sess, w: dict[str, np.ndarray]) -> None:
    cp, spec = sess.cp, sess.spec
    sess.weight_bytes = 0
    fdt = np.dtype(sess.act_dtype)  # float16, or float32 in the fp32 compute mode

    def h(name: str, perm: np.ndarray | None = None) -> Any:
        a = w[name].astype(fdt, copy=False)
        a = cp.asarray(a[perm] if perm is not None else a)
        sess.weight_bytes += int(a.nbytes)
        return a

    def linear(names: list[str], bias_names: list[str] | None = None, perm: np.ndarray | None = None) -> Linear:
        if fdt == np.float32:
            return linear_f32(names, bias_names, perm)
        parts = [host_linear(w, n) for n in names]
        kinds = {(p[0], p[3]) for p in parts}
        if len(kinds) != 1:
            raise BackendError(f"{names}: mixed precisions {sorted(kinds)} cannot be fused", fix="rebuild the bundle with one recipe")
        kind, k, g = parts[0][0], parts[0][4], parts[0][3]
        q = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        s = (np.concatenate([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]) if kind != "fp16" else None
        if perm is not None:  # output rows reordered (see qkv_row_order / gu_row_order)
            q = q[perm]
            s = s[perm] if s is not None else None
        n = q.shape[0]
        if kind == "int4":
            if k % 32:
                raise BackendError(f"{names[0]}: in_features {k} not a multiple of 32")
            raw = cp.asarray(q).view(cp.uint32)  # [N, K/8]
            qd = cp.empty_like(raw)
            cnt = raw.size
            sess.k["repack_int4"](((cnt + 255) // 256,), (256,), (raw, qd, np.int64(cnt)))
            del raw
            lin = Linear("int4", n, k, qd, cp.asarray(s), int(math.log2(g)))
        elif kind == "int8":
            if k % 16:
                raise BackendError(f"{names[0]}: in_features {k} not a multiple of 16")
            lin = Linear("int8", n, k, cp.asarray(q), cp.asarray(s))
        else:
            if k % 8:
                raise BackendError(f"{names[0]}: in_features {k} not a multiple of 8")
            lin = Linear("fp16", n, k, cp.asarray(q.astype(np.float16, copy=False)), None)
        if bias_names and all(bn in w for bn in bias_names):
            bias = np.concatenate([w[bn] for bn in bias_names]).astype(np.float16)
            lin.bias = cp.asarray(bias[perm] if perm is not None else bias)
        sess.weight_bytes += lin.nbytes
        return lin

    def linear_f32(names: list[str], bias_names: list[str] | None, perm: np.ndarray | None) -> Linear:
        q = np.concatenate([read_linear(w, n).dequantize() for n in names])
        q = q[perm] if perm is not None else q
        lin = Linear("fp32", q.shape[0], q.shape[1], cp.asarray(np.ascontiguousarray(q, dtype=np.float32)), None)
        if bias_names and all(bn in w for bn in bias_names):
            bias = np.concatenate([w[bn] for bn in bias_names]).astype(np.float32)
            lin.bias = cp.asarray(bias[perm] if perm is not None else bias)
        sess.weight_bytes += lin.nbytes
        return lin

    sess.embed = h("model.embed_tokens.weight")
    sess.weight_bytes -= int(sess.embed.nbytes)  # bytes a token reads: the table only as a tied head
    f = spec.features
    norms = layer_norm_names(f)
    pair = head_pair_order(spec.head_dim)
    qkv_perm = qkv_row_order(spec.n_heads, spec.n_kv_heads, spec.head_dim)
    gu_perm = gu_row_order(spec.intermediate_size)
    sess.layers = []
    roles = {"qkv": "rope", "o": "res", "gu": "glu", "down": "res"}
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        sess.layers.append(
            {
                "ln1": h(p + norms["attn_in"] + ".weight"),
                "ln2": h(p + norms["mlp_in"] + ".weight"),
                "post_attn": h(p + norms["attn_out"] + ".weight") if "attn_out" in norms else None,
                "post_mlp": h(p + norms["mlp_out"] + ".weight") if "mlp_out" in norms else None,
                "q_norm": h(a + "q_norm.weight", pair) if f.qk_norm else None,
                "k_norm": h(a + "k_norm.weight", pair) if f.qk_norm else None,
                "qkv": linear([a + "q_proj", a + "k_proj", a + "v_proj"], [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"], qkv_perm),
                "o": linear([a + "o_proj"]),
                "gu": linear([p + "mlp.gate_proj", p + "mlp.up_proj"], perm=gu_perm),
                "down": linear([p + "mlp.down_proj"]),
            }
        )
    for L in sess.layers:
        for key, role in roles.items():
            L[key].role = role
    sess.norm = h("model.norm.weight")
    if "lm_head.qweight" in w or "lm_head.weight" in w:
        sess.lm_head = linear(["lm_head"])
    else:  # tied, fp16 recipe: the embedding table is the head
        sess.lm_head = Linear("fp32" if fdt == np.float32 else "fp16", spec.vocab_size, spec.hidden_size, sess.embed, None)
        sess.weight_bytes += int(sess.embed.nbytes)
