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

quant "int8": the qkv GEMM leaves the attention op (MatMul + MultiHeadAttention), SmoothQuant scales
calibrated on pydoc text (smooth_linears), then every linear in INT8_LINEARS becomes an int8 GEMM
(quantize_linears_per_row): 8-bit per-channel weights (int8, or uint8 on x86 without VNNI:
int8_weight_type), uint8 activations scaled row by row (token by token), so a text's vector does not
depend on what it is batched with. The embedding tables stay fp32 (gathers, not matmuls). See
INT8_LINEARS for the measurements.

Initializer names come from edge.models.bert_graph_names, by which the native CPU encoder
(edge.runtime.cpu.encoder) finds its arrays in the int8 graph.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import BundleWriter, Manifest, Quant
from edge.errors import UsageError
from edge.models import bert_graph_names as names
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
        [INPUTS[0], "", g.const(names.WORD_EMBEDDINGS, w["embeddings.word_embeddings.weight"]),
         g.const(names.POSITION_EMBEDDINGS, pos.astype(np.float32)), "",
         g.const(names.EMBED_LN_WEIGHT, w["embeddings.LayerNorm.weight"]),
         g.const(names.EMBED_LN_BIAS, w["embeddings.LayerNorm.bias"]), INPUTS[1]],
        "/model/embeddings/EmbedLayerNorm", n_out=2, domain=MS_DOMAIN, epsilon=s.layer_norm_eps,
    )
    return x, mask_index


def _linear_in(g: _Graph, x: str, w_in_out: np.ndarray, key: str) -> list[str]:
    """The [input, weight] pair of linear layer `key`; weights are [in, out]."""
    return [x, g.const(names.weight(key), w_in_out.astype(np.float32))]


# "fused": ORT's com.microsoft.Attention (qkv GEMM + masked softmax per head in one op).
# "mha": the qkv GEMM as its own MatMul, then com.microsoft.MultiHeadAttention (q, k, v apart: ORT's
#   CPU kernel has no packed-QKV form). The int8 graph uses it: its qkv GEMM is quantized per row
#   (quantize_linears_per_row), which the fused op's one input scale cannot express.
# "mha-unpadded": the same without MultiHeadAttention's key_padding_mask: ORT's CPU kernel then takes
#   its flash-attention path (MlasFlashAttention: K/V tiles sized to the L2 cache, no [B, N, S, S]
#   scores in memory), which it takes only when no mask is given. Every row of a call must then have
#   the same length (no padding): the manifest says so (graph["padding"] = "none") and the runtime
#   batches texts of one length only (edge.runtime.embedder.length_buckets(exact=True)). Measured
#   (int8 MiniLM, 96 real scale-corpus chunks, 1 thread, alternated in one locked job, load 1.8-2.0):
#   46.0-47.1 texts/s masked, 48.8-49.0 unpadded (1.04x); one op [2, 190, 384]: 2.11 -> 1.73 ms.
#   The int8 graph uses it.
# "unfused": standard ops only (one qkv MatMul, batched QK^T / Softmax / PV MatMuls), for
# runtimes without ORT's contrib ops. Measured (all-MiniLM-L6-v2, 2 pinned threads, Intel Xeon,
# batch 32 x 200 tokens): fused fp32 43.7 texts/s vs unfused 41.8; int8 60.8 vs 49.3.
ATTENTION_IMPL = "fused"
ATTENTION_IMPLS = ("fused", "mha", "mha-unpadded", "unfused")
PADDING = {"mha-unpadded": "none"}  # attention form -> what the graph allows in a call's rows (else "right")


def _attention_mha(g: _Graph, i: int, s: EncoderSpec, x: str, wqkv: np.ndarray, bqkv: np.ndarray, mask_index: str | None) -> str:
    """x [B,S,H] --MatMul Wq / Wk / Wv--> q, k, v [B,S,H]
    --MultiHeadAttention(+bqkv, key_padding_mask = valid lengths [B], or none: unpadded rows)--> [B,S,H]
    Three MatMuls, not one and a Split: the Split's copy was 1.5% of the int8 graph's time."""
    H, n, bias = s.hidden_size, names.layer_prefix(i), names.bias(names.layer_key(i, names.QKV))
    q, k, v = (g.node("MatMul", _linear_in(g, x, wqkv[:, j * H:(j + 1) * H], key), names.matmul_node(key))[0]
               for j, key in enumerate(names.qkv_key(i, t) for t in names.QKV_PARTS))
    mask = [mask_index] if mask_index else []
    return g.node("MultiHeadAttention", [q, k, v, g.const(bias, bqkv.astype(np.float32)), *mask],
                  f"{n}/attn/MultiHeadAttention", domain=MS_DOMAIN, num_heads=s.n_heads)[0]


def _mask_bias(g: _Graph) -> str:
    """attention_mask [B,S] int32 -> additive bias [B,1,1,S]: 0 where valid, -10000 at padding."""
    n = "/model/attn_mask"
    if g.mask_bias is None:
        (m,) = g.node("Cast", [INPUTS[1]], f"{n}/Cast", to=1)
        (m,) = g.node("Sub", [m, g.const(names.ONE, np.array(1.0, np.float32))], f"{n}/Sub")  # 0 valid, -1 pad
        (m,) = g.node("Mul", [m, g.const(names.MASK_BIG, np.array(10000.0, np.float32))], f"{n}/Mul")
        (m,) = g.node("Unsqueeze", [m, g.const(names.AXES_1_2, np.array([1, 2], np.int64))], f"{n}/Unsqueeze")
        g.mask_bias = m
    return g.mask_bias


def _attention_unfused(g: _Graph, i: int, s: EncoderSpec, x: str, wqkv: np.ndarray, bqkv: np.ndarray) -> str:
    """Self-attention in standard ops; 1/sqrt(D) is folded into Wq, bq.

        x [B,S,H] --MatMul Wqkv, +b--> [B,S,3H] --Split--> q, k, v [B,S,H]
        q, v --Reshape [B,S,N,D], Transpose--> [B,N,S,D];  k --> [B,N,D,S]
        softmax(q @ k + mask_bias) @ v --> [B,N,S,D] --Transpose, Reshape--> [B,S,H]
    """
    H, N, D = s.hidden_size, s.n_heads, s.head_dim
    n, key = names.layer_prefix(i), names.layer_key(i, names.QKV)
    scale = np.ones(3 * H, np.float32)
    scale[:H] = 1.0 / np.sqrt(D)
    (qkv,) = g.node("MatMul", _linear_in(g, x, wqkv * scale[None, :], key), names.matmul_node(key))
    (qkv,) = g.node("Add", [qkv, g.const(names.bias(key), (bqkv * scale).astype(np.float32))], f"{key}/Add")
    q, k, v = g.node("Split", [qkv, g.const(names.SPLIT_QKV, np.array([H, H, H], np.int64))], f"{n}/attn/Split", n_out=3, axis=-1)
    shape = g.const(names.SHAPE_BSND, np.array([0, 0, N, D], np.int64))
    heads = {}
    for name, t, perm in (("q", q, [0, 2, 1, 3]), ("k", k, [0, 2, 3, 1]), ("v", v, [0, 2, 1, 3])):
        (t,) = g.node("Reshape", [t, shape], f"{n}/attn/{name}/Reshape")
        heads[name] = g.node("Transpose", [t], f"{n}/attn/{name}/Transpose", perm=perm)[0]
    (sc,) = g.node("MatMul", [heads["q"], heads["k"]], f"{n}/attn/scores/MatMul")  # [B,N,S,S]
    (sc,) = g.node("Add", [sc, _mask_bias(g)], f"{n}/attn/scores/Mask")
    (p,) = g.node("Softmax", [sc], f"{n}/attn/Softmax", axis=-1)
    (c,) = g.node("MatMul", [p, heads["v"]], f"{n}/attn/context/MatMul")  # [B,N,S,D]
    (c,) = g.node("Transpose", [c], f"{n}/attn/context/Transpose", perm=[0, 2, 1, 3])
    return g.node("Reshape", [c, g.const(names.SHAPE_BSH, np.array([0, 0, H], np.int64))], f"{n}/attn/context/Reshape")[0]


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


def _layer(g: _Graph, i: int, w: dict[str, np.ndarray], s: EncoderSpec, x: str, mask_index: str, attention: str) -> str:
    """One post-LN BERT layer.

        x --Attention(qkv packed)--> a --MatMul Wo--> LayerNorm(+bo, +x) = x1
        x1 --MatMul W1--> BiasGelu(+b1) --MatMul W2--> LayerNorm(+b2, +x1) = out
    """
    p, n = f"encoder.layer.{i}.", names.layer_prefix(i)
    qkv, o, up, down, attn_ln, mlp_ln = (names.layer_key(i, part) for part in
                                         (names.QKV, names.O_PROJ, names.MLP_UP, names.MLP_DOWN, names.ATTN_LN, names.MLP_LN))
    att = p + "attention.self."
    # torch Linear weights are [out, in]; ONNX MatMul wants [in, out]. q|k|v packed along out.
    wqkv = np.concatenate([w[att + k + ".weight"].T for k in ("query", "key", "value")], axis=1)  # [H, 3H]
    bqkv = np.concatenate([w[att + k + ".bias"] for k in ("query", "key", "value")])  # [3H]
    if attention == "fused":
        (a,) = g.node("Attention", [*_linear_in(g, x, wqkv, qkv), g.const(names.bias(qkv), bqkv), mask_index],
                      f"{qkv}/Attention", domain=MS_DOMAIN, num_heads=s.n_heads)
    elif attention in ("mha", "mha-unpadded"):
        a = _attention_mha(g, i, s, x, wqkv, bqkv, mask_index if attention == "mha" else None)
    else:
        a = _attention_unfused(g, i, s, x, wqkv, bqkv)
    (ao,) = g.node("MatMul", _linear_in(g, a, w[p + "attention.output.dense.weight"].T, o), names.matmul_node(o))
    x1 = _add_layer_norm(g, attn_ln, ao, g.const(names.bias(o), w[p + "attention.output.dense.bias"]), x,
                         g.const(names.weight(attn_ln), w[p + "attention.output.LayerNorm.weight"]),
                         g.const(names.bias(attn_ln), w[p + "attention.output.LayerNorm.bias"]), s.layer_norm_eps)
    (h,) = g.node("MatMul", _linear_in(g, x1, w[p + "intermediate.dense.weight"].T, up), names.matmul_node(up))
    (h,) = g.node("BiasGelu", [h, g.const(names.bias(up), w[p + "intermediate.dense.bias"])], f"{n}/mlp/BiasGelu", domain=MS_DOMAIN)
    (d,) = g.node("MatMul", _linear_in(g, h, w[p + "output.dense.weight"].T, down), names.matmul_node(down))
    return _add_layer_norm(g, mlp_ln, d, g.const(names.bias(down), w[p + "output.dense.bias"]), x1,
                           g.const(names.weight(mlp_ln), w[p + "output.LayerNorm.weight"]),
                           g.const(names.bias(mlp_ln), w[p + "output.LayerNorm.bias"]), s.layer_norm_eps)


def _pool(g: _Graph, s: EncoderSpec, x: str) -> str:
    """[B,S,H] -> [B,H] by the folder's pooling mode; padded positions never count."""
    n = "/model/pool"
    if s.pooling == "cls":
        return g.node("Gather", [x, g.const(names.ZERO_I64, np.array(0, np.int64))], f"{n}/cls/Gather", axis=1)[0]
    (m,) = g.node("Cast", [INPUTS[1]], f"{n}/mask/Cast", to=1)  # float mask [B,S]
    (m3,) = g.node("Unsqueeze", [m, g.const(names.AXES_M1, np.array([-1], np.int64))], f"{n}/mask/Unsqueeze")  # [B,S,1]
    if s.pooling == "mean":
        # sentence-transformers: sum(x * m) / clamp(sum(m), 1e-9)
        (xm,) = g.node("Mul", [x, m3], f"{n}/mean/Mul")
        (num,) = g.node("ReduceSum", [xm, g.const(names.AXES_1, np.array([1], np.int64))], f"{n}/mean/ReduceSum", keepdims=0)
        (den,) = g.node("ReduceSum", [m3, g.const(names.AXES_1, np.array([1], np.int64))], f"{n}/mean/Count", keepdims=0)
        (den,) = g.node("Max", [den, g.const(names.EPS_COUNT, np.array(1e-9, np.float32))], f"{n}/mean/Clamp")
        return g.node("Div", [num, den], f"{n}/mean/Div")[0]
    # max: padded positions are set to -1e9 before the max (sentence-transformers does the same)
    (neg,) = g.node("Sub", [m3, g.const(names.ONE, np.array(1.0, np.float32))], f"{n}/max/Sub")  # 0 valid, -1 pad
    (neg,) = g.node("Mul", [neg, g.const(names.BIG, np.array(1e9, np.float32))], f"{n}/max/Scale")
    (xm,) = g.node("Add", [x, neg], f"{n}/max/Add")
    return g.node("ReduceMax", [xm], f"{n}/max/ReduceMax", axes=[1], keepdims=0)[0]


def _l2_normalize(g: _Graph, v: str) -> str:
    """v / max(||v||_2, 1e-12), as torch.nn.functional.normalize."""
    n = "/model/normalize"
    (norm,) = g.node("ReduceL2", [v], f"{n}/ReduceL2", axes=[-1], keepdims=1)
    (norm,) = g.node("Max", [norm, g.const(names.EPS_NORM, np.array(1e-12, np.float32))], f"{n}/Clamp")
    return g.node("Div", [v, norm], f"{n}/Div")[0]


def build_encoder_graph(spec: EncoderSpec, weights: dict[str, np.ndarray], attention: str | None = None) -> Any:
    """The fp32 onnx.ModelProto for `spec` (see the module docstring for its shape); `attention`:
    one of ATTENTION_IMPLS (default ATTENTION_IMPL)."""
    from onnx import TensorProto, helper

    attention = attention or ATTENTION_IMPL
    if attention not in ATTENTION_IMPLS:
        raise UsageError(f"unknown attention form {attention!r}", fix=f"use one of {', '.join(ATTENTION_IMPLS)}")
    g = _Graph()
    x, mask_index = _embeddings(g, weights, spec)
    for i in range(spec.n_layers):
        x = _layer(g, i, weights, spec, x, mask_index, attention)
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
# their outliers sit in a few tokens, not channels: row-by-row scales (below) take them.
INT8_LINEARS = (names.QKV, names.O_PROJ, names.MLP_UP, names.MLP_DOWN)
INT8_SMOOTHED = (names.QKV, names.MLP_UP)
INT8_SMOOTH_ALPHA = 0.8  # 0.5 left min cosine 0.985 on short texts, 0.8 gave 0.998 (one text at a time)
# Until now (the measurements above): ONNX Runtime's dynamic quantizer, one uint8 scale per call, the
# FFN down's rows pre-scaled by their max (min cosine 0.99205, VNNI). With one scale per call a text's
# vector depended on the texts batched with it (0.98914 in batches of 512 tokens). Now every int8
# linear scales each row (token) by its own max |x| (quantize_linears_per_row); measured in the
# docs/measurements.md (#15) and bench/bench_embed.py.
ACTIVATION_SCALES = "per_row"


def int8_weight_type(u8s8_exact: bool) -> str:
    """The 8-bit weight type of the dynamically quantized linears for a CPU (the one place that
    decides it). ONNX Runtime's u8 x s8 GEMM saturates its int16 pair sums on x86 without VNNI
    (edge.cpu); its u8 x u8 GEMM widens both sides to int16 first (vpmaddwd) and is exact there.
    Measured against sentence-transformers (min cosine over bench_embed.varied_texts(200)), with
    the FFN down row-scaled (with the FFN down as 8-bit MatMulNBits before it, in brackets):
      int8 weights:               0.99205 [0.99302] (VNNI); saturates on AVX2 (docs/measurements.md, qemu -cpu Haswell)
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
    """SmoothQuant on `model` (in place): for every input X of the MatMul/Attention nodes whose name
    holds one of `keys`, per input channel j: s_j = amax|X_j|^alpha / amax|W_j|^(1-alpha), W being
    every such node's weight that reads X (q, k and v share one X: one s, as for their packed weight);
    X -> X / s (one Mul), W -> W * s (folded). amax|X| comes from running the fp32 graph on `texts`,
    one at a time."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer

    consts = {i.name for i in model.graph.initializer}
    targets = [n for n in model.graph.node if n.op_type in ("MatMul", "Attention") and any(k in n.name for k in keys)
               and n.input[1] in consts]
    xs = list(dict.fromkeys(n.input[0] for n in targets))  # each shared input once, in graph order
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for x in xs:  # expose every target's input: [B, S, in]
        probe.graph.output.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, None))
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
        for x, o in zip(xs, sess.run(xs, {INPUTS[0]: ids, INPUTS[1]: np.ones_like(ids)})):
            cur = np.abs(o).reshape(-1, o.shape[-1]).max(axis=0)
            amax[x] = np.maximum(amax.get(x, cur), cur)
    inits = {i.name: i for i in model.graph.initializer}
    readers = {x: [n for n in targets if n.input[0] == x] for x in xs}
    smoothed: dict[str, str] = {}  # X -> X / s
    nodes = []
    for n in model.graph.node:
        x = n.input[0] if n.input else ""
        if x in readers and n in readers[x]:
            if x not in smoothed:
                name = readers[x][0].name
                w_amax = np.max([np.abs(numpy_helper.to_array(inits[r.input[1]])).max(axis=1) for r in readers[x]], axis=0)
                s = np.power(np.maximum(amax[x], 1e-5), alpha) / np.power(np.maximum(w_amax, 1e-5), 1 - alpha)
                s = np.clip(s, 1e-2, 1e2).astype(np.float32)
                for r in readers[x]:  # [in, out]
                    inits[r.input[1]].CopyFrom(numpy_helper.from_array((numpy_helper.to_array(inits[r.input[1]]) * s[:, None]).astype(np.float32), r.input[1]))
                model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), names.smooth_inv(name)))
                nodes.append(helper.make_node("Mul", [x, names.smooth_inv(name)], [f"{name}/smoothed"], name=f"{name}/Smooth"))
                smoothed[x] = f"{name}/smoothed"
            n.input[0] = smoothed[x]
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _quantize_int8(model: Any) -> Quant:
    """INT8 on INT8_LINEARS (in place), activations per row (quantize_linears_per_row). The weight
    type follows this CPU's embedder (int8_weight_type, edge.runtime.cpu.encoder.int8_exact); EDGE_RAG_U8S8
    builds for another one (edge.cpu)."""
    from edge.runtime.cpu.encoder import int8_exact

    exact = int8_exact()
    wtype = int8_weight_type(exact)
    done = quantize_linears_per_row(model, INT8_LINEARS, wtype)
    return Quant(recipe="int8", method="SmoothQuant + int8 linears with per-row activation scales",
                 details={"weights": "int8 per-channel symmetric" if wtype == "int8"
                          else "uint8 per-channel asymmetric (u8 x u8: x86 without VNNI)",
                          "u8s8_exact": exact,  # the CPU it was built for (edge.cpu, edge.runtime.embedder.isa_mismatch)
                          "activations": "uint8 per row (token): 127 / max|x| of the row, zero point 128",
                          "activation_scales": ACTIVATION_SCALES,
                          "int8_linears": done, "smoothed": list(INT8_SMOOTHED), "smooth_alpha": INT8_SMOOTH_ALPHA})


def _quantize_weight(w: np.ndarray, wtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[K, N] float32 -> (codes [K, N], scale [N] float32, zero point [N]), per output column:
    int8 symmetric (codes in [-127, 127], zero point 0) or uint8 asymmetric (range holds 0)."""
    if wtype == "int8":
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        return q, scale.astype(np.float32), np.zeros(w.shape[1], np.int8)
    lo, hi = np.minimum(w.min(axis=0), 0.0), np.maximum(w.max(axis=0), 0.0)
    scale = np.maximum(hi - lo, 1e-12) / 255.0
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    q = np.clip(np.rint(w / scale) + zp, 0, 255).astype(np.uint8)
    return q, scale.astype(np.float32), zp.astype(np.uint8)


def quantize_linears_per_row(model: Any, keys: tuple[str, ...], wtype: str = "int8") -> list[str]:
    """Turn every fp32 MatMul with a constant weight whose name holds one of `keys` into an int8
    GEMM whose activations are quantized row by row (in place; returns the linears' names):

        x [B,S,K] ─Abs─ReduceMax(K)─Max(eps)─> r [B,S,1]         (one r per token)
        x ─Mul 1/r─QuantizeLinear(1/127, zero point 128)─> xq uint8 [B,S,K]
        MatMulIntegerToFloat(xq, Wq, 1/127, w_scale, 128, w_zp) ─Mul r─> y [B,S,N]

    Each token gets the full 8-bit range of its own values, and its codes, hence its output, do not
    depend on the other rows of the call: a text embeds to the same vector alone or beside longer
    ones (ORT's DynamicQuantizeLinear took one scale for the whole call). Weights per output column
    (_quantize_weight). Linears that read the same tensor share its quantization."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    add = model.graph.initializer.append
    add(numpy_helper.from_array(np.array(1e-12, np.float32), names.ROW_QUANT_EPS))
    add(numpy_helper.from_array(np.array(1.0 / 127.0, np.float32), names.ROW_QUANT_SCALE))
    add(numpy_helper.from_array(np.array(128, np.uint8), names.ROW_QUANT_ZERO_POINT))
    nodes, done, quantized = [], [], {}  # quantized: input name -> (xq, r)
    for n in model.graph.node:
        if n.op_type != "MatMul" or not any(k in n.name for k in keys) or n.input[1] not in inits:
            nodes.append(n)
            continue
        base = names.linear_of_node(n.name)
        x = n.input[0]
        if x not in quantized:
            t = f"{base}/row_quant"
            nodes += [helper.make_node("Abs", [x], [f"{t}/abs"], name=f"{t}/Abs"),
                      helper.make_node("ReduceMax", [f"{t}/abs"], [f"{t}/amax"], name=f"{t}/ReduceMax", axes=[-1], keepdims=1),
                      helper.make_node("Max", [f"{t}/amax", names.ROW_QUANT_EPS], [f"{t}/r"], name=f"{t}/Max"),
                      # Reciprocal of [B,S,1] + Mul: the [B,S,K] Div took 1.6x the time of a Mul
                      helper.make_node("Reciprocal", [f"{t}/r"], [f"{t}/inv"], name=f"{t}/Reciprocal"),
                      helper.make_node("Mul", [x, f"{t}/inv"], [f"{t}/x"], name=f"{t}/Mul"),
                      helper.make_node("QuantizeLinear", [f"{t}/x", names.ROW_QUANT_SCALE, names.ROW_QUANT_ZERO_POINT],
                                       [f"{t}/xq"], name=f"{t}/QuantizeLinear")]
            quantized[x] = (f"{t}/xq", f"{t}/r")
        xq, r = quantized[x]
        q, scale, zp = _quantize_weight(numpy_helper.to_array(inits[n.input[1]]).astype(np.float32), wtype)
        wq, wzp, ws = names.weight_quantized(base), names.weight_zero_point(base), names.weight_scale(base)
        add(numpy_helper.from_array(q, wq))
        add(numpy_helper.from_array(zp, wzp))
        add(numpy_helper.from_array(scale, ws))
        model.graph.initializer.remove(inits.pop(n.input[1]))
        out = n.output[0]
        # NOTE: MatMulIntegerToFloat is what ORT's own fusion makes of MatMulInteger -> Cast -> Mul, but
        # that fusion needs the scale from a Mul node, which constant folding removes when both scales
        # are constants (as here): written fused, the column scales are applied inside the GEMM's output loop
        nodes += [helper.make_node("MatMulIntegerToFloat", [xq, wq, names.ROW_QUANT_SCALE, ws, names.ROW_QUANT_ZERO_POINT, wzp],
                                   [f"{base}/y_rows"], name=f"{base}/MatMulIntegerToFloat", domain=MS_DOMAIN),
                  helper.make_node("Mul", [f"{base}/y_rows", r], [out], name=f"{base}/ScaleRows")]
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
    steps = ["read weights", "build graph", "quantize" if quant == "int8" else "no quantization", "write",
             "calibrate the relevance gate", "checksum"]
    ctx = _progress(progress, f"building embedder {spec.name} ({quant})", len(steps))
    writer = BundleWriter(Path(out), kind="embedder")
    try:
        with ctx as advance:
            sha = folder.weights_sha256()
            weights = load_bert_weights(folder)
            advance()
            # int8: the qkv GEMM outside the attention op, so that it is quantized per row too, and
            # no padding mask (ORT's flash attention): the runtime batches rows of one length
            attention = "mha-unpadded" if quant == "int8" else ATTENTION_IMPL
            model = build_encoder_graph(spec, weights, attention=attention)
            padding = PADDING.get(attention, "right")
            del weights
            if quant == "int8":
                smooth_linears(model, folder.tokenizer_path, spec.max_seq_length, calibration_texts())
            advance()
            qinfo = Quant(recipe="fp32")
            if quant == "int8":
                qinfo = _quantize_int8(model)
            advance()
            onnx.save_model(model, str(writer.path("model.onnx")))
            del model
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
                graph={"inputs": {n: "int32 [batch, seq] right-padded" if padding == "right" else
                                  "int32 [batch, seq], every row the same length (no padding)" for n in INPUTS},
                       "padding": padding,  # read by edge.runtime.embedder (how it batches)
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
