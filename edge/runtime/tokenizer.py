"""Tokenizer from an engine bundle: `tokenizers` for the vocabulary, jinja2 for the chat template.

Reads tokenizer.json and tokenizer_config.json (HF layout: `chat_template`, `bos_token`,
`eos_token`, `add_bos_token`). No transformers import: the chat template is rendered the way
transformers does it (trim_blocks, lstrip_blocks, `raise_exception`, `strftime_now`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import BundleError, UsageError


def _token_text(v: Any) -> str | None:
    """tokenizer_config tokens are strings or {"content": ...} dicts."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    """encode / decode / chat template / incremental detokenization."""

    def __init__(self, tok, config: dict[str, Any] | None = None, eos_token_ids: tuple[int, ...] = ()):
        self.tok = tok
        self.config = config or {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token_id = tok.token_to_id(self.bos_token) if self.bos_token else None
        eos = set(int(i) for i in eos_token_ids)
        if self.eos_token and tok.token_to_id(self.eos_token) is not None:
            eos.add(tok.token_to_id(self.eos_token))
        self.eos_token_ids = tuple(sorted(eos))
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_token_id is not None
        tmpl = self.config.get("chat_template")
        if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), tmpl[0]["template"] if tmpl else None)
        self.chat_template: str | None = tmpl
        self._compiled = None

    @classmethod
    def from_files(cls, folder: Path, eos_token_ids: tuple[int, ...] = ()) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTok

        folder = Path(folder)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise BundleError(f"{folder}: no tokenizer.json", fix="rebuild the bundle")
        try:
            tok = HFTok.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise BundleError(f"{tj}: unreadable tokenizer ({e})", fix="rebuild the bundle") from None
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        tpl = folder / "chat_template.jinja"  # newer HF layout keeps it in its own file
        if "chat_template" not in cfg and tpl.is_file():
            cfg["chat_template"] = tpl.read_text()
        return cls(tok, cfg, eos_token_ids)

    @classmethod
    def from_bundle(cls, bundle) -> "Tokenizer":
        tok = bundle.manifest.tokenizer
        eos = tuple(sorted(set(bundle.spec.eos_token_ids) | set(tok.eos_token_ids if tok is not None else ())))
        return cls.from_files(bundle.path, eos)

    # ---- text <-> ids ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids; a BOS is prepended when the config asks for it (and it is not already there)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    # ---- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]) in the model's own format."""
        if not self.chat_template:
            raise UsageError("this model's tokenizer has no chat template", fix="pass raw text instead (--raw)")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UsageError(f"bad chat message {m!r}", fix='use {"role": "user", "content": "..."}')
        if self._compiled is None:
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise UsageError(f"chat template: {msg}")

            def strftime_now(fmt):
                import datetime

                return datetime.datetime.now().strftime(fmt)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
            self._compiled = env.from_string(self.chat_template)
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Chat prompt ids. The template writes its own special tokens; no extra BOS unless missing."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def detokenizer(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self)


@dataclass
class IncrementalDetokenizer:
    """Streams text deltas as ids arrive, never emitting half a UTF-8 character or a byte-level
    fragment: decodes a short window [prefix, read) vs [prefix, end) and emits the difference
    once it no longer ends in U+FFFD (vLLM / TGI's scheme)."""

    tokenizer: Tokenizer
    ids: list[int] = field(default_factory=list)
    prefix: int = 0
    read: int = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the end)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if after.startswith(before) else ""
