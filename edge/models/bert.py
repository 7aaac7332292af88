"""Reader for sentence-transformers folders of the BERT family (all-MiniLM, BGE, E5 ...).

    <folder>/config.json                 HF BertConfig (model_type "bert")
    <folder>/model.safetensors           weights (pytorch_model.bin is refused: pickles run code)
    <folder>/tokenizer.json              fast tokenizer (the runtime uses `tokenizers`)
    <folder>/modules.json                the module pipeline: Transformer -> Pooling [-> Normalize]
    <folder>/1_Pooling/config.json       pooling mode (mean / cls / max)
    <folder>/sentence_bert_config.json   max_seq_length (sentence-transformers >= 6: tokenizer_config's
                                     model_max_length)

Older sentence-transformers releases put the transformer in a sub-folder (modules.json path
"0_Transformer"); the Transformer module's path is followed. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import ModelError

# HF model_type -> encoder family we build. Features come from config and weight keys.
ENCODER_ARCHITECTURES: dict[str, str] = {"bert": "bert"}

# Weight key prefixes that some exports add in front of the BertModel names.
_KEY_PREFIXES = ("bert.", "model.", "0.auto_model.", "auto_model.")
POOLING_MODES = ("mean", "cls", "max")


@dataclass(frozen=True)
class EncoderSpec:
    """A BERT-family sentence encoder. Shapes: hidden [H] = n_heads x head_dim, FFN [I]."""

    name: str
    arch: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    vocab_size: int
    max_position: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    max_seq_length: int  # sentence-transformers truncation length (tokens incl. [CLS]/[SEP])
    pooling: str  # "mean" | "cls" | "max"
    normalize: bool  # 2_Normalize in modules.json: L2-normalised outputs
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def dim(self) -> int:
        """Output embedding dimension (pooling keeps the hidden size)."""
        return self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dim"] = self.dim
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderSpec":
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in fields})


@dataclass(frozen=True)
class BertFolder:
    """A validated sentence-transformers folder: where things are and what they say."""

    root: Path
    transformer_dir: Path  # holds config.json, model.safetensors, tokenizer.json
    spec: EncoderSpec

    @property
    def weights_path(self) -> Path:
        return self.transformer_dir / "model.safetensors"

    @property
    def tokenizer_path(self) -> Path:
        return self.transformer_dir / "tokenizer.json"

    def weights_sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.weights_path, "rb") as f:
            while b := f.read(1 << 20):
                h.update(b)
        return h.hexdigest()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing {what}", fix="give a sentence-transformers folder (SentenceTransformer.save)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: corrupt {what} ({e})", fix="re-save or re-download the model folder") from None


def _model_name(root: Path) -> str:
    """The model's name: the README's first '# ' heading (model cards carry it), else the folder name."""
    readme = root / "README.md"
    if readme.is_file():
        in_fence = False
        for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("```"):
                in_fence = not in_fence
            elif not in_fence and line.startswith("# ") and len(line) > 2:
                return line[2:].strip().split("/")[-1]
    return root.resolve().name


def _module_class(module: dict[str, Any]) -> str:
    """'sentence_transformers.models.Pooling' (v2-5) or '...modules.pooling.Pooling' (v6) -> 'Pooling'."""
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _max_seq_length(tdir: Path, root: Path, max_pos: int) -> int:
    """sentence_bert_config.json's max_seq_length (v2-5); v6 stores it as the tokenizer's
    model_max_length; else the position table's size."""
    for d in (tdir, root):
        cfg_path = d / "sentence_bert_config.json"
        if cfg_path.is_file():
            value = _read_json(cfg_path, "sentence_bert_config.json").get("max_seq_length")
            if value:
                return min(int(value), max_pos)
    tok_cfg = tdir / "tokenizer_config.json"
    if tok_cfg.is_file():
        value = _read_json(tok_cfg, "tokenizer_config.json").get("model_max_length")
        if isinstance(value, (int, float)) and 0 < value < 1_000_000:
            return min(int(value), max_pos)
    return max_pos


def _pooling_mode(root: Path, modules: list[dict[str, Any]]) -> str:
    pool_mod = next((m for m in modules if _module_class(m) == "Pooling"), None)
    if pool_mod is None:
        raise ModelError(f"{root}: modules.json has no Pooling module", fix="only sentence-embedding folders are supported")
    cfg = _read_json(root / pool_mod.get("path", "1_Pooling") / "config.json", "pooling config")
    if "pooling_mode" in cfg and isinstance(cfg["pooling_mode"], str):  # newer format
        mode = {"mean": "mean", "cls": "cls", "max": "max"}.get(cfg["pooling_mode"])
        if mode:
            return mode
    on = [m for m, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"), ("max", "pooling_mode_max_tokens"))
          if cfg.get(key)]
    unsupported = [k for k in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
                   if cfg.get(k)]
    if len(on) != 1 or unsupported:
        raise ModelError(
            f"{root}: pooling {on + unsupported} is not supported",
            fix=f"exactly one of {POOLING_MODES} pooling modes must be set in {pool_mod.get('path')}/config.json",
        )
    return on[0]


def read_bert_folder(model_dir: str | Path) -> BertFolder:
    """Validate a sentence-transformers BERT folder and read its spec (no weights loaded)."""
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise ModelError(f"{root}: no such folder", fix="give a sentence-transformers model folder")
    modules_path = root / "modules.json"
    if not modules_path.is_file():
        raise ModelError(f"{root}: no modules.json, not a sentence-transformers folder",
                         fix="save the model with SentenceTransformer.save(folder)")
    modules = _read_json(modules_path, "modules.json")
    if not isinstance(modules, list):
        raise ModelError(f"{modules_path}: expected a list of modules", fix="re-save the model folder")
    tr = next((m for m in modules if _module_class(m) == "Transformer"), None)
    if tr is None:
        raise ModelError(f"{root}: modules.json has no Transformer module", fix="only transformer sentence encoders are supported")
    tdir = root / tr.get("path", "")
    config = _read_json(tdir / "config.json", "config.json")
    model_type = config.get("model_type")
    if model_type not in ENCODER_ARCHITECTURES:
        raise ModelError(f"{root}: model_type {model_type!r} is not supported",
                         fix=f"supported encoder architectures: {sorted(ENCODER_ARCHITECTURES)}")
    if not (tdir / "model.safetensors").is_file():
        if (tdir / "pytorch_model.bin").is_file():
            raise ModelError(f"{tdir}: only pytorch_model.bin found; edge-rag reads safetensors only (pickles can run code)",
                             fix="convert it: SentenceTransformer(folder).save(folder, safe_serialization=True)")
        raise ModelError(f"{tdir}: no model.safetensors", fix="the folder is incomplete; re-download or re-save it")
    if not (tdir / "tokenizer.json").is_file():
        raise ModelError(f"{tdir}: no tokenizer.json (fast tokenizer)",
                         fix="re-save with a fast tokenizer: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError(f"{root}: position_embedding_type {config['position_embedding_type']!r} is not supported",
                         fix="only absolute position embeddings are supported")
    act = config.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_python"):
        raise ModelError(f"{root}: hidden_act {act!r} is not supported", fix="supported: gelu")
    max_pos = int(config.get("max_position_embeddings", 512))
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if hidden % heads:
        raise ModelError(f"{root}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    spec = EncoderSpec(
        name=_model_name(root),
        arch=model_type,
        n_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        n_heads=heads,
        vocab_size=int(config["vocab_size"]),
        max_position=max_pos,
        type_vocab_size=int(config.get("type_vocab_size", 2)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        hidden_act=act,
        max_seq_length=_max_seq_length(tdir, root, max_pos),
        pooling=_pooling_mode(root, modules),
        normalize=any(_module_class(m) == "Normalize" for m in modules),
        pad_token_id=int(config.get("pad_token_id") or 0),
    )
    return BertFolder(root=root, transformer_dir=tdir, spec=spec)


def _canonical(key: str) -> str:
    for p in _KEY_PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    # TF-era checkpoints name LayerNorm parameters gamma/beta.
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def load_bert_weights(folder: BertFolder) -> dict[str, np.ndarray]:
    """All BertModel tensors as float32 numpy arrays, keyed by canonical BertModel names
    (`embeddings.word_embeddings.weight`, `encoder.layer.3.attention.self.query.weight` [out, in] ...).
    Missing or mis-shaped tensors raise ModelError naming the key."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(folder.weights_path), framework="np") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[_canonical(k)] = t.astype(np.float32) if t.dtype != np.int64 else t
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ModelError(f"{folder.weights_path}: cannot read weights ({e})", fix="re-download or re-save the model folder") from None
    s = folder.spec
    H, I = s.hidden_size, s.intermediate_size
    want = {
        "embeddings.word_embeddings.weight": (s.vocab_size, H),
        "embeddings.position_embeddings.weight": (s.max_position, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
    }
    if s.type_vocab_size > 0:
        want["embeddings.token_type_embeddings.weight"] = (s.type_vocab_size, H)
    for i in range(s.n_layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            want[p + f"attention.self.{n}.weight"] = (H, H)
            want[p + f"attention.self.{n}.bias"] = (H,)
        want |= {
            p + "attention.output.dense.weight": (H, H), p + "attention.output.dense.bias": (H,),
            p + "attention.output.LayerNorm.weight": (H,), p + "attention.output.LayerNorm.bias": (H,),
            p + "intermediate.dense.weight": (I, H), p + "intermediate.dense.bias": (I,),
            p + "output.dense.weight": (H, I), p + "output.dense.bias": (H,),
            p + "output.LayerNorm.weight": (H,), p + "output.LayerNorm.bias": (H,),
        }
    for k, shape in want.items():
        if k not in out:
            raise ModelError(f"{folder.weights_path}: missing tensor {k}", fix="the checkpoint is truncated or not a BertModel")
        if tuple(out[k].shape) != shape:
            raise ModelError(f"{folder.weights_path}: tensor {k} has shape {tuple(out[k].shape)}, config says {shape}",
                             fix="config.json does not match the weights")
    return out


# ---- the numpy reference forward (the oracle of the GPU encoder; fp32, one text at a time) ----

def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): no scipy needed."""
    x = np.asarray(x, dtype=np.float64)
    s, a = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * np.exp(-a * a)
    return s * y


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * g + b


def reference_embed(spec: EncoderSpec, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """The sentence embedding [dim] float32 of one token sequence ([CLS] ... [SEP], truncated):
    BertModel (post-LayerNorm, erf GELU, bidirectional attention) -> pooling -> L2 (when the
    spec says). Plain numpy in fp32: every faster path is checked against this."""
    t = len(ids)
    H, nh = spec.hidden_size, spec.n_heads
    d = H // nh
    x = w["embeddings.word_embeddings.weight"][np.asarray(ids)] + w["embeddings.position_embeddings.weight"][:t]
    if "embeddings.token_type_embeddings.weight" in w:
        x = x + w["embeddings.token_type_embeddings.weight"][0]
    eps = spec.layer_norm_eps
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    for i in range(spec.n_layers):
        p = f"encoder.layer.{i}."

        def lin(v: np.ndarray, name: str) -> np.ndarray:
            return v @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q, k, v = (lin(x, f"attention.self.{n}").reshape(t, nh, d).transpose(1, 0, 2) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d)  # [heads, t, t]
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v  # [heads, t, d]
        a = lin(ctx.transpose(1, 0, 2).reshape(t, H), "attention.output.dense")
        x = _layer_norm(x + a, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
        u = lin(x, "intermediate.dense")
        u = (0.5 * u * (1.0 + _erf(u / np.sqrt(2.0)))).astype(np.float32)
        x = _layer_norm(x + lin(u, "output.dense"), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    pooled = {"mean": lambda: x.mean(0), "cls": lambda: x[0], "max": lambda: x.max(0)}[spec.pooling]()
    if spec.normalize:
        pooled = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
    return pooled.astype(np.float32)
