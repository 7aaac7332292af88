"""Per-architecture features of the decoder block, registered per model_type.

Every lowering (the numpy reference, ONNX for ONNX Runtime, ONNX for TensorRT, CUDA) reads a
ModelSpec's `features`; none tests `arch == ...`. A block is, for every architecture here:

    h = embed(ids) * embed_scale
    per layer i (attention over all earlier tokens, or the last `sliding_window` on a sliding layer):
        a = attn(norm_attn_in(h))            q/k: per-head RMSNorm first when qk_norm, then RoPE
        h = h + (norm_attn_out(a) if sandwich_norms else a)      (RoPE base rope_local_theta on sliding layers)
        m = down(act(gate(x)) * up(x)), x = norm_mlp_in(h)
        h = h + (norm_mlp_out(m) if sandwich_norms else m)
    logits = norm(h) @ head.T, soft-capped when final_softcap

Scores are q.k * attn_scale (default 1/sqrt(head_dim)), soft-capped as cap * tanh(s / cap)
when attn_softcap. Gemma stores RMSNorm weights as w and applies (1 + w): readers fold the
offset into the stored weights (`norm_weight_offset`), so every lowering applies plain RMSNorm.
Phi-3 stores fused qkv_proj / gate_up_proj: readers split them into HF q/k/v and gate/up (the
lowerings fuse them back where their kernels want it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from edge.errors import ModelError

ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full", "sliding")


@dataclass(frozen=True)
class Features:
    """What distinguishes one decoder block from another. Defaults: Llama."""

    norm_weight_offset: float = 0.0  # Gemma: (1 + w); folded into weights by the readers
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and MLP (before the residual add)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k before RoPE
    activation: str = "silu"  # of the gated MLP: silu (SwiGLU) | gelu_tanh (GeGLU)
    embed_scale: float = 1.0  # Gemma: sqrt(hidden)
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim); Gemma: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None = None  # cap * tanh(score / cap) (Gemma 2; Gemma 3 configs may set it)
    final_softcap: float | None = None  # the same on the logits
    layer_types: tuple[str, ...] = ()  # per layer "full" | "sliding"; () = all full
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3), unscaled
    fused_qkv: bool = False  # checkpoint stores self_attn.qkv_proj (Phi-3)
    fused_gate_up: bool = False  # checkpoint stores mlp.gate_up_proj (Phi-3)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ModelError(f"activation {self.activation!r} is not supported", fix=f"supported: {', '.join(ACTIVATIONS)}")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ModelError(f"layer types {bad} are not supported", fix=f"supported: {', '.join(LAYER_TYPES)}")

    def sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Features":
        d = dict(d or {})
        d["layer_types"] = tuple(d.get("layer_types", ()))
        return cls(**d)


def layer_norm_names(f: Features) -> dict[str, str]:
    """Role -> HF suffix (after `model.layers.N.`) of each per-layer norm weight [H]."""
    if f.sandwich_norms:
        return {"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
                "mlp_in": "pre_feedforward_layernorm", "mlp_out": "post_feedforward_layernorm"}
    return {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}


def expected_tensors(spec) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint of `spec` (HF names, after fused weights are split) -> shape.
    The one list the readers check against: missing, unknown and mis-shaped tensors are refused."""
    f = spec.features
    h, d = spec.hidden_size, spec.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        for name in layer_norm_names(f).values():
            out[p + name + ".weight"] = (h,)
        for name, shape in spec.linear_shapes.items():
            out[p + name + ".weight"] = shape
        if spec.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (spec.q_size,)
            out[p + "self_attn.k_proj.bias"] = (spec.kv_size,)
            out[p + "self_attn.v_proj.bias"] = (spec.kv_size,)
        if f.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (d,)
            out[p + "self_attn.k_norm.weight"] = (d,)
    if not spec.tie_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, h)
    return out


def norm_weight_names(spec) -> list[str]:
    """Tensors that are RMSNorm weights (the ones norm_weight_offset applies to)."""
    names = ["model.norm.weight"]
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        names += [p + n + ".weight" for n in layer_norm_names(spec.features).values()]
        if spec.features.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names


# ---- config -> features, per model_type ----------------------------------------------------------


def _llama(cfg: dict[str, Any]) -> dict[str, Any]:
    return {}


def _sliding_all(cfg: dict[str, Any]) -> dict[str, Any]:
    """Mistral / Phi-3: every layer slides when the config gives a window."""
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        return {"layer_types": ("sliding",) * int(cfg["num_hidden_layers"])}
    return {}


def _qwen(cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen2/3: sliding only when use_sliding_window, on the layers layer_types marks."""
    if not cfg.get("use_sliding_window") or not cfg.get("sliding_window"):
        return {}
    return {"layer_types": _layer_types(cfg)}


def _layer_types(cfg: dict[str, Any]) -> tuple[str, ...]:
    n = int(cfg["num_hidden_layers"])
    if cfg.get("layer_types"):
        return tuple("sliding" if t == "sliding_attention" else "full" for t in cfg["layer_types"])
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n))


def _qwen3(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"qk_norm": True, **_qwen(cfg)}


def _gemma3(cfg: dict[str, Any]) -> dict[str, Any]:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelError(f"gemma3 activation {act!r} is not supported", fix="supported: gelu_pytorch_tanh")
    rope = cfg.get("rope_parameters") or {}
    local = (rope.get("sliding_attention") or {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
    return {
        "norm_weight_offset": 1.0, "sandwich_norms": True, "qk_norm": True, "activation": "gelu_tanh",
        "embed_scale": math.sqrt(int(cfg["hidden_size"])),
        "attn_scale": float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        # NOTE: transformers' Gemma 3 attention never applies attn_logit_softcapping (Gemma 2 did);
        # follow the implementation the checkpoints were validated with: logits only.
        "final_softcap": cfg.get("final_logit_softcapping"),
        "layer_types": _layer_types(cfg), "rope_local_theta": float(local),
    }


def _gemma3_gguf(get: Callable[[str, Any], Any], base: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's GGUF of a Gemma 3 -> the config keys _gemma3 reads. What the file does not
    store, llama.cpp fixes (llama-model.cpp, LLM_ARCH_GEMMA3) and so do we: every 6th layer global,
    local RoPE base 10000, attention scale 1/sqrt(head_dim) except the 27B (62 layers), which
    scales by 1/sqrt(hidden / heads)."""
    n = base["num_hidden_layers"]
    out: dict[str, Any] = {
        "rope_local_base_freq": 10000.0, "final_logit_softcapping": get("final_logit_softcapping", None),
        "query_pre_attn_scalar": base["hidden_size"] // base["num_attention_heads"] if n == 62 else base["head_dim"],
    }
    window = int(get("attention.sliding_window", 0) or 0)
    if window:
        return out | {"sliding_window": window, "sliding_window_pattern": 6}
    return out | {"layer_types": ["full_attention"] * n}


def _phi3(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ModelError("phi3 with partial_rotary_factor != 1 is not supported", fix="supported: Phi-3 / Phi-3.5-mini")
    return {"fused_qkv": True, "fused_gate_up": True, **_sliding_all(cfg)}


def _phi3_gguf(get: Callable[[str, Any], Any], base: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's GGUF of a Phi-3 -> the config keys _phi3 reads (0: no sliding window). Its
    LongRoPE factors are tensors (rope_factors_short / _long), read by edge.models.spec."""
    rot = get("rope.dimension_count", None)
    return {"sliding_window": int(get("attention.sliding_window", 0) or 0) or None,
            "partial_rotary_factor": int(rot) / base["head_dim"] if rot else 1.0}


def _no_gguf_config(get: Callable[[str, Any], Any], base: dict[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Arch:
    """A registered architecture: features from an HF config, and how GGUF files name it.

    GGUF metadata goes through the same `features` function: `gguf_config` turns the file's
    `{gguf_arch}.*` keys into the HF config keys `features` reads (get(key, default) reads one)."""

    model_type: str
    features: Callable[[dict[str, Any]], dict[str, Any]]
    default_attention_bias: bool = False
    gguf_arch: str | None = None  # llama.cpp's general.architecture; None: GGUF files are not read
    gguf_permuted_qk: bool = False  # llama.cpp's converter permuted q/k rows (llama RoPE layout)
    gguf_config: Callable[[Callable[[str, Any], Any], dict[str, Any]], dict[str, Any]] = _no_gguf_config


ARCHITECTURES: dict[str, Arch] = {
    a.model_type: a
    for a in (
        Arch("llama", _llama, gguf_arch="llama", gguf_permuted_qk=True),
        Arch("mistral", _sliding_all, gguf_arch="mistral", gguf_permuted_qk=True),  # sliding window on every layer
        Arch("qwen2", _qwen, default_attention_bias=True, gguf_arch="qwen2"),
        Arch("qwen3", _qwen3, gguf_arch="qwen3"),
        Arch("gemma3_text", _gemma3, gguf_arch="gemma3", gguf_config=_gemma3_gguf),
        Arch("phi3", _phi3, gguf_arch="phi3", gguf_config=_phi3_gguf),
    )
}


def gguf_arch(name: str, where: str) -> Arch:
    """The architecture of a GGUF whose general.architecture is `name`, or a one-line ModelError."""
    for a in ARCHITECTURES.values():
        if a.gguf_arch == name:
            return a
    raise ModelError(f"{where}: unsupported GGUF architecture '{name}'",
                     fix=f"supported GGUF architectures: {', '.join(sorted(a.gguf_arch for a in ARCHITECTURES.values() if a.gguf_arch))}")


def get_arch(model_type: str, where: str) -> Arch:
    """The registered architecture, or a one-line ModelError listing the supported ones."""
    if model_type not in ARCHITECTURES:
        raise ModelError(f"{where}: unsupported architecture '{model_type}'", fix=f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def features_from_hf_config(cfg: dict[str, Any], where: str) -> Features:
    return Features(**get_arch(cfg.get("model_type", ""), where).features(cfg))


# Features the readers consume (folded into or split out of the stored weights): no lowering sees them.
READER_FEATURES = ("norm_weight_offset", "fused_qkv", "fused_gate_up")


def block_features(spec) -> list[str]:
    """The features of `spec` that a lowering must implement beyond the Llama block (a backend
    declares which it supports; the others refuse the model by these names)."""
    f, base = spec.features, Features()
    return [n for n in Features.__dataclass_fields__ if n not in READER_FEATURES and getattr(f, n) != getattr(base, n)]
