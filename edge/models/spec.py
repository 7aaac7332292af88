"""ModelSpec: the architecture of a decoder checkpoint, read from an HF folder's config.json or
a GGUF file's metadata without loading weights. The planner, the builders and every backend
use it; derived values are computed once here.

Architectures register in edge.models.arch.ARCHITECTURES (HF model_type / GGUF
general.architecture); the block's features (edge.models.arch.Features) come from the config,
q/k/v bias and tied embeddings from config and weight keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import ModelError
from edge.models.arch import ARCHITECTURES, Features, features_from_hf_config, get_arch, gguf_arch

__all__ = ["ARCHITECTURES", "ModelSpec", "read_spec", "spec_from_hf_config"]


@dataclass(frozen=True)
class ModelSpec:
    """A decoder. Shapes: hidden [H], heads n_heads x head_dim, GQA n_kv_heads; the block's
    architecture-specific features in `features` (edge.models.arch)."""

    arch: str  # source model_type, e.g. "llama", "qwen2", "mistral"
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF form, e.g. {"rope_type": "llama3", ...}
    tie_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    sliding_window: int | None = None  # tokens a sliding layer attends to (features.layer_types)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    features: Features = field(default_factory=Features)

    def __post_init__(self):
        lt = self.features.layer_types
        if lt and len(lt) != self.n_layers:
            raise ModelError(f"{len(lt)} layer types for {self.n_layers} layers", fix="check the config's layer_types")
        if "sliding" in lt and not self.sliding_window:
            raise ModelError("sliding layers without a sliding_window", fix="check the config's sliding_window")

    # ---- derived values -------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear weights as (out_features, in_features), HF names."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (self.q_size, h),
            "self_attn.k_proj": (self.kv_size, h),
            "self_attn.v_proj": (self.kv_size, h),
            "self_attn.o_proj": (h, self.q_size),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(o * k for o, k in self.linear_shapes.values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def norm_bias_params(self) -> int:
        """Norm weights (per layer, q/k norms, final) and q/k/v biases."""
        per_layer = (4 if self.features.sandwich_norms else 2) * self.hidden_size
        per_layer += 2 * self.head_dim if self.features.qk_norm else 0
        per_layer += self.q_size + 2 * self.kv_size if self.attention_bias else 0
        return self.n_layers * per_layer + self.hidden_size

    @property
    def n_params(self) -> int:
        """All parameters, counting a tied LM head once."""
        head = 0 if self.tie_embeddings else self.embedding_params
        return self.n_layers * self.layer_linear_params + self.embedding_params + head + self.norm_bias_params

    def kv_bytes_per_token(self, bytes_per_elem: float = 2.0) -> float:
        """K and V for every layer, one token."""
        return 2 * self.n_layers * self.kv_size * bytes_per_elem

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["features"] = Features.from_dict(d.get("features"))  # absent in older manifests: Llama
        return cls(**d)


def spec_from_hf_config(cfg: dict[str, Any], where: str = "config.json") -> ModelSpec:
    """ModelSpec from a transformers config dict."""
    arch = cfg.get("model_type", "")
    info = get_arch(arch, where)
    try:
        features = features_from_hf_config(cfg, where)
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        # transformers >= 5 writes `rope_parameters` {rope_type, rope_theta, factor...} instead of
        # rope_theta + rope_scaling; read both forms.
        rope = cfg.get("rope_parameters") or {}
        rope = rope.get("full_attention", rope)  # per-layer-type form (Gemma 3): the global layers'
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
                                                   if rope_type not in ("default", None) else None)
        if rope_scaling and "original_max_position_embeddings" not in rope_scaling and cfg.get("original_max_position_embeddings"):
            rope_scaling = {**rope_scaling, "original_max_position_embeddings": int(cfg["original_max_position_embeddings"])}
        return ModelSpec(
            arch=arch,
            n_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            vocab_size=int(cfg["vocab_size"]),
            max_position=int(cfg.get("max_position_embeddings", 2048)),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", info.default_attention_bias)),
            sliding_window=int(cfg["sliding_window"]) if "sliding" in features.layer_types else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=str(cfg.get("_name_or_path", "")),
            features=features,
        )
    except KeyError as e:
        raise ModelError(f"{where}: missing field {e.args[0]!r}") from None


def read_hf_spec(folder: Path) -> ModelSpec:
    """ModelSpec from an HF checkpoint folder (config.json only)."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder}: no config.json", fix="point --model at a Hugging Face checkpoint folder or a .gguf file")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_path}: not valid JSON ({e})") from None
    spec = spec_from_hf_config(cfg, str(cfg_path))
    return spec if spec.name else ModelSpec.from_dict({**spec.to_dict(), "name": Path(folder).name})


def _gguf_reader(path: Path):
    import gguf  # build-time dependency

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated / not a GGUF: gguf raises ValueError, struct errors...
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})", fix="re-download the file") from None


def gguf_field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf_spec(path: Path, reader=None) -> ModelSpec:
    """ModelSpec from a GGUF file's metadata. The block's features come from the architecture's
    own `features` function, over the HF config keys its `gguf_config` derives from the metadata."""
    r = reader or _gguf_reader(path)
    info = gguf_arch(gguf_field(r, "general.architecture", ""), str(path))
    arch = info.model_type
    p = f"{info.gguf_arch}."

    def need(key: str) -> Any:
        v = gguf_field(r, p + key)
        if v is None:
            raise ModelError(f"{path}: GGUF metadata lacks '{p + key}'")
        return v

    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    vocab = gguf_field(r, p + "vocab_size")
    if vocab is None:
        toks = r.fields.get("tokenizer.ggml.tokens")
        vocab = len(toks.data) if toks is not None else None
    if vocab is None:
        raise ModelError(f"{path}: GGUF metadata gives no vocabulary size")
    names = {t.name for t in r.tensors}
    eos = gguf_field(r, "tokenizer.ggml.eos_token_id")
    scaling = None
    if gguf_field(r, p + "rope.scaling.type") not in (None, "none"):
        scaling = {"rope_type": gguf_field(r, p + "rope.scaling.type"), "factor": gguf_field(r, p + "rope.scaling.factor")}
    factors = {t.name: t for t in r.tensors if t.name in ("rope_factors_short.weight", "rope_factors_long.weight")}
    if factors:  # LongRoPE (llama.cpp writes Phi-3's factors as tensors)
        if len(factors) != 2 or gguf_field(r, p + "rope.scaling.original_context_length") is None:
            raise ModelError(f"{path}: LongRoPE factors without their pair or original_context_length", fix="re-convert the model")
        scaling = {"rope_type": "longrope", "original_max_position_embeddings": int(gguf_field(r, p + "rope.scaling.original_context_length")),
                   "short_factor": [float(x) for x in factors["rope_factors_short.weight"].data],
                   "long_factor": [float(x) for x in factors["rope_factors_long.weight"].data]}
        if gguf_field(r, p + "rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(gguf_field(r, p + "rope.scaling.attn_factor"))
    n_layers = int(need("block_count"))
    head_dim = int(gguf_field(r, p + "attention.key_length", hidden // n_heads))
    base = {"model_type": arch, "hidden_size": hidden, "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "head_dim": head_dim}
    cfg = {**base, **info.gguf_config(lambda key, default=None: gguf_field(r, p + key, default), base)}
    features = features_from_hf_config(cfg, str(path))
    return ModelSpec(
        arch=arch,
        n_layers=n_layers,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(gguf_field(r, p + "attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        vocab_size=int(vocab),
        max_position=int(gguf_field(r, p + "context_length", 2048)),
        rms_eps=float(gguf_field(r, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf_field(r, p + "rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        sliding_window=int(cfg["sliding_window"]) if "sliding" in features.layer_types else None,
        features=features,
        bos_token_id=gguf_field(r, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=str(gguf_field(r, "general.name", Path(path).stem)),
    )


def read_spec(model: str | Path) -> ModelSpec:
    """ModelSpec from an HF folder or a .gguf file (or 'default', the bundled SmolLM2)."""
    from edge.models.defaults import resolve_model

    path = resolve_model(model)
    if path.is_dir():
        return read_hf_spec(path)
    if path.suffix.lower() == ".gguf":
        return read_gguf_spec(path)
    raise ModelError(f"{path}: not a checkpoint folder or a .gguf file")
