"""The initializer names of the embedder's ONNX graph: edge.build.encoder writes them, the native CPU
encoder's loader (edge.runtime.cpu.encoder) finds its arrays by them. One table, so that a rename on
one side cannot silently break the other (the runtime never imports edge/build/).

    embeddings.word, embeddings.position, embeddings.ln.{weight,bias}        EmbedLayerNormalization
    /model/layers.{i}/attn/qkv.{weight,bias}                                 fused / unfused attention
    /model/layers.{i}/attn/qkv/{q,k,v}.weight, /model/layers.{i}/attn/qkv.bias   "mha" attention
    /model/layers.{i}/{attn/o_proj, mlp/up, mlp/down}.{weight,bias}
    /model/layers.{i}/{attn_ln, mlp_ln}.{weight,bias}                        LayerNormalization
  int8 (quantize_linears_per_row, smooth_linears) replaces each `<linear>.weight` with
    <linear>.weight_{quantized,zero_point,scale}, adds const/row_quant/{eps,scale,zero_point} and
    <node>/smooth_inv (1/s of SmoothQuant) for the first node in graph order reading a smoothed input
    (the q MatMul for q, k and v).

A linear's key (`layer_key(i, O_PROJ)`) is also the prefix of its nodes' names (`matmul_node(key)`);
the int8 pass finds a linear's key back from its MatMul's name (`linear_of_node`).
"""

from __future__ import annotations

# embeddings: word [V, H], positions [P, H] (token-type row 0 folded in), LayerNorm [H]
WORD_EMBEDDINGS = "embeddings.word"
POSITION_EMBEDDINGS = "embeddings.position"
EMBED_LN_WEIGHT = "embeddings.ln.weight"
EMBED_LN_BIAS = "embeddings.ln.bias"

# the per-row activation quantisation every int8 linear shares (0-d each)
ROW_QUANT_EPS = "const/row_quant/eps"  # float32: the floor of a row's max |x|
ROW_QUANT_SCALE = "const/row_quant/scale"  # float32: 1 / 127
ROW_QUANT_ZERO_POINT = "const/row_quant/zero_point"  # uint8: 128

# scalar and shape constants of the fp32 graph
ONE = "const/one"  # float32 1 (masks: 0 valid, -1 padding)
MASK_BIG = "const/mask_big"  # float32 10000 (unfused attention's additive mask)
BIG = "const/big"  # float32 1e9 (max pooling's mask)
EPS_COUNT = "const/eps_count"  # float32 1e-9: mean pooling's floor of the token count
EPS_NORM = "const/eps_norm"  # float32 1e-12: the L2 normalisation's floor of the norm
ZERO_I64 = "const/zero_i64"  # cls pooling's Gather index
AXES_1 = "const/axes_1"
AXES_M1 = "const/axes_m1"
AXES_1_2 = "const/axes_1_2"
SPLIT_QKV = "const/split_qkv"  # [H, H, H]
SHAPE_BSND = "const/shape_bsnd"  # [0, 0, N, D]
SHAPE_BSH = "const/shape_bsh"  # [0, 0, H]

# the parts of a layer, relative to its prefix: linears (also what INT8_LINEARS matches) and layer norms
QKV = "attn/qkv"
O_PROJ = "attn/o_proj"
MLP_UP = "mlp/up"
MLP_DOWN = "mlp/down"
ATTN_LN = "attn_ln"
MLP_LN = "mlp_ln"
QKV_PARTS = ("q", "k", "v")  # the q, k and v linears apart (attention "mha"), in this order


def layer_prefix(i: int) -> str:
    """The prefix of layer i's node and initializer names."""
    return f"/model/layers.{i}"


def layer_key(i: int, part: str) -> str:
    """The key of a part of layer i (QKV, O_PROJ, MLP_UP, MLP_DOWN, ATTN_LN, MLP_LN)."""
    return f"{layer_prefix(i)}/{part}"


def qkv_key(i: int, t: str) -> str:
    """The key of layer i's q, k or v linear (t in QKV_PARTS)."""
    return f"{layer_key(i, QKV)}/{t}"


def weight(key: str) -> str:
    """fp32 weight [in, out] of a linear, or gamma of a layer norm."""
    return f"{key}.weight"


def bias(key: str) -> str:
    """A linear's bias (QKV: the q|k|v biases packed, [3H]), or beta of a layer norm."""
    return f"{key}.bias"


def weight_quantized(key: str) -> str:
    """int8 linear: 8-bit weight codes [in, out] (int8, or uint8 on x86 without VNNI)."""
    return f"{key}.weight_quantized"


def weight_zero_point(key: str) -> str:
    """int8 linear: the weight codes' zero point per output column [out]."""
    return f"{key}.weight_zero_point"


def weight_scale(key: str) -> str:
    """int8 linear: the weight codes' scale per output column [out] float32."""
    return f"{key}.weight_scale"


def matmul_node(key: str) -> str:
    """The name of the MatMul node of linear `key`."""
    return f"{key}/MatMul"


def linear_of_node(node: str) -> str:
    """The linear key of a node named under it (the inverse of matmul_node)."""
    return node.rsplit("/", 1)[0]


def smooth_inv(node: str) -> str:
    """1/s [in] of SmoothQuant on the input of `node`, the first node in graph order reading it."""
    return f"{node}/smooth_inv"


__all__ = [
    "WORD_EMBEDDINGS", "POSITION_EMBEDDINGS", "EMBED_LN_WEIGHT", "EMBED_LN_BIAS",
    "ROW_QUANT_EPS", "ROW_QUANT_SCALE", "ROW_QUANT_ZERO_POINT",
    "ONE", "MASK_BIG", "BIG", "EPS_COUNT", "EPS_NORM", "ZERO_I64", "AXES_1", "AXES_M1", "AXES_1_2", "SPLIT_QKV",
    "SHAPE_BSND", "SHAPE_BSH", "QKV", "O_PROJ", "MLP_UP", "MLP_DOWN", "ATTN_LN", "MLP_LN", "QKV_PARTS",
    "layer_prefix", "layer_key", "qkv_key", "weight", "bias", "weight_quantized", "weight_zero_point", "weight_scale",
    "matmul_node", "linear_of_node", "smooth_inv",
]
