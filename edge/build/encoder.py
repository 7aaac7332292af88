"""Build an embedder bundle: BERT-family sentence-transformers folder -> ONNX graph -> bundle.

The graph is written straight from the safetensors weights with onnx.helper (no torch export),
using ONNX Runtime's fused transformer contrib ops, which its CPU and CUDA providers implement:

    input_ids [B,S] int32, attention_mask [B,S] int32
      -> EmbedLayerNormalization (word + position(+token-type 0) embeddings, LayerNorm)
         -> x [B,S,H], mask_index [B] (valid lengths; padding is on the right)
      -> per layer:  Attention(x, Wqkv [H,3H], bqkv) -> MatMul Wo -> LayerNorm(+bo, +x)
                     -> MatMul W1 -> BiasGelu(b1) -> MatMul W2 -> LayerNorm(+b2, +x1)
      -> pooling (mean / cls / max, masked) -> [B,H]
      -> L2 normalisation when 2_Normalize is in modules.json
      -> sentence_embedding [B,H] float32

quant "int8": SmoothQuant scales calibrated on pydoc text (smooth_linears), then
onnxruntime.quantization.quantize_dynamic on the linears in INT8_LINEARS (Attention -> QAttention,
MatMul -> MatMulInteger): 8-bit per-channel weights (int8, or uint8 on x86 without VNNI:
int8_weight_type), uint8 activations quantized per call, the FFN-down inputs row by row
(row_scaled_linears). The embedding tables stay fp32 (gathers, not matmuls). See INT8_LINEARS for
the measurements.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import BundleWriter, Manifest, Quant
from edge.errors import UsageError
from edge.models.bert import BertFolder, EncoderSpec, load_bert_weights, read_bert_folder

QUANTS = ("fp32", "int8")
OPSET = 17
MS_DOMAIN = "com.microsoft"
INPUTS = ("input_ids", "attention_mask")  # both int32 [batch, seq], right-padded
OUTPUT = "sentence_embedding"  # float32 [batch, dim]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class _Graph:
    """Nodes and deduplicated named initializers of the graph under construction."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: dict[str, Any] = {}
        self.mask_bias: str | None = None  # [B,1,1,S] additive mask, built once (unfused attention)

    def const(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.inits:
            # np.ascontiguousarray would turn a 0-d scalar into shape [1]
            self.inits[name] = numpy_helper.from_array(np.asarray(arr, order="C"), name)
        return name

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs: Any) -> list[str]:
        from onnx import helper

        outs = [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs


def _embeddings(g: _Graph, w: dict[str, np.ndarray], s: EncoderSpec) -> tuple[str, str]:
    """word + position (+ token-type row 0, folded into positions: single-segment inputs) -> LayerNorm.
    Returns (x [B,S,H], mask_index [B])."""
    pos = w["embeddings.position_embeddings.weight"]
    if "embeddings.token_type_embeddings.weight" in w:
        pos = pos + w["embeddings.token_type_embeddings.weight"][0][None, :]
    x, mask_index = g.node(
        "EmbedLayerNormalization",
        [INPUTS[0], "", g.const("embeddings.word", w["embeddings.word_embeddings.weight"]),
         g.const("embeddings.position", pos.astype(np.float32)), "",
         g.const("embeddings.ln.weight", w["embeddings.LayerNorm.weight"]),
         g.const("embeddings.ln.bias", w["embeddings.LayerNorm.bias"]), INPUTS[1]],
        "/model/embeddings/EmbedLayerNorm", n_out=2, domain=MS_DOMAIN, epsilon=s.layer_norm_eps,
    )
    return x, mask_index


def _linear_in(g: _Graph, x: str, w_in_out: np.ndarray, key: str) -> list[str]:
    """The [input, weight] pair of linear layer `key`; weights are [in, out]."""
    return [x, g.const(f"{key}.weight", w_in_out.astype(np.float32))]


# "fused": ORT's com.microsoft.Attention (qkv GEMM + masked softmax per head in one op).
# "unfused": standard ops only (one qkv MatMul, batched QK^T / Softmax / PV MatMuls), for
# runtimes without ORT's contrib ops. Measured (all-MiniLM-L6-v2, 2 pinned threads, Intel Xeon,
# batch 32 x 200 tokens): fused fp32 43.7 texts/s vs unfused 41.8; int8 60.8 vs 49.3.
ATTENTION_IMPL = "fused"


def _mask_bias(g: _Graph) -> str:
    """attention_mask [B,S] int32 -> additive bias [B,1,1,S]: 0 where valid, -10000 at padding."""
    n = "/model/attn_mask"
    if g.mask_bias is None:
        (m,) = g.node("Cast", [INPUTS[1]], f"{n}/Cast", to=1)
        (m,) = g.node("Sub", [m, g.const("const/one", np.array(1.0, np.float32))], f"{n}/Sub")  # 0 valid, -1 pad
        (m,) = g.node("Mul", [m, g.const("const/mask_big", np.array(10000.0, np.float32))], f"{n}/Mul")
        (m,) = g.node("Unsqueeze", [m, g.const("const/axes_1_2", np.array([1, 2], np.int64))], f"{n}/Unsqueeze")
        g.mask_bias = m
    return g.mask_bias


def _attention_unfused(g: _Graph, n: str, s: EncoderSpec, x: str, wqkv: np.ndarray, bqkv: np.ndarray) -> str:
    """Self-attention in standard ops; 1/sqrt(D) is folded into Wq, bq.

        x [B,S,H] --MatMul Wqkv, +b--> [B,S,3H] --Split--> q, k, v [B,S,H]
        q, v --Reshape [B,S,N,D], Transpose--> [B,N,S,D];  k --> [B,N,D,S]
        softmax(q @ k + mask_bias) @ v --> [B,N,S,D] --Transpose, Reshape--> [B,S,H]
    """
    H, N, D = s.hidden_size, s.n_heads, s.head_dim
    scale = np.ones(3 * H, np.float32)
    scale[:H] = 1.0 / np.sqrt(D)
    (qkv,) = g.node("MatMul", _linear_in(g, x, wqkv * scale[None, :], f"{n}/attn/qkv"), f"{n}/attn/qkv/MatMul")
    (qkv,) = g.node("Add", [qkv, g.const(f"{n}/attn/qkv.bias", (bqkv * scale).astype(np.float32))], f"{n}/attn/qkv/Add")
    q, k, v = g.node("Split", [qkv, g.const("const/split_qkv", np.array([H, H, H], np.int64))], f"{n}/attn/Split", n_out=3, axis=-1)
    shape = g.const("const/shape_bsnd", np.array([0, 0, N, D], np.int64))
    heads = {}
    for name, t, perm in (("q", q, [0, 2, 1, 3]), ("k", k, [0, 2, 3, 1]), ("v", v, [0, 2, 1, 3])):
        (t,) = g.node("Reshape", [t, shape], f"{n}/attn/{name}/Reshape")
        heads[name] = g.node("Transpose", [t], f"{n}/attn/{name}/Transpose", perm=perm)[0]
    (sc,) = g.node("MatMul", [heads["q"], heads["k"]], f"{n}/attn/scores/MatMul")  # [B,N,S,S]
    (sc,) = g.node("Add", [sc, _mask_bias(g)], f"{n}/attn/scores/Mask")
    (p,) = g.node("Softmax", [sc], f"{n}/attn/Softmax", axis=-1)
    (c,) = g.node("MatMul", [p, heads["v"]], f"{n}/attn/context/MatMul")  # [B,N,S,D]
    (c,) = g.node("Transpose", [c], f"{n}/attn/context/Transpose", perm=[0, 2, 1, 3])
    return g.node("Reshape", [c, g.const("const/shape_bsh", np.array([0, 0, H], np.int64))], f"{n}/attn/context/Reshape")[0]


def _add_layer_norm(g: _Graph, n: str, x: str, bias: str, residual: str, gamma: str, beta: str, eps: float) -> str:
    """LayerNorm(x + bias + residual) in standard ops:  x --Add bias--> --Add residual--> LayerNormalization.

    NOTE: not com.microsoft.SkipLayerNormalization, which computes the same: on [32, 196, 384]
    float32, 2 threads, ONNX Runtime 1.32 on the 2-core EPYC, SkipLayerNormalization took 14.2 ms
    against 3.0 ms for Add + Add + LayerNormalization (medians of 7, one-op graphs timed by a
    throwaway script; SkipLayerNormalization was 13-15% of the int8 graph's time in ORT's profile,
    Add + LayerNormalization 4.6%). ORT's SkipLayerNormFusion would fuse these back, so every
    session of this graph disables it (edge.runtime.embedder.ORT_DISABLED_OPTIMIZERS)."""
    (y,) = g.node("Add", [x, bias], f"{n}/AddBias")
    (y,) = g.node("Add", [y, residual], f"{n}/AddResidual")
    return g.node("LayerNormalization", [y, gamma, beta], f"{n}/LayerNorm", axis=-1, epsilon=eps)[0]


def _layer(g: _Graph, i: int, w: dict[str, np.ndarray], s: EncoderSpec, x: str, mask_index: str) -> str:
    """One post-LN BERT layer.

        x --Attention(qkv packed)--> a --MatMul Wo--> LayerNorm(+bo, +x) = x1
        x1 --MatMul W1--> BiasGelu(+b1) --MatMul W2--> LayerNorm(+b2, +x1) = out
    """
    p, n = f"encoder.layer.{i}.", f"/model/layers.{i}"
    att = p + "attention.self."
    # torch Linear weights are [out, in]; ONNX MatMul wants [in, out]. q|k|v packed along out.
    wqkv = np.concatenate([w[att + k + ".weight"].T for k in ("query", "key", "value")], axis=1)  # [H, 3H]
    bqkv = np.concatenate([w[att + k + ".bias"] for k in ("query", "key", "value")])  # [3H]
    if ATTENTION_IMPL == "fused":
        (a,) = g.node("Attention", [*_linear_in(g, x, wqkv, f"{n}/attn/qkv"), g.const(f"{n}/attn/qkv.bias", bqkv), mask_index],
                      f"{n}/attn/qkv/Attention", domain=MS_DOMAIN, num_heads=s.n_heads)
    else:
        a = _attention_unfused(g, n, s, x, wqkv, bqkv)
    (o,) = g.node("MatMul", _linear_in(g, a, w[p + "attention.output.dense.weight"].T, f"{n}/attn/o_proj"),
                  f"{n}/attn/o_proj/MatMul")
    x1 = _add_layer_norm(g, f"{n}/attn_ln", o, g.const(f"{n}/attn/o_proj.bias", w[p + "attention.output.dense.bias"]), x,
                         g.const(f"{n}/attn_ln.weight", w[p + "attention.output.LayerNorm.weight"]),
                         g.const(f"{n}/attn_ln.bias", w[p + "attention.output.LayerNorm.bias"]), s.layer_norm_eps)
    (h,) = g.node("MatMul", _linear_in(g, x1, w[p + "intermediate.dense.weight"].T, f"{n}/mlp/up"), f"{n}/mlp/up/MatMul")
    (h,) = g.node("BiasGelu", [h, g.const(f"{n}/mlp/up.bias", w[p + "intermediate.dense.bias"])], f"{n}/mlp/BiasGelu", domain=MS_DOMAIN)
    (d,) = g.node("MatMul", _linear_in(g, h, w[p + "output.dense.weight"].T, f"{n}/mlp/down"), f"{n}/mlp/down/MatMul")
    return _add_layer_norm(g, f"{n}/mlp_ln", d, g.const(f"{n}/mlp/down.bias", w[p + "output.dense.bias"]), x1,
                           g.const(f"{n}/mlp_ln.weight", w[p + "output.LayerNorm.weight"]),
                           g.const(f"{n}/mlp_ln.bias", w[p + "output.LayerNorm.bias"]), s.layer_norm_eps)


def _pool(g: _Graph, s: EncoderSpec, x: str) -> str:
    """[B,S,H] -> [B,H] by the folder's pooling mode; padded positions never count."""
    n = "/model/pool"
    if s.pooling == "cls":
        return g.node("Gather", [x, g.const("const/zero_i64", np.array(0, np.int64))], f"{n}/cls/Gather", axis=1)[0]
    (m,) = g.node("Cast", [INPUTS[1]], f"{n}/mask/Cast", to=1)  # float mask [B,S]
    (m3,) = g.node("Unsqueeze", [m, g.const("const/axes_m1", np.array([-1], np.int64))], f"{n}/mask/Unsqueeze")  # [B,S,1]
    if s.pooling == "mean":
        # sentence-transformers: sum(x * m) / clamp(sum(m), 1e-9)
        (xm,) = g.node("Mul", [x, m3], f"{n}/mean/Mul")
        (num,) = g.node("ReduceSum", [xm, g.const("const/axes_1", np.array([1], np.int64))], f"{n}/mean/ReduceSum", keepdims=0)
        (den,) = g.node("ReduceSum", [m3, g.const("const/axes_1", np.array([1], np.int64))], f"{n}/mean/Count", keepdims=0)
        (den,) = g.node("Max", [den, g.const("const/eps_count", np.array(1e-9, np.float32))], f"{n}/mean/Clamp")
        return g.node("Div", [num, den], f"{n}/mean/Div")[0]
    # max: padded positions are set to -1e9 before the max (sentence-transformers does the same)
    (neg,) = g.node("Sub", [m3, g.const("const/one", np.array(1.0, np.float32))], f"{n}/max/Sub")  # 0 valid, -1 pad
    (neg,) = g.node("Mul", [neg, g.const("const/big", np.array(1e9, np.float32))], f"{n}/max/Scale")
    (xm,) = g.node("Add", [x, neg], f"{n}/max/Add")
    return g.node("ReduceMax", [xm], f"{n}/max/ReduceMax", axes=[1], keepdims=0)[0]


def _l2_normalize(g: _Graph, v: str) -> str:
    """v / max(||v||_2, 1e-12), as torch.nn.functional.normalize."""
    n = "/model/normalize"
    (norm,) = g.node("ReduceL2", [v], f"{n}/ReduceL2", axes=[-1], keepdims=1)
    (norm,) = g.node("Max", [norm, g.const("const/eps_norm", np.array(1e-12, np.float32))], f"{n}/Clamp")
    return g.node("Div", [v, norm], f"{n}/Div")[0]


def build_encoder_graph(spec: EncoderSpec, weights: dict[str, np.ndarray]) -> Any:
    """The fp32 onnx.ModelProto for `spec` (see the module docstring for its shape)."""
    from onnx import TensorProto, helper

    g = _Graph()
    x, mask_index = _embeddings(g, weights, spec)
    for i in range(spec.n_layers):
        x = _layer(g, i, weights, spec, x, mask_index)
    v = _pool(g, spec, x)
    if spec.normalize:
        v = _l2_normalize(g, v)
    (out,) = g.node("Identity", [v], "/model/output/Identity")
    g.nodes[-1].output[0] = OUTPUT
    graph = helper.make_graph(
        g.nodes, f"{spec.name}-encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", "seq"]) for n in INPUTS],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", spec.dim])],
        initializer=list(g.inits.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="edge-rag")
    model.ir_version = 9
    return model


# The one place that decides INT8 precision per linear. Measured on all-MiniLM-L6-v2 against
# sentence-transformers, 200 varied texts batched by 32 (tests/test_embedder.py):
#   dynamic INT8 (per-channel weights, per-tensor uint8 activations), all linears  min cos 0.974
#   same, FFN down kept fp32                                                      min cos 0.974 ("OK")
#   + SmoothQuant on the qkv and FFN-up inputs (alpha 0.8), FFN down fp32         min 0.992, mean 0.998
#   + FFN down INT8 too (smoothed)                                                min 0.978
# Post-LayerNorm activations have a few outlier channels that eat the per-tensor range; smoothing
# (x / s, W * s, exact in fp32) moves it into the weights. FFN-down inputs (GELU outputs) resist it:
# their outliers sit in a few tokens, not channels, so they are quantized row by row instead
# (ROW_SCALED_LINEARS).
INT8_LINEARS = ("attn/qkv", "attn/o_proj", "mlp/up", "mlp/down")
INT8_SMOOTHED = ("attn/qkv", "mlp/up")
INT8_SMOOTH_ALPHA = 0.8  # 0.5 left min cosine 0.985 on short texts, 0.8 gave 0.998 (one text at a time)
# FFN down: each row (token) divided by its own max before the per-tensor uint8 quantizer, the
# output multiplied back (row_scaled_linears), so one token's GELU outliers no longer set every
# token's resolution. Measured (all-MiniLM-L6-v2, the 200 texts of bench_embed.varied_texts against
# sentence-transformers; texts/s of the same real chunks, 128 of the scale corpus in batches of 32,
# 2 threads, graphs alternated batch by batch in one locked job on the 2-core EPYC, AVX-512 VNNI;
# CPU-seconds per text, which holds up under the other engineers' load; a throwaway script):
#                                                  min cos   texts/s vs 8-bit MatMulNBits
#   FFN down 8-bit MatMulNBits, block 32 (until now)  0.99302   1.00x (MLAS spent 2.7x the time per
#                                                                     FLOP of the int8 GEMM on it)
#   FFN down 8-bit MatMulNBits, block 256             0.99188   1.09x
#   FFN down dynamic int8                             0.98362   1.18-1.20x
#   FFN down dynamic int8, rows scaled (now)          0.99205   1.13-1.14x
# With LayerNorm unfused (_add_layer_norm) as well: 1.31-1.35x the graph before both.
ROW_SCALED_LINEARS = ("mlp/down",)


def int8_weight_type(u8s8_exact: bool) -> str:
    """The 8-bit weight type of the dynamically quantized linears for a CPU (the one place that
    decides it). ONNX Runtime's u8 x s8 GEMM saturates its int16 pair sums on x86 without VNNI
    (edge.cpu); its u8 x u8 GEMM widens both sides to int16 first (vpmaddwd) and is exact there.
    Measured against sentence-transformers (min cosine over bench_embed.varied_texts(200)), with
    the FFN down row-scaled (with the FFN down as 8-bit MatMulNBits before it, in brackets):
      int8 weights:               0.99205 [0.99302] (VNNI); saturates on AVX2 (README, qemu -cpu Haswell)
      7-bit int8 (reduce_range):  [0.98835] (FFN down fp32; the same on either CPU: cannot saturate)
      uint8 weights (u8 x u8):    0.99320 [0.99308] on VNNI, the same arithmetic on AVX2; 0.61x the
                                  speed of int8 on the VNNI CPU, whose u8 x u8 kernel has no vpdpbusd
    """
    return "int8" if u8s8_exact else "uint8"


def calibration_texts(n: int = 64) -> list[str]:
    """Deterministic calibration text every Python has (pydoc_data.topics paragraphs: prose and
    code) plus a few very short strings, whose activations differ most from long ones."""
    import pydoc_data.topics as topics

    paras = [p.strip() for k in sorted(topics.topics) for p in topics.topics[k].split("\n\n") if len(p.strip()) > 20]
    return paras[:: max(1, len(paras) // n)][:n] + ["OK", "", "a", "reset", "battery life", "E-214"]


def smooth_linears(model: Any, tokenizer_json: Path, max_seq_length: int, texts: list[str],
                   keys: tuple[str, ...] = INT8_SMOOTHED, alpha: float = INT8_SMOOTH_ALPHA) -> Any:
    """SmoothQuant on `model` (in place): for every MatMul/Attention whose name holds one of `keys`,
    per input channel j: s_j = amax|X_j|^alpha / amax|W_j|^(1-alpha); X -> X / s (one Mul),
    W -> W * s (folded). amax|X| comes from running the fp32 graph on `texts`, one at a time."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer

    consts = {i.name for i in model.graph.initializer}
    targets = [n for n in model.graph.node if n.op_type in ("MatMul", "Attention") and any(k in n.name for k in keys)
               and n.input[1] in consts]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for n in targets:  # expose every target's input: [B, S, in]
        probe.graph.output.append(helper.make_tensor_value_info(n.input[0], TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del probe
    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.enable_truncation(max_length=max_seq_length)
    amax: dict[str, np.ndarray] = {}
    for enc in tok.encode_batch(texts):
        ids = np.asarray([enc.ids], np.int32)
        outs = sess.run([n.input[0] for n in targets], {INPUTS[0]: ids, INPUTS[1]: np.ones_like(ids)})
        for n, o in zip(targets, outs):
            cur = np.abs(o).reshape(-1, o.shape[-1]).max(axis=0)
            amax[n.name] = np.maximum(amax.get(n.name, cur), cur)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        if n.name in amax:
            w = numpy_helper.to_array(inits[n.input[1]])  # [in, out]
            s = np.power(np.maximum(amax[n.name], 1e-5), alpha) / np.power(np.maximum(np.abs(w).max(axis=1), 1e-5), 1 - alpha)
            s = np.clip(s, 1e-2, 1e2).astype(np.float32)
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1]))
            model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), f"{n.name}/smooth_inv"))
            nodes.append(helper.make_node("Mul", [n.input[0], f"{n.name}/smooth_inv"], [f"{n.name}/smoothed"], name=f"{n.name}/Smooth"))
            n.input[0] = f"{n.name}/smoothed"
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _quantize_int8(src: Path, dst: Path) -> Quant:
    """Dynamic INT8 (8-bit per-channel weights, uint8 activations quantized per call) on
    INT8_LINEARS, the ROW_SCALED_LINEARS' rows scaled first. The weight type follows this CPU
    (int8_weight_type); EDGE_RAG_U8S8 builds for another one (edge.cpu)."""
    import logging

    import onnx
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edge.cpu import u8s8_exact

    model = onnx.load(str(src))
    scaled = row_scaled_linears(model)
    onnx.save_model(model, str(src))
    consts = {i.name for i in model.graph.initializer}
    nodes = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Attention") and n.input[1] in consts]
    del model
    keep_fp32 = [n for n in nodes if not any(k in n for k in INT8_LINEARS)]
    exact = u8s8_exact()
    wtype = int8_weight_type(exact)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs advice (pre-processing) meant for CNNs
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8 if wtype == "int8" else QuantType.QUInt8,
                         per_channel=True, op_types_to_quantize=["MatMul", "Attention"], nodes_to_exclude=keep_fp32,
                         extra_options={"MatMulConstBOnly": True,
                                        # contrib-op outputs have no inferred type; they are all float32
                                        "DefaultTensorType": TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    return Quant(recipe="int8", method="SmoothQuant + row-scaled FFN down + onnxruntime.quantize_dynamic",
                 details={"weights": "int8 per-channel symmetric" if wtype == "int8"
                          else "uint8 per-channel asymmetric (u8 x u8: x86 without VNNI)",
                          "u8s8_exact": exact,  # the CPU it was built for (edge.cpu, edge.runtime.embedder.isa_mismatch)
                          "activations": "uint8 dynamic per call",
                          "int8_linears": list(INT8_LINEARS), "smoothed": list(INT8_SMOOTHED), "smooth_alpha": INT8_SMOOTH_ALPHA,
                          "row_scaled_linears": scaled})


def row_scaled_linears(model: Any, keys: tuple[str, ...] = ROW_SCALED_LINEARS) -> list[str]:
    """Give each fp32 MatMul whose name holds one of `keys` a per-row scale (in place; exact in fp32):

        x [B,S,K] ─ ReduceMax over K ─ Max(1e-6) = r [B,S,1]
        x * (1 / r) ─ MatMul W ─ * r ─> y      (quantize_dynamic then turns the MatMul into int8)

    Every row then spans at most [min/r, 1], so the one per-tensor scale of the dynamic quantizer is
    no longer set by the few rows with outliers. r is the row's max, not max |x|: the inputs here
    are GELU outputs (>= -0.17). Returns the names of the linears changed."""
    from onnx import helper, numpy_helper

    inits = {i.name for i in model.graph.initializer}
    model.graph.initializer.append(numpy_helper.from_array(np.array(1e-6, np.float32), "const/row_scale_eps"))
    nodes, done = [], []
    for n in model.graph.node:
        if n.op_type != "MatMul" or not any(k in n.name for k in keys) or n.input[1] not in inits:
            nodes.append(n)
            continue
        base = n.name.rsplit("/", 1)[0]
        r, inv, xn, y = (f"{base}/row_scale/{t}" for t in ("r", "inv", "x", "y"))
        nodes += [helper.make_node("ReduceMax", [n.input[0]], [f"{r}_max"], name=f"{base}/row_scale/ReduceMax", axes=[-1], keepdims=1),
                  helper.make_node("Max", [f"{r}_max", "const/row_scale_eps"], [r], name=f"{base}/row_scale/Max"),
                  helper.make_node("Reciprocal", [r], [inv], name=f"{base}/row_scale/Reciprocal"),
                  helper.make_node("Mul", [n.input[0], inv], [xn], name=f"{base}/row_scale/Mul")]
        out = n.output[0]
        n.input[0], n.output[0] = xn, y
        nodes += [n, helper.make_node("Mul", [y, r], [out], name=f"{base}/row_scale/Unscale")]
        done.append(base)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return done


def embedder_id(spec: EncoderSpec, weights_sha256: str, quant: str) -> str:
    """Stable identity of the vectors an embedder produces; the index stores it to refuse mixing."""
    return f"{spec.name}@{weights_sha256[:16]}:{spec.pooling}{'+l2' if spec.normalize else ''}:{quant}"


def build_embedder_bundle(model_dir: Path, out: Path, *, quant: str = "fp32", progress: bool = True) -> Path:
    """sentence-transformers BERT folder -> embedder bundle at `out` (model.onnx, tokenizer, manifest)."""
    import onnx

    if quant not in QUANTS:
        raise UsageError(f"unknown embedder quant {quant!r}", fix=f"use one of {', '.join(QUANTS)}")
    folder: BertFolder = read_bert_folder(model_dir)
    spec = folder.spec
    steps = ["read weights", "build graph", "write", *(["quantize int8"] if quant == "int8" else []),
             "calibrate the relevance gate", "checksum"]
    ctx = _progress(progress, f"building embedder {spec.name} ({quant})", len(steps))
    writer = BundleWriter(Path(out), kind="embedder")
    try:
        with ctx as advance:
            sha = folder.weights_sha256()
            weights = load_bert_weights(folder)
            advance()
            model = build_encoder_graph(spec, weights)
            del weights
            if quant == "int8":
                smooth_linears(model, folder.tokenizer_path, spec.max_seq_length, calibration_texts())
            advance()
            fp32_path = writer.path("model.onnx") if quant == "fp32" else writer.tmp.parent / f".{writer.out.name}.fp32-{id(writer)}.onnx"
            onnx.save_model(model, str(fp32_path))
            del model
            advance()
            qinfo = Quant(recipe="fp32")
            if quant == "int8":
                try:
                    qinfo = _quantize_int8(fp32_path, writer.path("model.onnx"))
                finally:
                    fp32_path.unlink(missing_ok=True)
                advance()
            for name in _TOKENIZER_FILES:
                if (folder.transformer_dir / name).is_file():
                    writer.add_file(name, folder.transformer_dir / name)
            from edge.build.relevance import calibrate_gate, onnx_embed_fn

            gate = calibrate_gate(onnx_embed_fn(writer.path("model.onnx"), folder.tokenizer_path, spec.max_seq_length,
                                                spec.pad_token_id))
            advance()
            manifest = Manifest(
                kind="embedder",
                model=spec.to_dict(),
                quant=qinfo,
                embedder_id=embedder_id(spec, sha, quant),
                source={"path": str(folder.root.resolve()), "weights_sha256": sha},
                graph={"inputs": {n: "int32 [batch, seq] right-padded" for n in INPUTS},
                       "output": f"{OUTPUT} float32 [batch, {spec.dim}]", "opset": OPSET, "contrib_ops": MS_DOMAIN},
                relevance_gate=gate,
            )
            path = writer.commit(manifest)
            advance()
    except BaseException:
        writer.abort()
        raise
    return path


def _progress(enabled: bool, label: str, total: int):
    """A context manager yielding `advance()`: a rich progress bar when enabled, a no-op otherwise."""
    if not enabled:
        return nullcontext(lambda: None)
    from contextlib import contextmanager

    @contextmanager
    def bar():
        from rich.progress import Progress

        with Progress(transient=True) as p:
            task = p.add_task(label, total=total)
            yield lambda: p.advance(task)

    return bar()


__all__ = ["build_embedder_bundle", "build_encoder_graph", "embedder_id", "QUANTS", "INPUTS", "OUTPUT"]
