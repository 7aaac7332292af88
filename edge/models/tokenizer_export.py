"""Tokenizer files for an engine bundle: `tokenizer.json` (a `tokenizers` serialization) and
`tokenizer_config.json` (chat template, special tokens with their ids).

- HF folder: tokenizer.json is copied; the chat template comes from tokenizer_config.json,
  chat_template.jinja or chat_template.json.
- GGUF: tokenizer.json is built from the GGUF vocabulary/merges by transformers' GGUF tokenizer
  conversion (build time only); chat template and bos/eos from the GGUF metadata.

The bundle's tokenizer_config.json has these keys (what the runtime reads):
  bos_token, eos_token (str | null), bos_token_id, eos_token_id (int | null),
  eos_token_ids (list[int]: every id that ends generation), pad_token, add_bos_token (bool;
  informational: tokenizer.json's post-processor already adds BOS when the model wants it),
  chat_template (jinja str | null), source ("hf" | "gguf").
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge.errors import ModelError
from edge.models.spec import ModelSpec


@dataclass
class TokenizerConfig:
    bos_token: str | None = None
    eos_token: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token: str | None = None
    add_bos_token: bool = False
    chat_template: str | None = None
    source: str = "hf"

    def to_dict(self) -> dict:
        return asdict(self)


def _token_str(v) -> str | None:
    """Special tokens appear as a string or as a serialized AddedToken {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _hf_chat_template(folder: Path, cfg: dict) -> str | None:
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if tpl:
        return tpl
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        try:
            return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
    return None


def _finish(cfg: TokenizerConfig, tok_json: Path, spec: ModelSpec) -> TokenizerConfig:
    """Fill ids from token strings (and the reverse) using the tokenizer itself."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tok_json))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ModelError(f"{tok_json}: not a valid tokenizer.json ({str(e)[:120]})", fix="re-download the checkpoint's tokenizer files") from None
    if cfg.bos_token_id is None and cfg.bos_token is not None:
        cfg.bos_token_id = tok.token_to_id(cfg.bos_token)
    if cfg.eos_token_id is None and cfg.eos_token is not None:
        cfg.eos_token_id = tok.token_to_id(cfg.eos_token)
    if cfg.bos_token is None and cfg.bos_token_id is not None:
        cfg.bos_token = tok.id_to_token(cfg.bos_token_id)
    if cfg.eos_token is None and cfg.eos_token_id is not None:
        cfg.eos_token = tok.id_to_token(cfg.eos_token_id)
    if cfg.bos_token_id is None:
        cfg.bos_token_id = spec.bos_token_id
    eos = list(cfg.eos_token_ids) + ([cfg.eos_token_id] if cfg.eos_token_id is not None else []) + list(spec.eos_token_ids)
    cfg.eos_token_ids = sorted({int(e) for e in eos})
    if cfg.eos_token_id is None and cfg.eos_token_ids:
        cfg.eos_token_id = cfg.eos_token_ids[0]
        cfg.eos_token = tok.id_to_token(cfg.eos_token_id)
    return cfg


def export_hf_tokenizer(folder: Path, out_dir: Path, spec: ModelSpec) -> TokenizerConfig:
    """Copy tokenizer.json and write the normalized tokenizer_config.json into out_dir."""
    folder = Path(folder)
    src = folder / "tokenizer.json"
    if not src.is_file():
        raise ModelError(f"{folder}: no tokenizer.json", fix="save the tokenizer with the model (tokenizer.save_pretrained(folder)) so that the fast tokenizer file exists")
    raw = {}
    if (folder / "tokenizer_config.json").is_file():
        try:
            raw = json.loads((folder / "tokenizer_config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{folder / 'tokenizer_config.json'}: not valid JSON", fix="re-download the checkpoint's tokenizer files") from None
    gen_eos: list[int] = []
    if (folder / "generation_config.json").is_file():
        try:
            e = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
            gen_eos = list(e) if isinstance(e, list) else ([e] if isinstance(e, int) else [])
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    cfg = TokenizerConfig(
        bos_token=_token_str(raw.get("bos_token")),
        eos_token=_token_str(raw.get("eos_token")),
        pad_token=_token_str(raw.get("pad_token")),
        add_bos_token=bool(raw.get("add_bos_token", False)),
        chat_template=_hf_chat_template(folder, raw),
        eos_token_ids=gen_eos,
        source="hf",
    )
    out_dir = Path(out_dir)
    shutil.copyfile(src, out_dir / "tokenizer.json")
    cfg = _finish(cfg, out_dir / "tokenizer.json", spec)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return cfg


# GGUF byte-level BPE pre-tokenizers we convert ourselves (tokenizer.ggml.pre -> split regex; None:
# GPT-2's, inside ByteLevel), byte-identical to transformers' conversion (tests/test_readers.py)
# and without it: transformers' GGUF reader imports torch, which the runtime and `make demo` skip.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE_TOKENIZERS = {"qwen2": _QWEN2_SPLIT, "smollm": None, "gpt2": None, "default": None}
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types


def gguf_bpe_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` from a GGUF's byte-level BPE vocabulary, or None when the GGUF's
    tokenizer is of another kind (SentencePiece) or pre-tokenizer (left to transformers)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    r = GGUFReader(str(path))

    def strings(key: str) -> list[str]:
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key: str, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        v = f.parts[f.data[0]]
        return bytes(v).decode("utf-8") if f.types[0].name == "STRING" else v.tolist()[0]

    pre = scalar("tokenizer.ggml.pre", "default")
    if scalar("tokenizer.ggml.model") != "gpt2" or pre not in BPE_PRE_TOKENIZERS or "tokenizer.ggml.merges" not in r.fields:
        return None
    tokens = strings("tokenizer.ggml.tokens")
    f = r.fields["tokenizer.ggml.token_type"]
    types = [int(f.parts[i][0]) for i in f.data]
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False, ignore_merges=False))
    split = BPE_PRE_TOKENIZERS[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
                    for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)])
    return tok


def export_gguf_tokenizer(path: Path, out_dir: Path, spec: ModelSpec) -> TokenizerConfig:
    """Build tokenizer.json from GGUF metadata (our byte-level BPE converter, else transformers')
    and write both files."""
    from edge.models.gguf import gguf_tokenizer_metadata

    path = Path(path)
    meta = gguf_tokenizer_metadata(path)
    own = gguf_bpe_tokenizer(path)
    tok = pad = None
    if own is not None:
        own.save(str(Path(out_dir) / "tokenizer.json"))
        from gguf import GGUFReader

        f = GGUFReader(str(path)).fields.get("tokenizer.ggml.padding_token_id")
        pad = own.id_to_token(int(f.parts[f.data[0]][0])) if f is not None else None
    else:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ModelError("building this GGUF's tokenizer needs transformers", fix="pip install 'edge-rag[dev]'") from None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                tok.save_pretrained(tmp)
            except Exception as e:  # converter errors are untyped; name the tokenizer model
                raise ModelError(
                    f"{path}: cannot convert the GGUF tokenizer (model {meta.get('model')!r}: {type(e).__name__}: {str(e)[:120]})",
                    fix="use the Hugging Face folder of the model, which has tokenizer.json",
                ) from None
            shutil.copyfile(Path(tmp) / "tokenizer.json", Path(out_dir) / "tokenizer.json")
    cfg = TokenizerConfig(
        bos_token=meta["bos_token"],
        eos_token=meta["eos_token"],
        bos_token_id=meta["bos_token_id"],
        eos_token_id=meta["eos_token_id"],
        pad_token=pad if own is not None else _token_str(getattr(tok, "pad_token", None)),
        add_bos_token=meta["add_bos_token"],
        chat_template=meta["chat_template"],
        source="gguf",
    )
    cfg = _finish(cfg, Path(out_dir) / "tokenizer.json", spec)
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return cfg


def export_tokenizer(model_path: Path, out_dir: Path, spec: ModelSpec) -> TokenizerConfig:
    """tokenizer.json + tokenizer_config.json for the checkpoint at model_path, into out_dir."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return export_hf_tokenizer(model_path, out_dir, spec)
    return export_gguf_tokenizer(model_path, out_dir, spec)
