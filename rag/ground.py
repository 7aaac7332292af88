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

from rag.chunk import HEADING_SEP
from rag.prompt import _CITE, CITE_BODY
from rag.retrieve import _TERM, STOPWORDS, holds_name, query_terms

_OPEN_MAX = 16  # a "[" not closed within this many characters is plain text
_CITE_BODY = re.compile(CITE_BODY)
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


# where the answer says it found the fact: "on lines 44-52", "(line 463)", "page 2": the prompt's
# passage headers, not the passage text
_WHERE = re.compile(r"\b(?:lines?|pages?)\s+\d+(?:\s*[-\u2013]\s*\d+)?", re.I)


def content_terms(text: str) -> list[str]:
    """The words that carry an answer: no stopwords, no citation numbers or locations, no filler."""
    text = _WHERE.sub(" ", re.sub(r"\[\d+(?:\s*[,;]\s*\d+)*\]", " ", text))
    return [t for t in query_terms(text) if t not in _FILLER]


# NOTE: "specified / stated / found / described / listed" came with the 1.5B's two-sentence answers
# ("... 12 Nm ... This is specified in the passage [1] on lines 44-52."): counted as content, they put a
# right answer below MIN_SUPPORT, and one passed on keywords alone was refused (session 6).
_FILLER = STOPWORDS | frozenset("""
passage passages document documents answer question according provided text states says mentioned
following also given based information context cover covers covered see
specified stated found described listed
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


_CODE_SPAN = re.compile(r"`{1,3}([^`]{1,80})`{1,3}")
_SPAN_TERM = re.compile(r"[a-z0-9][a-z0-9_+.-]*")


def unheld_commands(answer: str, passages: list[str]) -> list[str]:
    """The code spans of `answer` (`chsh`, `apt-mark hold <pkg>`, ```docker system prune```) whose first
    word (3+ characters, not a number; placeholders in <> skipped) no passage holds as a whole term: a
    command or option named from the model's memory, not from the documents.
    NOTE: measured on the GNU info manuals (session 21): it named `chsh`, `apt-mark hold`,
    `docker system prune`, `eth0`, `/etc/resolv.conf` in answers to uncovered questions, and none of the
    192 answers (both models, both sides of the bench, right or wrong) to the covered ones. On the pydoc
    set (session 22) it flagged 3 right answers naming `shlex.quote`, `calendar.isleap`,
    `json.JSONDecodeError`, which their pages name as "quote(s)", "isleap(year)": hence holds_name."""
    hay = "\n".join(passages).lower()
    out = []
    for span in _CODE_SPAN.findall(answer):
        words = [w.strip(".-") for w in _SPAN_TERM.findall(re.sub(r"<[^>]*>", " ", span.lower()))]
        words = [w for w in words if len(w) >= 3 and not w.replace(".", "").isdigit()]
        if words and not holds_name(hay, words[0]):
            out.append(span.strip())
    return list(dict.fromkeys(out))


# NOTE: a check for figures no passage holds was tried (session 23). Over the 1.5B int8's answers to the seven
# answer-bench sets and 80 own-words questions it warned one right answer (an example PID) and no invention
# that was not already warned; "$42.00" for a price the manuals never give passed it, since a pack "weighs 42 kg".
# Not landed.
def ground(answer: str, passages: list[str], cited: list[int]) -> Grounding:
    """Decide whether `answer` is backed by the passages (texts in passage order, 1-based numbers).
    A citation alone does not ground an answer: a confident invention ending in [1] is flagged too, and
    so is one naming a command no passage holds (unheld_commands)."""
    sup = [support(answer, p) for p in passages]
    g = Grounding(list(cited), sup, None, False)
    best = g.best
    foreign = unheld_commands(answer, passages)
    if not content_terms(answer):
        g.notes.append("the answer has no content of its own")
    elif foreign:
        g.notes.append(f"the answer names {', '.join(f'`{c}`' for c in foreign[:3])}, which no passage holds")
    elif best is not None and sup[best - 1] >= MIN_SUPPORT:
        g.grounded = True
        if not cited:
            g.attributed = best
    else:
        g.notes.append(f"at most {max(sup, default=0):.0%} of the answer's content is in one passage")
    return g


REFUSALS = ("do not cover", "does not cover", "don't cover", "not covered", "do not contain", "does not contain",
            "no information", "not mentioned", "cannot answer", "not provided")


def refuses(text: str) -> bool:
    """Whether `text` says the documents do not answer (what the system line asks for then)."""
    low = text.lower()
    return any(w in low for w in REFUSALS)


# a passage header as the prompt shows it ("[2] (manuals/x.md, lines 3-9) Heading"), copied by the model
_HEADER_COPY = re.compile(r"\[\d+\]\s*[(\[][^()\[\]\n]*?,\s*(?:lines?|pages?)\s+\d+(?:-\d+)?[)\]]")


def strip_header_copies(text: str) -> str:
    """`text` with each copied passage header ("[1] (pydoc/x.txt, lines 1-32)") cut to its citation
    ("[1]"): a header never answers, and the number still says where the words came from."""
    return _HEADER_COPY.sub(lambda m: m.group(0)[: m.group(0).index("]") + 1], text)


_UNDERLINE = re.compile(r"[=\-*~^.]{3,}")
def _heading_key(text: str) -> str:
    """A heading or an answer as compared with one: citations, '#' marks, quotes and end punctuation
    dropped, case and spacing folded."""
    t = _CITE.sub(" ", text).lower().replace("#", " ")
    return " ".join(t.split()).strip(" .:;,'\"`\u2018\u2019\u201c\u201d")


def passage_headings(texts: list[str], headings: list[str] = ()) -> list[str]:
    """The heading lines of passages, as _heading_key: a line over an underline ('====', '----': Info
    and reStructuredText titles such as "30.4.3 Related source code"), a markdown '#' line, and each
    part of a chunk's heading path ("Install > Network")."""
    out = []
    for text in texts:
        lines = text.splitlines()
        for i, line in enumerate(lines):
            under = i + 1 < len(lines) and _UNDERLINE.fullmatch(lines[i + 1].strip()) is not None
            if line.strip() and (under or line.lstrip().startswith("#")):
                out.append(_heading_key(line))
    for h in headings:
        out += [_heading_key(x) for x in h.split(HEADING_SEP)]
    return [h for h in dict.fromkeys(out) if h]


def degenerate(answer: str, question: str, partial: bool = False, headings: list[str] = ()) -> str | None:
    """Why `answer` says nothing of its own (None when it does): only citations or copied passage
    headers ("[1] [2] [3]", "[1] (pydoc/x.txt, lines 1-32)"), only the question's own words
    (the question repeated back; with `partial`, its last word may be a prefix of the question's
    next one: text still streaming), or only one of `headings` (passage_headings: "[1] 4.5 Zero
    Address"; with `partial`, the start of one). Measured on bench/bench_answers.py answers of the 0.5B
    model: the first two were 9 of its 22 failed manuals answers and 6 of its 9 failed pydoc test
    answers; a copied section title was 3 of its 4 answers to uncovered questions that passed the gate
    on the GNU info manuals (session 21)."""
    if refuses(answer):
        return None
    rest = strip_header_copies(answer)
    terms = content_terms(rest)
    if not terms:
        return "only citations or passage headers"
    key = _heading_key(rest)
    if key and any(h == key or partial and h.startswith(key) for h in headings):
        return "only a passage's heading"
    said, asked = _term_run(rest), _term_run(question)
    n = len(said)

    def same(i: int) -> bool:  # partial: a streamed answer's last word may still be growing
        return asked[i : i + n - 1] == said[:-1] and (asked[i + n - 1] == said[-1] or partial and asked[i + n - 1].startswith(said[-1]))

    # the question's words in the question's order, not just its words: "lower priority numbers mean
    # higher priority" answers "do lower priority numbers mean higher or lower priority?"
    if any(same(i) for i in range(len(asked) - n + 1)):
        return "the question repeated back"
    return None


class AnswerGuard:
    """Streaming: holds the answer back while it has said nothing of its own (`degenerate`: only
    citations, a copied passage header, so far only the question's words in its order or the start of a
    passage's heading), or
    while a bracket is open (a header being copied); once it says something, passes on the held
    text with copied headers cut to their citation, then everything as it comes. Text still held
    at the end is a degenerate answer: `ask` asks again instead of showing it."""

    HOLD_MAX = 400  # characters; past this the text is shown whatever it is

    def __init__(self, question: str, headings: list[str] = ()):
        self.question = question
        self.headings = list(headings)  # passage_headings of the prompt's passages
        self.held = ""
        self.open = False

    def feed(self, piece: str) -> str:
        if self.open:
            return piece
        self.held += piece
        unclosed = self.held.count("(") > self.held.count(")") or self.held.count("[") > self.held.count("]")
        if len(self.held) < self.HOLD_MAX and (unclosed or degenerate(self.held, self.question, partial=True,
                                                                        headings=self.headings)):
            return ""
        self.open = True
        out, self.held = strip_header_copies(self.held), ""
        return out

    def flush(self) -> str:
        """At the end of a non-degenerate answer: what is still held (header copies cut)."""
        self.open = True  # shown now: no longer degenerate (the empty held text would read as one)
        out, self.held = strip_header_copies(self.held), ""
        return out

    @property
    def degenerate(self) -> str | None:
        """Why the whole answer was held back (None once any of it was shown)."""
        return None if self.open else degenerate(self.held, self.question, headings=self.headings)


def _term_run(text: str) -> list[str]:
    """Content terms in order, repeats kept (content_terms deduplicates)."""
    text = re.sub(r"\[\d+(?:\s*[,;]\s*\d+)*\]", " ", text)
    return [t for t in (m.lower() for m in _TERM.findall(text)) if t not in _FILLER and (len(t) > 1 or t.isdigit())]


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


def fallback_note(question: str, passage_n: int, passage_text: str, where: str, answered: bool = True) -> str:
    """What the user sees after an ungrounded answer (a warning and the best passage's words), or
    instead of an answer that said nothing (`answered` False: only the passage's words)."""
    quote = best_quote(question, passage_text)
    if not answered:
        return f"The model gave no answer of its own. Closest passage [{passage_n}], {where}: \"{quote}\""
    return f"\n\n(This answer is not backed by the passages. Closest passage [{passage_n}], {where}: \"{quote}\")"
