"""Chunking: blocks -> `Chunk`s of at most `max_tokens` embedder tokens with `overlap` tokens
carried over, cut at headings first, then paragraphs, then sentences, then words.

A heading always starts a new chunk (a section never bleeds into the next); each chunk keeps its
heading path ("Install > Network > Proxy"), its source location (lines or pages) and char offsets
into the loaded text. Token counts come from the embedder's tokenizer (special tokens excluded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from rag.loaders import Block, LoadedDoc

CountTokens = Callable[[str], int]
CountMany = Callable[[list[str]], list[int]]  # the same counts for many texts in one call
HEADING_SEP = " > "  # joins a chunk's heading path: "Install > Network > Proxy"


DEFAULT_EMBED_TOKENS: int | None = None  # ChunkParams.embed_tokens' default (see its note)
FAST_EMBED_TOKENS = 128  # `edge-rag ingest --embed-tokens 128`: the measured fast setting (see the note)


# ChunkParams fields added after collections were first written, as those collections were embedded
_FIELDS_BEFORE_THEY_EXISTED = {"embed_overlap": True, "embed_tokens": None}


def stored_chunk_params(stored: dict | None) -> dict | None:
    """A collection's stored `chunk_params` meta, completed with the fields it predates as its vectors were
    then made (the overlap embedded, no cap); None where there is none."""
    return None if stored is None else {**_FIELDS_BEFORE_THEY_EXISTED, **stored}


@dataclass(frozen=True)
class ChunkParams:
    max_tokens: int = 200
    overlap: int = 40
    # NOTE: whether the overlap is embedded too. Off (the default since session 17; `edge-rag ingest
    # --embed-overlap` turns it on): a chunk's vector is computed from its own span (what the previous
    # chunk did not hold) while its text, its keyword index and the prompt keep the overlap: 13% fewer
    # tokens embedded. Session 6 (ONNX Runtime vectors) measured hybrid 0.98 -> 0.96 and kept it on.
    # Session 17 (native encoder, docs/measurements.md #15): the scale corpus ingested 1.21x faster, hybrid recall@5
    # 0.96 either way with flat and HNSW (IVF-PQ 0.96 -> 0.94), hybrid MRR 0.908 -> 0.895, vector
    # recall@5 0.88 -> 0.90; the three answer corpora: the same recall@5, MRR and gate decisions on every
    # question set, and held-out answers 20/24, 20/22, 21/22 (20, 20, 20 with the overlap), each >= llama.cpp
    # on the same prompts. A collection keeps the setting it was ingested with (edge.cli.rag_cmd).
    embed_overlap: bool = False
    # NOTE: the most tokens of a chunk's embedded text ([CLS] and [SEP] included) the embedder reads
    # (None: its max_seq_length, `edge-rag ingest --embed-tokens 0`). The vector comes from the chunk's
    # head (title, heading, first tokens); its stored text, keyword index and prompt keep every token.
    # all-MiniLM-L6-v2 was trained on 128-token inputs. Measured on the scale corpus (docs/measurements.md #15,
    # session 7; 31,008 chunks of 182 tokens on average, HNSW, the shipped fusion): hybrid recall@5
    # 0.98 with any cap (160 / 144 / 128 / none), hybrid MRR 0.908 / 0.895 / 0.865 / 0.918, vector
    # recall@5 0.90 / 0.94 / 0.92 / 0.90; ingest of shard 0/10 1.20x / 1.30-1.35x / 1.48-1.54x the
    # uncapped one, and 128 tokens 3.15-3.46x the code before #15 (2.13-2.29x uncapped).
    # Not the default: the cap re-orders the passages of 78 of the 124 answer-bench prompts, and asked
    # with it edge-rag falls behind llama.cpp on the same prompts on the manuals held-out set (session 9
    # on ONNX Runtime: one question; session 15 on native: 18 vs 20 of 22). The user's choice.
    embed_tokens: int | None = DEFAULT_EMBED_TOKENS

    def __post_init__(self) -> None:
        from edge.errors import UsageError

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 8:
            raise UsageError(f"chunk size {self.max_tokens!r} tokens is too small", fix="use --chunk-tokens 8 or more")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not 0 <= self.overlap <= self.max_tokens // 2:
            raise UsageError(f"overlap {self.overlap!r} tokens does not fit chunks of {self.max_tokens}",
                             fix=f"use --overlap from 0 to {self.max_tokens // 2} (half the chunk)")
        if not isinstance(self.embed_overlap, bool):
            raise UsageError(f"embed_overlap must be true or false, got {self.embed_overlap!r}")
        if self.embed_tokens is not None and (isinstance(self.embed_tokens, bool) or not isinstance(self.embed_tokens, int)
                                              or self.embed_tokens < 8):
            raise UsageError(f"embed_tokens {self.embed_tokens!r} is too small", fix="use --embed-tokens 8 or more")


@dataclass
class Chunk:
    """One retrievable passage."""

    text: str
    heading: str  # heading path, HEADING_SEP-joined; "" before the first heading
    loc_start: int  # 1-based line (or page), inclusive
    loc_end: int
    char_start: int  # offsets into LoadedDoc.text
    char_end: int
    n_tokens: int
    ordinal: int = 0  # position within its document
    own_start: int | None = None  # where the text this chunk adds begins (after the overlap); None: char_start

    def embed_text(self, title: str = "", overlap: bool = True) -> str:
        """What gets embedded: the heading path gives a short passage its context; without
        `overlap`, only the chunk's own span (the tokens carried from the previous chunk left out)."""
        head = HEADING_SEP.join(x for x in (title, self.heading) if x)
        text = self.text if overlap or self.own_start is None else self.text[self.own_start - self.char_start:]
        return f"{head}\n{text}" if head else text


@dataclass
class _Piece:
    """A span of a block: the unit the packer works with."""

    start: int
    end: int
    block: Block
    tokens: int


_SENT = re.compile(r"(?<=[.!?:;])\s+|\n+")
_WORD = re.compile(r"\s+")


def _split_spans(text: str, base: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    """Cut text[..] at `pattern`, returning absolute (start, end) spans without the separators."""
    spans, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            spans.append((base + pos, base + m.start()))
        pos = m.end()
    if pos < len(text):
        spans.append((base + pos, base + len(text)))
    return spans


class Chunker:
    """Cut a LoadedDoc into chunks. `count_tokens(text)` may include special tokens; the count of
    an empty string is subtracted so that sums of pieces approximate the whole. `count_many`, where
    the embedder has it, counts a document's blocks (and a long block's sentences) in one call: one
    tokenizer call per text cost 0.9 s of a 12 s ingest of 50 pydoc pages (docs/measurements.md #15, session 17)."""

    def __init__(self, count_tokens: CountTokens, params: ChunkParams = ChunkParams(),
                 count_many: CountMany | None = None):
        self.params = params
        self._count_raw = count_tokens
        self._count_many = count_many
        self._counted: dict[str, int] = {}  # raw counts of the texts count_many was given, this document's
        self._special = count_tokens("")

    def count(self, text: str) -> int:
        raw = self._counted.get(text)
        return max(0, (self._count_raw(text) if raw is None else raw) - self._special)

    def _count_ahead(self, texts: list[str]) -> None:
        if self._count_many is not None:
            todo = list(dict.fromkeys(t for t in texts if t not in self._counted))
            if todo:
                self._counted.update(zip(todo, self._count_many(todo)))

    # -- splitting a block into pieces that each fit max_tokens
    def _pieces(self, doc: LoadedDoc, block: Block) -> list[_Piece]:
        n = self.count(block.text)
        if n <= self.params.max_tokens:
            return [_Piece(block.char_start, block.char_end, block, n)]
        out: list[_Piece] = []
        spans = _split_spans(block.text, block.char_start, _SENT)
        self._count_ahead([doc.text[s:e] for s, e in spans])
        for s, e in spans:
            t = self.count(doc.text[s:e])
            if t <= self.params.max_tokens:
                out.append(_Piece(s, e, block, t))
                continue
            # A sentence longer than a chunk (tables, logs): cut at words into max-sized windows.
            words = _split_spans(doc.text[s:e], s, _WORD)
            cur_s, cur_t, last_e = None, 0, s
            for ws, we in words:
                wt = max(1, self.count(doc.text[ws:we]))
                if cur_s is not None and cur_t + wt > self.params.max_tokens:
                    out.append(_Piece(cur_s, last_e, block, cur_t))
                    cur_s, cur_t = None, 0
                if cur_s is None:
                    cur_s = ws
                cur_t += wt
                last_e = we
            if cur_s is not None:
                out.append(_Piece(cur_s, last_e, block, cur_t))
        return out

    def chunk(self, doc: LoadedDoc) -> list[Chunk]:
        """All chunks of a document, in reading order."""
        chunks: list[Chunk] = []
        path: list[tuple[int, str]] = []  # heading stack: (level, title)
        section: list[_Piece] = []
        self._counted.clear()
        self._count_ahead([b.text for b in doc.blocks if not b.heading_level])

        def flush_section() -> None:
            if section:
                chunks.extend(self._pack(doc, section, HEADING_SEP.join(t for _, t in path)))
                section.clear()

        for block in doc.blocks:
            if block.heading_level:
                flush_section()
                while path and path[-1][0] >= block.heading_level:
                    path.pop()
                path.append((block.heading_level, " ".join(block.text.split())))
                continue
            section.extend(self._pieces(doc, block))
        flush_section()
        if not chunks:  # headings only (a stub page, a file edited down to its title): keep them as text
            path.clear()
            for block in doc.blocks:
                section.extend(self._pieces(doc, block))
            flush_section()
        for i, c in enumerate(chunks):
            c.ordinal = i
        return chunks

    def _pack(self, doc: LoadedDoc, pieces: list[_Piece], heading: str) -> list[Chunk]:
        """Greedy packing of consecutive pieces up to max_tokens; the next chunk starts with the
        trailing pieces of the previous one that fit in `overlap` tokens."""
        P = self.params
        out: list[Chunk] = []
        i = own = 0  # pieces[i:own] are carried from the previous chunk
        while i < len(pieces):
            j, tot = i, 0
            while j < len(pieces) and (j == i or tot + pieces[j].tokens <= P.max_tokens):
                tot += pieces[j].tokens
                j += 1
            out.append(self._make(doc, pieces[i:j], heading, pieces[max(i, own)].start))
            if j >= len(pieces):
                break
            # overlap: walk back from j-1 while the carried tokens fit, but always advance
            k, carried = j, 0
            while k - 1 > i and carried + pieces[k - 1].tokens <= P.overlap:
                carried += pieces[k - 1].tokens
                k -= 1
            # NOTE: carry only what fits together with the next piece; otherwise the overlap
            # would become a chunk of its own ("Most common causes, in order:" alone).
            while k < j and carried + pieces[j].tokens > P.max_tokens:
                carried -= pieces[k].tokens
                k += 1
            i, own = k, j  # piece j always fits the next chunk (the loop above): its own span starts there
        return out

    def _make(self, doc: LoadedDoc, pieces: list[_Piece], heading: str, own_start: int) -> Chunk:
        s, e = pieces[0].start, pieces[-1].end
        # Text of the span; where pieces come from different blocks keep the source's text
        # (paragraph breaks included) so char offsets stay exact.
        text = doc.text[s:e]
        a, _ = doc.loc_of(pieces[0].start, pieces[0].end, pieces[0].block)
        _, b = doc.loc_of(pieces[-1].start, pieces[-1].end, pieces[-1].block)
        return Chunk(text=text, heading=heading, loc_start=a, loc_end=max(a, b), char_start=s,
                     char_end=e, n_tokens=sum(p.tokens for p in pieces), own_start=own_start)


def chunk_doc(doc: LoadedDoc, count_tokens: CountTokens, params: ChunkParams = ChunkParams(),
              count_many: CountMany | None = None) -> list[Chunk]:
    """Convenience: `Chunker(count_tokens, params, count_many).chunk(doc)`."""
    return Chunker(count_tokens, params, count_many).chunk(doc)
