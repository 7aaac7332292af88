"""Grounding: keep an answer's citations honest and say when the answer is not in the passages.

Two steps, after the prompt and around the generator's stream:

1. `CitationFilter` sits in the token stream: a bracketed citation is held back until it closes,
   then passed on when every number in it names a passage that exists, rewritten to the valid
   numbers when some do, and dropped when none do ("[7]" with three passages). Everything else
   passes through unchanged. So no answer the user sees cites a passage that does not exist.
2. `ground(answer, passages)` measures how much of the answer's content (words, numbers, codes)
   each passage holds. An answer is grounded when one passage holds at least MIN_SUPPORT of its
   content terms (cited or not); an uncited but grounded answer is attributed to that passage. An ungrounded answer (an invention, or only "[1] [2] [3]") gets a note that says
   so and quotes the passage sentences that best match the question (`fallback_note`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rag.retrieve import STOPWORDS, query_terms

_OPEN_MAX = 16  # a "[" not closed within this many characters is plain text
_CITE_BODY = re.compile(r"\d+(?:\s*[,;]\s*\d+)*")
# measured on bench/bench_answers.py answers: keyword-complete answers hold >= 0.6 of their content
# terms in the passage they came from; inventions mostly < 0.4
MIN_SUPPORT = 0.5
QUOTE_CHARS = 320


class CitationFilter:
    """Streaming filter: drops or repairs citations of passages that do not exist (see module doc)."""

    def __init__(self, n_passages: int):
        self.n = n_passages
        self.held = ""
        self.dropped: list[int] = []

    def _resolve(self, bracket: str) -> str:
        body = bracket[1:-1]
        if not _CITE_BODY.fullmatch(body.strip()):
            return bracket
        nums = [int(x) for x in re.split(r"\s*[,;]\s*", body.strip())]
        ok = [v for v in nums if 1 <= v <= self.n]
        self.dropped += [v for v in nums if not 1 <= v <= self.n]
        return "[" + ", ".join(map(str, ok)) + "]" if ok else ""

    def feed(self, piece: str) -> str:
        out = []
        for ch in piece:
            if self.held:
                self.held += ch
                if ch == "]":
                    out.append(self._resolve(self.held))
                    self.held = ""
                elif ch == "[":  # a new bracket: the held one was text
                    out.append(self.held[:-1])
                    self.held = "["
                elif len(self.held) > _OPEN_MAX or ch == "\n":
                    out.append(self.held)
                    self.held = ""
            elif ch == "[":
                self.held = "["
            else:
                out.append(ch)
        return "".join(out)

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return rest


def content_terms(text: str) -> list[str]:
    """The words that carry an answer: no stopwords, no citation numbers, no filler."""
    text = re.sub(r"\[\d+(?:\s*[,;]\s*\d+)*\]", " ", text)
    return [t for t in query_terms(text) if t not in _FILLER]


_FILLER = STOPWORDS | frozenset("""
passage passages document documents answer question according provided text states says mentioned
following also given based information context cover covers covered see
""".split())


def support(answer: str, passage: str) -> float:
    """Share of the answer's content terms found in the passage (0 when the answer has none)."""
    terms = content_terms(answer)
    if not terms:
        return 0.0
    low = " ".join(passage.lower().split())
    return sum(1 for t in terms if t in low) / len(terms)


@dataclass
class Grounding:
    cited: list[int]  # valid passage numbers the answer cites
    support: list[float]  # per passage, in passage order
    attributed: int | None  # the best-supporting passage when the answer cites none
    grounded: bool
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> int | None:
        return 1 + max(range(len(self.support)), key=self.support.__getitem__) if self.support else None


def ground(answer: str, passages: list[str], cited: list[int]) -> Grounding:
    """Decide whether `answer` is backed by the passages (texts in passage order, 1-based numbers).
    A citation alone does not ground an answer: a confident invention ending in [1] is flagged too."""
    sup = [support(answer, p) for p in passages]
    g = Grounding(list(cited), sup, None, False)
    best = g.best
    if not content_terms(answer):
        g.notes.append("the answer has no content of its own")
    elif best is not None and sup[best - 1] >= MIN_SUPPORT:
        g.grounded = True
        if not cited:
            g.attributed = best
    else:
        g.notes.append(f"at most {max(sup, default=0):.0%} of the answer's content is in one passage")
    return g


def best_quote(question: str, text: str, limit: int = QUOTE_CHARS) -> str:
    """The sentence of `text` holding the most question terms, with its neighbour when short."""
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n{2,}", text) if s.strip()]
    if not sents:
        return ""
    terms = query_terms(question)
    scores = [sum(1 for t in terms if t in s.lower()) for s in sents]
    i = max(range(len(sents)), key=lambda k: (scores[k], -k))
    quote = sents[i]
    if len(quote) < limit // 2 and i + 1 < len(sents):
        quote += " " + sents[i + 1]
    quote = " ".join(quote.split())
    return quote if len(quote) <= limit else quote[: limit - 3].rsplit(" ", 1)[0] + "..."


def fallback_note(question: str, passage_n: int, passage_text: str, where: str) -> str:
    """What the user sees after an ungrounded answer: a warning and the best passage's words."""
    return (f"\n\n(This answer is not backed by the passages. Closest passage [{passage_n}], {where}: "
            f"\"{best_quote(question, passage_text)}\")")
