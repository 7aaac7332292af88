"""Decoder ONNX graphs built straight from bundle-form weights (no torch.onnx export), two forms:

form "ort" -> model.ort.onnx, ONNX Runtime contrib ops, for CPU speed:
    inputs   input_ids int64 [batch, sequence]
             seqlens_k int32 [batch]              cached + new tokens - 1, per sequence
             total_sequence_length int32 []       max over the batch of cached + new tokens
             past_key_values.{i}.key|value f32 [batch, kv_heads, max_context, head_dim]
    outputs  logits f32 [batch, vocab]            last position only
             present.{i}.key|value                the SAME buffers (bound in place, IOBinding)
  MatMulNBits (int4: bits 4; int8: bits 8 with the per-channel scale repeated over blocks),
  GroupQueryAttention with packed QKV, do_rotary (cos/sin caches precomputed, llama3 scaling
  included) and a max_context-sized KV buffer shared between past and present,
  SkipSimplifiedLayerNormalization carrying the residual stream.

form "trt" -> model.trt.onnx, standard ops only (opset 21), what TensorRT 10.3 parses:
    inputs   input_ids int64 [batch, sequence], position_ids int64 [batch, sequence],
             attention_mask int64 [batch, total_sequence]  (left padding: 0 = pad)
             past_key_values.{i}.key|value f32 [batch, kv_heads, past_sequence, head_dim]
    outputs  logits f32 [batch, vocab] (last position), present.{i}.key|value (Concat of past + new)
  INT4 weights as block-wise DequantizeLinear (int4 initializer [K, N], axis 0, block_size g,
  zero point 0), INT8 as DequantizeLinear per output channel, explicit RoPE, RMSNorm and
  softmax attention with a mask built once from attention_mask.

Both forms compute in float32 (ORT CPU's fast kernels are fp32/int8; TensorRT lowers precision
itself when its FP16 flag is set). Weight layouts are edge.quant.format's: a linear `L` is
`L.weight` (float, [N, K]) or `L.qweight` + `L.scales`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from edge.build.onnx_graph import Graph, TensorProto, save_model
from edge.bundle import Quant
from edge.errors import ModelError
from edge.models.arch import layer_norm_names
from edge.models.rope import max_rope_positions, rope_tables
from edge.models.spec import ModelSpec
from edge.quant.format import BundleLinear as Linear
from edge.quant.format import has_linear, read_linear, unpack_int4

FORMS = {"ort": "model.ort.onnx", "trt": "model.trt.onnx"}

# MatMulNBits accuracy_level 4: activations quantized to int8 per block, int8 dot products
# (AVX512-VNNI / AVX-VNNI / NEON dot). Measured on SmolLM2-135M int4-g64 (2-core EPYC, 1 thread):
# decode 162 tok/s at level 4 vs 6.8 tok/s at level 0 (fp32 activations; the 8-bit head has no
# fast fp32 path), prefill 745 vs 462 tok/s. Quality: tests check level 4 against the exact
# dequantized reference (same top token at >= 80% of positions, logits within 10%); level 1
# (fp32 activations) is exact and stays available for comparisons (the tests use it).
DEFAULT_ACCURACY_LEVEL = 4
MAX_ROPE_CACHE = 32768  # positions in the cos/sin caches unless max_context says otherwise


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def get_linear(weights: dict[str, np.ndarray], prefix: str) -> Linear:
    """The linear `prefix` (HF module name) from bundle-form weights (edge.quant.format.read_linear),
    float weights and scales as float32 (what the graphs compute in)."""
    lin = read_linear(weights, prefix)
    if lin.kind == "fp":
        return replace(lin, weight=np.asarray(lin.weight, dtype=np.float32))
    return replace(lin, scales=lin.scales.astype(np.float32))


def fuse_linears(parts: list[Linear]) -> Linear | None:
    """Concatenate linears along N (q|k|v, gate|up) when they share kind, K and group size."""
    a = parts[0]
    if any(p.kind != a.kind or p.k != a.k or p.group_size != a.group_size for p in parts):
        return None
    n = sum(p.n for p in parts)
    name = "+".join(p.name for p in parts)
    if a.kind == "fp":
        return Linear(name, "fp", n, a.k, weight=np.concatenate([p.weight for p in parts]))
    return Linear(name, a.kind, n, a.k, qweight=np.concatenate([p.qweight for p in parts]), scales=np.concatenate([p.scales for p in parts]), group_size=a.group_size)


def _f32(weights: dict[str, np.ndarray], name: str) -> np.ndarray:
    return np.asarray(weights[name], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# shared subgraphs
# ---------------------------------------------------------------------------------------------
_ELEM = {"F32": TensorProto.FLOAT, "F16": TensorProto.FLOAT16, "I8": TensorProto.INT8, "U8": TensorProto.UINT8}


def _stored_inputs(g: Graph, lin: Linear, bs: int) -> tuple[str, str] | None:
    """MatMulNBits' B and scales as ops over the bundle's own tensors (external data into
    weights.safetensors), folded by ONNX Runtime at load; None when the weights are not stored.

        int4: B = Concat(qweight_i viewed [n_i, K/g, g/2]),       scales = Cast<f32>(Concat(scales_i))
        int8: B = BitwiseXor(Concat(qweight_i as uint8), 0x80)  (= q + 128),  scales = Expand(Cast<f32>(s), [N, K/b])
    (parts i: the linears a fused one was made of, q|k|v or gate|up)
    """
    parts = lin.name.split("+")
    if not all(p + ".qweight" in g.stored for p in parts):
        return None
    bs_, ss = [], []
    for p in parts:
        n_i = g.stored[p + ".qweight"].shape[0]
        if lin.kind == "int4":
            bs_.append(g.external(p + ".qweight", TensorProto.UINT8, [n_i, lin.k // bs, bs // 2]))
        else:
            bs_.append(g.external(p + ".qweight", TensorProto.UINT8, [n_i, lin.k // bs, bs]))
        st = g.stored[p + ".scales"]
        ss.append(g.external(p + ".scales", _ELEM[st.dtype], [n_i, lin.k // bs] if lin.kind == "int4" else [n_i, 1]))
    b = bs_[0] if len(bs_) == 1 else g.op("Concat", bs_, name="stored/B/Concat", axis=0)
    s = ss[0] if len(ss) == 1 else g.op("Concat", ss, name="stored/scales/Concat", axis=0)
    s = g.op("Cast", [s], name="stored/scales/Cast", to=TensorProto.FLOAT)
    if lin.kind == "int8":
        b = g.op("BitwiseXor", [b, g.const(np.uint8(0x80))], name="stored/B/Offset")
        s = g.op("Expand", [s, g.const([lin.n, lin.k // bs], np.int64)], name="stored/scales/Expand")
    return b, s


def _stored_fp(g: Graph, lin: Linear) -> str | None:
    """W.T float32 [K, N] as Cast(Transpose(Concat(weight_i))) over the stored weights (folded at load)."""
    parts = lin.name.split("+")
    if not all(p + ".weight" in g.stored for p in parts):
        return None
    ws = [g.external(p + ".weight", _ELEM[g.stored[p + ".weight"].dtype], list(g.stored[p + ".weight"].shape)) for p in parts]
    w = ws[0] if len(ws) == 1 else g.op("Concat", ws, name="stored/W/Concat", axis=0)
    w = g.op("Transpose", [w], name="stored/W/Transpose", perm=[1, 0])
    return g.op("Cast", [w], name="stored/W/Cast", to=TensorProto.FLOAT) if g.stored[parts[0] + ".weight"].dtype != "F32" else w


def linear_ort(g: Graph, x: str, lin: Linear, name: str, accuracy_level: int, bias: np.ndarray | None = None) -> str:
    """y = x @ W.T (+ b) with ORT's kernels.

        fp:   x ─ MatMul(W.T f32 [K, N])
        int4: x ─ MatMulNBits(B uint8 [N, K/g, g/2], scales f32 [N, K/g], bits 4, zero point 8)
        int8: x ─ MatMulNBits(B uint8 [N, K/b, b] = q + 128, scales [N, K/b] = s[n] per block, bits 8)
    B, scales and W come from the bundle's weights file when the graph is built into a bundle
    (_stored_inputs / _stored_fp), else from copies of the arrays.
    """
    with g.scope(name):
        if lin.kind == "fp":
            w = _stored_fp(g, lin) or g.weight(g.param("weight"), lin.weight.T)
            y = g.op("MatMul", [x, w], name="MatMul")
        else:
            if lin.kind == "int4":
                bs, bits = lin.group_size, 4
                b = lin.qweight.reshape(lin.n, lin.k // bs, bs // 2)
                s = lin.scales.reshape(lin.n, lin.k // bs)
            else:
                bs = next((b for b in (128, 64, 32, 16) if lin.k % b == 0), None)
                if bs is None:
                    raise ModelError(f"{name}: in_features {lin.k} is not a multiple of 16, MatMulNBits cannot take it")
                bits = 8
                b = (lin.qweight.astype(np.int16) + 128).astype(np.uint8).reshape(lin.n, lin.k // bs, bs)
                s = np.repeat(lin.scales[:, None], lin.k // bs, axis=1)
            stored = _stored_inputs(g, lin, bs)
            bw, sw = stored or (g.weight(g.param("qweight"), b), g.weight(g.param("scales"), s.astype(np.float32)))
            y = g.ms("MatMulNBits", [x, bw, sw], name="MatMulNBits", K=lin.k, N=lin.n, bits=bits, block_size=bs, accuracy_level=accuracy_level)
        if bias is not None:
            y = g.op("Add", [y, g.weight(g.param("bias"), bias.astype(np.float32))], name="BiasAdd")
    return y


def linear_trt(g: Graph, x: str, lin: Linear, name: str, bias: np.ndarray | None = None) -> str:
    """y = x @ W.T (+ b) with standard ops; quantized weights stay quantized in the file.

        fp:   x ─ MatMul(W.T f32 [K, N])
        int4: DequantizeLinear(int4 [K, N], scale f32 [K/g, N], axis 0, block_size g) ─ MatMul
        int8: DequantizeLinear(int8 [K, N], scale f32 [N], axis 1) ─ MatMul
    """
    with g.scope(name):
        if lin.kind == "fp":
            w = g.weight(g.param("weight"), lin.weight.T)
        elif lin.kind == "int4":
            q = g.weight_int4(g.param("qweight"), unpack_int4(lin.qweight).T)  # [K, N] in [-8, 7]
            s = g.weight(g.param("scales"), np.ascontiguousarray(lin.scales.reshape(lin.n, -1).T))
            w = g.op("DequantizeLinear", [q, s], name="DequantizeLinear", axis=0, block_size=lin.group_size)
        else:
            q = g.weight(g.param("qweight"), np.ascontiguousarray(lin.qweight.T))
            w = g.op("DequantizeLinear", [q, g.weight(g.param("scales"), lin.scales)], name="DequantizeLinear", axis=1)
        y = g.op("MatMul", [x, w], name="MatMul")
        if bias is not None:
            y = g.op("Add", [y, g.weight(g.param("bias"), bias.astype(np.float32))], name="BiasAdd")
    return y


def embedding(g: Graph, ids: str, table: np.ndarray) -> str:
    """ids [B, S] ─ Gather(table [V, H]) ─ (Cast f32 if the table is fp16) -> [B, S, H]."""
    with g.scope("model/embed_tokens"):
        st = g.stored.get("model.embed_tokens.weight")
        shared = st is not None and st.dtype == {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}.get(table.dtype)
        w = (g.external("model.embed_tokens.weight", _ELEM[st.dtype], list(st.shape), name="model.embed_tokens.weight") if shared
             else g.weight("model.embed_tokens.weight", table))
        x = g.op("Gather", [w, ids], name="Gather", axis=0)
        if table.dtype != np.float32:
            x = g.op("Cast", [x], name="Cast", to=TensorProto.FLOAT)
    return x


def embedding_quantized(g: Graph, ids: str, head: Linear) -> str:
    """Tied model, quantized head: gather rows of the head's own int4/int8 data, no fp16 table.

        ids [B, S] ─ GatherBlockQuantized(uint8 [V, H/2] (int4) | [V, H] (int8, q + 128), scales [V, H/b]) -> [B, S, H]

    One quantized copy serves both ends of the model: for SmolLM2-135M that drops the 56 MB fp16
    table from memory (the head's MatMulNBits keeps its own prepacked copy).
    """
    with g.scope("model/embed_tokens"):
        if head.kind == "int4":
            data, scales, bits, bs = head.qweight, head.scales.reshape(head.n, -1), 4, head.group_size
        else:
            bs = next(b for b in (128, 64, 32, 16) if head.k % b == 0)
            data = (head.qweight.astype(np.int16) + 128).astype(np.uint8)
            scales, bits = np.repeat(head.scales[:, None], head.k // bs, axis=1), 8
        stored = _stored_inputs(g, head, bs) if "lm_head.qweight" in g.stored else None
        if stored is not None:  # [V, H/b, b(/2)] -> [V, H(/2)]
            width = head.k // 2 if head.kind == "int4" else head.k
            data = g.op("Reshape", [stored[0], g.const([head.n, width], np.int64)], name="stored/Reshape")
            return g.ms("GatherBlockQuantized", [data, ids, stored[1]], name="GatherBlockQuantized", bits=bits, block_size=bs, gather_axis=0, quantize_axis=1)
        return g.ms("GatherBlockQuantized", [g.weight(g.param("qweight"), data), ids, g.weight(g.param("scales"), scales.astype(np.float32))],
                    name="GatherBlockQuantized", bits=bits, block_size=bs, gather_axis=0, quantize_axis=1)


def last_position(g: Graph, x: str, hidden: int) -> str:
    """[B, S, H] -> [B, H]: only the last position's logits are ever needed."""
    with g.scope("model/last_position"):
        y = g.op("Slice", [x, g.const([-1], np.int64), g.const([np.iinfo(np.int64).max], np.int64), g.const([1], np.int64)], name="Slice")
        return g.op("Reshape", [y, g.const([-1, hidden], np.int64)], name="Reshape")


def lm_head(g: Graph, x: str, head: Linear | None, tied_table: str | None, emit_linear, int8_dynamic: bool = False) -> str:
    """[B, H] -> logits [B, V]. Tied float heads reuse the embedding initializer via Gemm(transB).

    int8_dynamic (ORT form, int8 head): DynamicQuantizeMatMul(x, B int8 [K, N], scale [N]), i.e.
    MLAS's int8 GEMM on the per-channel weights; measured ~35% faster than 8-bit MatMulNBits for
    SmolLM2's [576 x 49152] head at batch 1, and the head is ~25% of a decode step.
    """
    if head is None:
        with g.scope("lm_head"):
            return g.op("Gemm", [x, tied_table], name="Gemm", transB=1)
    if int8_dynamic and head.kind == "int8":
        with g.scope("lm_head"):
            if "lm_head.qweight" in g.stored:  # Transpose / Cast over the stored tensors, folded at load
                w = g.op("Transpose", [g.external("lm_head.qweight", TensorProto.INT8, [head.n, head.k])], name="stored/Transpose", perm=[1, 0])
                st = g.stored["lm_head.scales"]
                s = g.op("Cast", [g.external("lm_head.scales", _ELEM[st.dtype], [head.n])], name="stored/Cast", to=TensorProto.FLOAT)
            else:
                w = g.weight(g.param("qweight_kn"), np.ascontiguousarray(head.qweight.T))
                s = g.weight(g.param("scales"), head.scales.astype(np.float32))
            return row_quantized_matmul(g, x, w, s, head)
    return emit_linear(x, head, "lm_head")


def row_quantized_matmul(g: Graph, x: str, w: str, s: str, head: Linear) -> str:
    """DynamicQuantizeMatMul with each row's activations quantized over that row's own range.

        x [M, K] ─ (x - c) / h per row, c = (max + min) / 2, h = (max - min) / 2, clipped to [-1, 1]
          ─ Concat [1, -1, 0, ...] ─ DynamicQuantizeMatMul(w, s) ─ drop the last row
          ─ * h + c * colsum(W) -> [M, N]

    DynamicQuantizeMatMul quantizes its whole input with one scale and zero point, from the min and
    max over every row: a row's logits then depend on which other rows share the call (SmolLM2:
    up to 1.5 apart for 3 prompts together vs alone, argmax changed), so a batched answer could
    differ from the same request alone. Here every row spans at most [-1, 1] and the constant row
    spans it exactly, so the call's range, scale (2/255) and zero point are always the same and a
    row's logits depend on that row alone; each row keeps the resolution (max - min) / 255 that a
    row alone had. The cost is one GEMM row more and a few element-wise ops over [M, N]."""
    colsum = np.zeros(head.n, np.float64)  # sum over K of the dequantized weights, per output
    for r in range(0, head.n, 4096):
        q = np.asarray(head.qweight[r:r + 4096])
        colsum[r:r + 4096] = q.sum(axis=1, dtype=np.int64) * np.asarray(head.scales[r:r + 4096], np.float64)
    with g.scope("row_scaled"):
        axis = g.const([1], np.int64)
        hi = g.op("ReduceMax", [x, axis], name="ReduceMax", keepdims=1)
        lo = g.op("ReduceMin", [x, axis], name="ReduceMin", keepdims=1)
        half = g.const(np.array(0.5, np.float32))
        c = g.op("Mul", [g.op("Add", [hi, lo], name="Add"), half], name="Mid")
        h = g.op("Mul", [g.op("Sub", [hi, lo], name="Sub"), half], name="Half")
        h = g.op("Max", [h, g.const(np.array(1e-30, np.float32))], name="Max")  # a constant row: x - c = 0
        xn = g.op("Div", [g.op("Sub", [x, c], name="Center"), h], name="Div")
        xn = g.op("Clip", [xn, g.const(np.array(-1.0, np.float32)), g.const(np.array(1.0, np.float32))], name="Clip")
        unit = np.zeros((1, head.k), np.float32)
        unit[0, :2] = (1.0, -1.0)
        xd = g.op("Concat", [xn, g.const(unit)], name="Concat", axis=0)
        y = g.ms("DynamicQuantizeMatMul", [xd, w, s], name="DynamicQuantizeMatMul")
        y = g.op("Slice", [y, g.const([0], np.int64), g.const([-1], np.int64), g.const([0], np.int64)], name="Slice")
        shift = g.op("Mul", [c, g.const(colsum.astype(np.float32)[None, :])], name="Shift")
        return g.op("Add", [g.op("Mul", [y, h], name="Scale"), shift], name="Add_shift")


def int8_head_kernel(acc: int) -> str:
    """The ORT kernel of an int8 LM head at accuracy level `acc`, chosen for the building CPU.

    DynamicQuantizeMatMul (u8 activations x s8 weights, MLAS int8 GEMM) is the fast one but
    saturates on x86 without VNNI (edge.cpu: relative logit error 0.276 vs 0.018 on a tiny model);
    8-bit MatMulNBits quantizes activations to s8 and stays exact there (0.018 on both CPUs)."""
    from edge.cpu import u8s8_exact

    return "DynamicQuantizeMatMul" if acc == 4 and u8s8_exact() else "MatMulNBits"


def _head(weights: dict[str, np.ndarray], spec: ModelSpec) -> Linear | None:
    """The LM head, or None for a tied float head (Gemm on the embedding table)."""
    if has_linear(weights, "lm_head"):
        return get_linear(weights, "lm_head")
    if not spec.tie_embeddings:
        raise ModelError("weights lack lm_head and the model does not tie embeddings", fix="rebuild the bundle")
    return None


# ---------------------------------------------------------------------------------------------
# per-feature pieces both forms use (edge.models.arch.Features)
# ---------------------------------------------------------------------------------------------
def scale(g: Graph, x: str, factor: float, name: str) -> str:
    """x * factor (the embedding scale); nothing when factor is 1."""
    return x if factor == 1.0 else g.op("Mul", [x, g.const(np.float32(factor))], name=name)


def soft_cap(g: Graph, x: str, cap: float | None, name: str) -> str:
    """cap * tanh(x / cap); nothing when cap is None."""
    if cap is None:
        return x
    with g.scope(name):
        t = g.op("Tanh", [g.op("Div", [x, g.const(np.float32(cap))], name="Div")], name="Tanh")
        return g.op("Mul", [t, g.const(np.float32(cap))], name="Mul")


def activation(g: Graph, x: str, kind: str) -> str:
    """silu: x * Sigmoid(x); gelu_tanh: Gelu(approximate="tanh") (opset 20)."""
    if kind == "gelu_tanh":
        return g.op("Gelu", [x], name="act/Gelu", approximate="tanh")
    return g.op("Mul", [x, g.op("Sigmoid", [x], name="act/Sigmoid")], name="act/Mul")


def head_norm(g: Graph, x: str, w: dict, i: int, which: str, n_heads: int, d: int, eps: float) -> str:
    """qk-norm: [B,S,n*D] ─ Reshape [B,S,n,D] ─ RMSNorm(D) ─ Reshape [B,S,n*D]."""
    with g.scope(f"{which}_norm"):
        r = g.op("Reshape", [x, g.const([0, 0, n_heads, d], np.int64)], name="Reshape")
        y = rms_norm_trt(g, r, _f32(w, f"model.layers.{i}.self_attn.{which}_norm.weight"), f"model/layers.{i}/attn/{which}_norm", eps)
        return g.op("Reshape", [y, g.const([0, 0, n_heads * d], np.int64)], name="Flatten")


def layer_norm_weight(w: dict, i: int, spec: ModelSpec, role: str) -> tuple[np.ndarray, str]:
    suffix = layer_norm_names(spec.features)[role]
    return _f32(w, f"model.layers.{i}.{suffix}.weight"), f"model/layers.{i}/{suffix}"


def rope_cache_pair(spec: ModelSpec, n_pos: int, local: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [n_pos, D/2] (edge.models.rope; the local base on sliding layers)."""
    return rope_tables(spec, n_pos, local=local)


def _qkv(g: Graph, x: str, i: int, spec: ModelSpec, w: dict, emit_linear) -> tuple[str, list[int]]:
    """[B,S,H] ─ qkv_proj (fused when the three share a layout) (+ bias) -> [B,S,(nh+2kv)*D]."""
    p = f"model.layers.{i}.self_attn"
    lq, lk, lv = (get_linear(w, f"{p}.{n}_proj") for n in "qkv")
    bias = np.concatenate([_f32(w, f"{p}.{n}_proj.bias") for n in "qkv"]) if f"{p}.q_proj.bias" in w else None
    fused = fuse_linears([lq, lk, lv])
    if fused is not None:
        qkv = emit_linear(x, fused, "qkv_proj", bias)
    else:
        qkv = g.op("Concat", [emit_linear(x, l, f"{n}_proj", None) for l, n in zip((lq, lk, lv), "qkv")], name="qkv_concat", axis=-1)
        if bias is not None:
            qkv = g.op("Add", [qkv, g.weight(f"{p}.qkv_proj.bias", bias)], name="qkv_bias")
    return qkv, [lq.n, lk.n, lv.n]


# ---------------------------------------------------------------------------------------------
# ORT form
# ---------------------------------------------------------------------------------------------
def attention_ort(g: Graph, x: str, i: int, spec: ModelSpec, w: dict, acc: int, io: dict, rope: dict[bool, tuple[str, str]]) -> str:
    """One attention block, KV cache updated in place.

        x [B,S,H] ─ qkv_proj (MatMulNBits, N = q + 2 kv) (+ bias)
                  [─ Split ─ q_norm(q), k_norm(k)]        qk-norm models: q, k, v separately
                  ─ GroupQueryAttention(qkv | q,k,v, past k/v [B,kv,C,D], seqlens_k, total, cos, sin;
                                        do_rotary, scale, softcap, local_window_size on sliding layers)
                        ├─ present k/v (same buffers as past)
                  ─ o_proj -> [B,S,nh*D... H]
    """
    f = spec.features
    nh, nkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
    emit = lambda x_, lin, name, bias=None: linear_ort(g, x_, lin, name, acc, bias)  # noqa: E731
    with g.scope(f"model/layers.{i}/attn"):
        qkv, sizes = _qkv(g, x, i, spec, w, emit)
        if f.qk_norm:
            q, k, v = g.op("Split", [qkv, g.const(sizes, np.int64)], name="Split", n_out=3, axis=-1)
            qkv_in = [head_norm(g, q, w, i, "q", nh, d, spec.rms_eps), head_norm(g, k, w, i, "k", nkv, d, spec.rms_eps), v]
        else:
            qkv_in = [qkv, "", ""]
        cos, sin = rope[f.sliding(i)]
        # NOTE: local_window_size = sliding_window reproduces transformers' window (key j seen from
        # query q when q - window < j <= q) in prefill and decode (tests: window - 1 and + 1 both differ)
        attrs = {"local_window_size": spec.sliding_window if f.sliding(i) else -1}
        if f.attn_scale is not None:
            attrs["scale"] = float(f.attn_scale)
        if f.attn_softcap is not None:
            attrs["softcap"] = float(f.attn_softcap)
        out, pk, pv = g.ms("GroupQueryAttention",
                           [*qkv_in, io[f"past_key_values.{i}.key"], io[f"past_key_values.{i}.value"], "seqlens_k", "total_sequence_length", cos, sin],
                           name="GroupQueryAttention", n_out=3, num_heads=nh, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0, **attrs)
        g.output(pk, f"present.{i}.key", TensorProto.FLOAT, ["batch", nkv, "max_context", d])
        g.output(pv, f"present.{i}.value", TensorProto.FLOAT, ["batch", nkv, "max_context", d])
        return linear_ort(g, out, get_linear(w, f"model.layers.{i}.self_attn.o_proj"), "o_proj", acc)


def mlp(g: Graph, x: str, i: int, spec: ModelSpec, w: dict, emit_linear) -> str:
    """Gated MLP (SwiGLU / GeGLU per features.activation).

        x ─ gate_up_proj (N = 2I) ─ Split ─ gate ─ act ─ Mul(up) ─ down_proj
    """
    p = f"model.layers.{i}.mlp"
    lg, lu = get_linear(w, f"{p}.gate_proj"), get_linear(w, f"{p}.up_proj")
    fused = fuse_linears([lg, lu])
    with g.scope(f"model/layers.{i}/mlp"):
        if fused is not None:
            gu = emit_linear(x, fused, "gate_up_proj")
            gate, up = g.op("Split", [gu, g.const([lg.n, lu.n], np.int64)], name="Split", n_out=2, axis=-1)
        else:
            gate, up = emit_linear(x, lg, "gate_proj"), emit_linear(x, lu, "up_proj")
        h = g.op("Mul", [activation(g, gate, spec.features.activation), up], name="Mul")
        return emit_linear(h, get_linear(w, f"{p}.down_proj"), "down_proj")


def _skip_norm(g: Graph, x: str, residual: str, weight: np.ndarray, weight_name: str, scope: str, eps: float) -> tuple[str, str]:
    """(norm(x + residual), x + residual): ORT's fused residual add + RMSNorm."""
    with g.scope(scope):
        h, res = g.ms("SkipSimplifiedLayerNormalization", [x, residual, g.weight(weight_name, weight)],
                      name="SkipSimplifiedLayerNormalization", n_out=4, unused=(1, 2), epsilon=eps)[0::3]
    return h, res


def build_ort(spec: ModelSpec, w: dict[str, np.ndarray], acc: int, n_pos: int, stored: dict | None = None) -> Graph:
    """The contrib-op graph; the residual stream rides SkipSimplifiedLayerNormalization's sum output.

        embed (* scale) ─ RMSNorm ─ attn [─ RMSNorm] ─ SkipRMSNorm(+res) ─ mlp [─ RMSNorm] ─ SkipRMSNorm(+res, next ln1) ... ─ last ─ head [─ softcap]
        ([...]: sandwich-norm models)
    """
    f = spec.features
    g = Graph("edge_rag_decoder_ort", opset=21, ms_opset=1)
    g.stored = dict(stored or {})
    emit = lambda x, lin, name: linear_ort(g, x, lin, name, acc)  # noqa: E731
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    g.input("seqlens_k", TensorProto.INT32, ["batch"])
    g.input("total_sequence_length", TensorProto.INT32, [])
    io = {}
    for i in range(spec.n_layers):
        for kv in ("key", "value"):
            io[f"past_key_values.{i}.{kv}"] = g.input(f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch", spec.n_kv_heads, "max_context", spec.head_dim])
    rope = {False: tuple(g.weight(f"model.rotary.{n}_cache", t) for n, t in zip(("cos", "sin"), rope_cache_pair(spec, n_pos, False)))}
    rope[True] = rope[False]
    if f.rope_local_theta is not None:
        rope[True] = tuple(g.weight(f"model.rotary_local.{n}_cache", t) for n, t in zip(("cos", "sin"), rope_cache_pair(spec, n_pos, True)))

    head = _head(w, spec)
    if spec.tie_embeddings and head is not None and head.kind != "fp":
        x = embedding_quantized(g, ids, head)
    else:
        table = w["model.embed_tokens.weight"]
        # A tied float head shares the table with Gemm, which needs f32; otherwise keep fp16 (half the RAM).
        table = table.astype(np.float32) if head is None or table.dtype not in (np.float16, np.float32) else table
        x = embedding(g, ids, table)
    x = scale(g, x, f.embed_scale, "model/embed_tokens/Scale")
    eps = float(spec.rms_eps)
    names = layer_norm_names(f)
    # Standard ops (onnx.checker does not know ORT's SimplifiedLayerNormalization); ORT fuses them.
    wt, scope = layer_norm_weight(w, 0, spec, "attn_in")
    h = rms_norm_trt(g, x, wt, scope, eps)
    residual = x
    for i in range(spec.n_layers):
        a = attention_ort(g, h, i, spec, w, acc, io, rope)
        if "attn_out" in names:
            a = rms_norm_trt(g, a, *layer_norm_weight(w, i, spec, "attn_out"), eps)
        wt, scope = layer_norm_weight(w, i, spec, "mlp_in")
        h, residual = _skip_norm(g, a, residual, wt, scope.replace("model/", "model.").replace("/", ".") + ".weight", scope, eps)
        m = mlp(g, h, i, spec, w, emit)
        if "mlp_out" in names:
            m = rms_norm_trt(g, m, *layer_norm_weight(w, i, spec, "mlp_out"), eps)
        if i + 1 < spec.n_layers:
            wt, scope = layer_norm_weight(w, i + 1, spec, "attn_in")
        else:
            wt, scope = _f32(w, "model.norm.weight"), "model/norm"
        h, residual = _skip_norm(g, m, residual, wt, scope.replace("model/", "model.").replace("/", ".") + ".weight", scope, eps)
    last = last_position(g, h, spec.hidden_size)
    logits = lm_head(g, last, head, "model.embed_tokens.weight", emit, int8_dynamic=int8_head_kernel(acc) == "DynamicQuantizeMatMul")
    g.output(soft_cap(g, logits, f.final_softcap, "lm_head/softcap"), "logits", TensorProto.FLOAT, ["batch", spec.vocab_size])
    return g


# ---------------------------------------------------------------------------------------------
# TRT form
# ---------------------------------------------------------------------------------------------
def rms_norm_trt(g: Graph, x: str, weight: np.ndarray, name: str, eps: float) -> str:
    """x * 1/sqrt(mean(x^2) + eps) * w, standard ops (TensorRT fuses the pattern)."""
    with g.scope(name):
        ms = g.op("ReduceMean", [g.op("Mul", [x, x], name="Square"), g.const([-1], np.int64)], name="ReduceMean", keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(np.float32(eps))], name="AddEps")], name="Sqrt")], name="Reciprocal")
        return g.op("Mul", [g.op("Mul", [x, inv], name="Normalize"), g.weight(name.replace("/", ".") + ".weight", weight.astype(np.float32))], name="Scale")


def rotary_trt(g: Graph, x: str, cos: str, sin: str, half: int) -> str:
    """x [B,h,S,D] * cos + rotate_half(x) * sin; cos/sin [B,1,S,D]."""
    x1 = g.op("Slice", [x, g.const([0], np.int64), g.const([half], np.int64), g.const([-1], np.int64)], name="rope/x1")
    x2 = g.op("Slice", [x, g.const([half], np.int64), g.const([2 * half], np.int64), g.const([-1], np.int64)], name="rope/x2")
    rot = g.op("Concat", [g.op("Neg", [x2], name="rope/Neg"), x1], name="rope/Concat", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], name="rope/MulCos"), g.op("Mul", [rot, sin], name="rope/MulSin")], name="rope/Add")


def attention_trt(g: Graph, x: str, i: int, spec: ModelSpec, w: dict, ctx: dict) -> str:
    """Softmax attention with a Concat KV cache.

        x ─ qkv_proj ─ Split ─ q,k,v [─ q_norm, k_norm] ─ Reshape [B,S,h,D] ─ Transpose [B,h,S,D] ─ RoPE(q, k)
        past_k ─┐
              k ─ Concat(axis 2) = present_k [B,kv,T,D] ─ repeat kv->h ─ q·kᵀ·scale [─ softcap] + mask ─ Softmax ─ ·v
        ─ Transpose [B,S,h,D] ─ Reshape [B,S,h*D] ─ o_proj
        (mask and cos/sin: the sliding layers' own when the layer slides)
    """
    f = spec.features
    nh, nkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
    emit = lambda x_, lin, name, bias=None: linear_trt(g, x_, lin, name, bias)  # noqa: E731
    local = f.sliding(i)
    cos, sin = (ctx["cos_local"], ctx["sin_local"]) if local else (ctx["cos"], ctx["sin"])
    with g.scope(f"model/layers.{i}/attn"):
        qkv, sizes = _qkv(g, x, i, spec, w, emit)
        q, k, v = g.op("Split", [qkv, g.const(sizes, np.int64)], name="Split", n_out=3, axis=-1)
        if f.qk_norm:
            q, k = head_norm(g, q, w, i, "q", nh, d, spec.rms_eps), head_norm(g, k, w, i, "k", nkv, d, spec.rms_eps)

        def heads(t: str, n: int, tag: str) -> str:  # [B,S,n*D] -> [B,n,S,D]
            r = g.op("Reshape", [t, g.const([0, 0, n, d], np.int64)], name=f"{tag}/Reshape")
            return g.op("Transpose", [r], name=f"{tag}/Transpose", perm=[0, 2, 1, 3])

        with g.scope("q"):
            q = rotary_trt(g, heads(q, nh, "heads"), cos, sin, d // 2)
        with g.scope("k"):
            k = rotary_trt(g, heads(k, nkv, "heads"), cos, sin, d // 2)
        v = heads(v, nkv, "v/heads")
        pk = g.op("Concat", [f"past_key_values.{i}.key", k], name="k/Concat", axis=2)
        pv = g.op("Concat", [f"past_key_values.{i}.value", v], name="v/Concat", axis=2)
        shape = ["batch", nkv, "total_sequence", d]
        g.output(pk, f"present.{i}.key", TensorProto.FLOAT, shape)
        g.output(pv, f"present.{i}.value", TensorProto.FLOAT, shape)
        if nh != nkv:  # [B,kv,T,D] -> [B,kv,1,T,D] -> Expand [B,kv,r,T,D] -> [B,h,T,D]
            def repeat(t: str, tag: str) -> str:
                u = g.op("Unsqueeze", [t, g.const([2], np.int64)], name=f"{tag}/Unsqueeze")
                shp = g.op("Shape", [u], name=f"{tag}/Shape")
                tgt = g.op("Mul", [shp, g.const([1, 1, nh // nkv, 1, 1], np.int64)], name=f"{tag}/RepShape")
                e = g.op("Expand", [u, tgt], name=f"{tag}/Expand")
                return g.op("Reshape", [e, g.const([0, nh, -1, d], np.int64)], name=f"{tag}/Reshape")

            pk_r, pv_r = repeat(pk, "k/repeat"), repeat(pv, "v/repeat")
        else:
            pk_r, pv_r = pk, pv
        kt = g.op("Transpose", [pk_r], name="k/TransposeT", perm=[0, 1, 3, 2])
        sc = f.attn_scale if f.attn_scale is not None else 1.0 / np.sqrt(d)
        s = g.op("Mul", [g.op("MatMul", [q, kt], name="QK/MatMul"), g.const(np.float32(sc))], name="QK/Scale")
        s = soft_cap(g, s, f.attn_softcap, "QK/softcap")
        pr = g.op("Softmax", [g.op("Add", [s, ctx["mask_local" if local else "mask"]], name="QK/AddMask")], name="Softmax", axis=-1)
        o = g.op("MatMul", [pr, pv_r], name="PV/MatMul")
        o = g.op("Reshape", [g.op("Transpose", [o], name="out/Transpose", perm=[0, 2, 1, 3]), g.const([0, 0, nh * d], np.int64)], name="out/Reshape")
        return linear_trt(g, o, get_linear(w, f"model.layers.{i}.self_attn.o_proj"), "o_proj")


def trt_context(g: Graph, spec: ModelSpec, n_pos: int) -> dict[str, str]:
    """Once per graph: cos/sin for the positions [B,1,S,D] and the additive mask [B,1,S,T]
    (and the sliding layers' own when the model has them).

        allowed[b,i,j] = (j < T - S + i + 1) and attention_mask[b, j]     [and j >= T - S + i + 1 - window]
        mask = allowed ? 0 : -1e9
    """
    f = spec.features

    def tables(local: bool, tag: str) -> tuple[str, str]:
        cos, sin = rope_cache_pair(spec, n_pos, local)
        with g.scope(f"model/{tag}"):
            full_cos = g.weight(f"model.{tag}.cos_cache", np.concatenate([cos, cos], axis=1))  # [P, D]
            full_sin = g.weight(f"model.{tag}.sin_cache", np.concatenate([sin, sin], axis=1))
            c = g.op("Unsqueeze", [g.op("Gather", [full_cos, "position_ids"], name="cos/Gather", axis=0), g.const([1], np.int64)], name="cos/Unsqueeze")
            s = g.op("Unsqueeze", [g.op("Gather", [full_sin, "position_ids"], name="sin/Gather", axis=0), g.const([1], np.int64)], name="sin/Unsqueeze")
        return c, s

    out = dict(zip(("cos", "sin"), tables(False, "rotary")))
    out["cos_local"], out["sin_local"] = tables(True, "rotary_local") if f.rope_local_theta is not None else (out["cos"], out["sin"])
    with g.scope("model/mask"):
        seq = g.op("Shape", ["input_ids"], name="seq/Shape", start=1, end=2)  # [1] = S
        tot = g.op("Shape", ["attention_mask"], name="total/Shape", start=1, end=2)  # [1] = T
        zero, one = g.const(0, np.int64), g.const(1, np.int64)
        s0 = g.op("Squeeze", [seq], name="seq/Squeeze")
        t0 = g.op("Squeeze", [tot], name="total/Squeeze")
        rows = g.op("Range", [zero, s0, one], name="rows/Range")  # [S]
        cols = g.op("Range", [zero, t0, one], name="cols/Range")  # [T]
        limit = g.op("Add", [rows, g.op("Add", [g.op("Sub", [t0, s0], name="past/Sub"), one], name="limit/Add1")], name="limit/Add")  # [S]
        cols2 = g.op("Unsqueeze", [cols, g.const([0], np.int64)], name="cols/Unsqueeze")  # [1,T]
        limit2 = g.op("Unsqueeze", [limit, g.const([1], np.int64)], name="limit/Unsqueeze")  # [S,1]
        causal = g.op("Less", [cols2, limit2], name="causal/Less")  # [S,T]
        pad = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const([1, 2], np.int64)], name="pad/Unsqueeze")], name="pad/Cast", to=TensorProto.BOOL)
        allowed = g.op("And", [causal, pad], name="And")  # [B,1,S,T]
        out["mask"] = g.op("Where", [allowed, g.const(np.float32(0.0)), g.const(np.float32(-1e9))], name="Where")
        out["mask_local"] = out["mask"]
        if "sliding" in f.layer_types:
            start = g.op("Sub", [limit2, g.const(np.int64(spec.sliding_window))], name="window/Sub")  # [S,1]
            inside = g.op("GreaterOrEqual", [cols2, start], name="window/GreaterOrEqual")  # [S,T]
            local = g.op("And", [allowed, inside], name="window/And")
            out["mask_local"] = g.op("Where", [local, g.const(np.float32(0.0)), g.const(np.float32(-1e9))], name="window/Where")
    return out


def build_trt(spec: ModelSpec, w: dict[str, np.ndarray], n_pos: int) -> Graph:
    """The standard-op graph: embed (* scale) ─ (RMSNorm ─ attn [─ RMSNorm] ─ +res ─ RMSNorm ─ mlp [─ RMSNorm] ─ +res) x L ─ RMSNorm ─ last ─ head [─ softcap]."""
    f = spec.features
    g = Graph("edge_rag_decoder_trt", opset=21)
    emit = lambda x, lin, name: linear_trt(g, x, lin, name)  # noqa: E731
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    g.input("position_ids", TensorProto.INT64, ["batch", "sequence"])
    g.input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
    for i in range(spec.n_layers):
        for kv in ("key", "value"):
            g.input(f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch", spec.n_kv_heads, "past_sequence", spec.head_dim])
    ctx = trt_context(g, spec, n_pos)
    head = _head(w, spec)
    table = w["model.embed_tokens.weight"]
    table = table.astype(np.float32) if head is None or table.dtype not in (np.float16, np.float32) else table
    x = scale(g, embedding(g, ids, table), f.embed_scale, "model/embed_tokens/Scale")
    eps = float(spec.rms_eps)
    names = layer_norm_names(f)
    for i in range(spec.n_layers):
        h = rms_norm_trt(g, x, *layer_norm_weight(w, i, spec, "attn_in"), eps)
        a = attention_trt(g, h, i, spec, w, ctx)
        if "attn_out" in names:
            a = rms_norm_trt(g, a, *layer_norm_weight(w, i, spec, "attn_out"), eps)
        x = g.op("Add", [x, a], name=f"model/layers.{i}/attn_residual/Add")
        h = rms_norm_trt(g, x, *layer_norm_weight(w, i, spec, "mlp_in"), eps)
        m = mlp(g, h, i, spec, w, emit)
        if "mlp_out" in names:
            m = rms_norm_trt(g, m, *layer_norm_weight(w, i, spec, "mlp_out"), eps)
        x = g.op("Add", [x, m], name=f"model/layers.{i}/mlp_residual/Add")
    last = last_position(g, x, spec.hidden_size)
    h = rms_norm_trt(g, last, _f32(w, "model.norm.weight"), "model/norm", eps)
    logits = lm_head(g, h, head, "model.embed_tokens.weight", emit)
    g.output(soft_cap(g, logits, f.final_softcap, "lm_head/softcap"), "logits", TensorProto.FLOAT, ["batch", spec.vocab_size])
    return g


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def build_decoder_onnx(spec: ModelSpec, weights: dict[str, np.ndarray], quant: Quant, out_dir: Path, form: str, *,
                       max_context: int | None = None, accuracy_level: int | None = None, stored: dict | None = None) -> Path:
    """Write `model.ort.onnx` (form "ort") or `model.trt.onnx` (form "trt") into `out_dir`.

    weights: bundle form (edge.quant.format); quant: the manifest's Quant (recipe, group size).
    max_context bounds the RoPE caches (default: the model's max_position, at most 32768).
    accuracy_level: MatMulNBits' (ORT form), default DEFAULT_ACCURACY_LEVEL.
    stored: where `weights` lie in the bundle's weights file (edge.bundle.weights_index; the file
    sits next to the graph): the ORT form then references those bytes as external data, and the
    bundle holds each weight once (ONNX Runtime folds the layout changes when it loads).
    """
    if form not in FORMS:
        raise ValueError(f"form {form!r} not in {tuple(FORMS)}")
    gs = int(quant.group_size)
    acc = int(accuracy_level if accuracy_level is not None else (quant.accuracy_level if quant.accuracy_level is not None else DEFAULT_ACCURACY_LEVEL))
    n_pos = int(max_context or min(spec.max_position, MAX_ROPE_CACHE, max_rope_positions(spec) or MAX_ROPE_CACHE))
    g = build_ort(spec, weights, acc, n_pos, stored) if form == "ort" else build_trt(spec, weights, n_pos)
    model = g.to_model()
    meta = {"max_context": str(n_pos), "form": form, "recipe": quant.recipe, "group_size": str(gs)}
    if form == "ort":
        meta["accuracy_level"] = str(acc)
        meta["int8_head"] = int8_head_kernel(acc)  # a runtime on another CPU can check it (edge.cpu)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    out = Path(out_dir) / FORMS[form]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out, initializer_bytes=g.initializer_bytes)
    return out
