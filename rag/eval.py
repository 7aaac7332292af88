"""Eval: retrieval recall@k and MRR over a questions file, and (with a generator) how often the
answer contains the expected keywords.

questions.jsonl, one object per line:
    {"question": "...", "expected_source": "error_codes.md", "expected_keywords": ["LiDAR", "60 %"]}
`expected_source` may also be a list (any of them counts); it matches a retrieved chunk whose
source path ends with it. Keys `source`/`sources` and `keywords`/`answer_keywords` are accepted.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge.errors import UsageError


@dataclass
class EvalItem:
    question: str
    expected_sources: list[str]
    keywords: list[str]


@dataclass
class EvalResult:
    mode: str
    k: int
    n: int
    recall_at_k: float
    mrr: float
    keyword_hit_rate: float | None = None  # share of answers containing all expected keywords
    keyword_recall: float | None = None  # share of expected keywords found, averaged
    covered_rate: float | None = None  # share of questions the relevance gate let through
    retrieval_ms_mean: float = 0.0
    per_question: list[dict] = field(default_factory=list)

    def to_dict(self, details: bool = False) -> dict:
        d = asdict(self)
        if not details:
            d.pop("per_question")
        return d


def load_questions(path: str | Path) -> list[EvalItem]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such questions file", fix="give a .jsonl file of {question, expected_source}")
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            o = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{i}: not JSON ({e.msg})", fix="one JSON object per line") from None
        q = o.get("question")
        src = o.get("expected_source", o.get("source", o.get("sources", [])))
        kws = o.get("expected_keywords", o.get("keywords", o.get("answer_keywords", [])))
        if not isinstance(q, str) or not q.strip():
            raise UsageError(f"{path}:{i}: missing 'question'")
        items.append(EvalItem(q, [src] if isinstance(src, str) else list(src), list(kws or [])))
    if not items:
        raise UsageError(f"{path}: no questions")
    return items


def source_matches(path: str, expected: str) -> bool:
    p, e = path.replace("\\", "/"), expected.replace("\\", "/").lstrip("./")
    return p == e or p.endswith("/" + e)


_DASHES = str.maketrans({c: "-" for c in "\u2010\u2011\u2012\u2013\u2014\u2212"})


def normalize_answer_text(text: str) -> str:
    """Case, whitespace and number formatting folded, so that a keyword is found however the answer
    writes the same fact: '60%' = '60 %', '1,000,000' = '1000000', en dash and minus = '-' (and, in
    _keyword_re, 'three' = '3')."""
    t = " ".join(text.lower().translate(_DASHES).split())
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)  # thousands separators
    return re.sub(r"(?<=\d) (?=%)", "", t)  # '60 %' -> '60%'


def keyword_hits(answer: str, keywords: list[str]) -> tuple[bool, float]:
    """(all present, share present), after `normalize_answer_text` on both sides; numbers whole."""
    if not keywords:
        return True, 1.0
    low = normalize_answer_text(answer)
    found = sum(1 for kw in keywords if _keyword_re(normalize_answer_text(kw)).search(low))
    return found == len(keywords), found / len(keywords)


# a whole-number keyword from 2 to 20 is also found written as a word ("makes three passes" holds "3");
# not 0 and 1: "one" and "none" say other things as often
NUMBER_WORDS = dict(enumerate("two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                              "sixteen seventeen eighteen nineteen twenty".split(), start=2))


def _keyword_re(kw: str) -> re.Pattern:
    """A keyword's pattern: a number is found whole ('9' is not in '1999', '0.6' not in '0.65'), and
    one from 2 to 20 also as its word."""
    head = r"(?<![\d.])" if kw[:1].isdigit() else ""
    tail = r"(?!\d|\.\d)" if kw[-1:].isdigit() else ""
    word = NUMBER_WORDS.get(int(kw)) if kw.isdigit() else None
    return re.compile(head + re.escape(kw) + tail + (rf"|\b{word}\b" if word else ""))


def evaluate(items: list[EvalItem], retriever, *, k: int = 5, mode: str = "hybrid", generator=None,
             max_tokens: int | None = None, on_item=None) -> EvalResult:
    """Run every question; `generator=None` scores retrieval only."""
    from rag.ask import ask

    rec = rr = 0.0
    kw_all = kw_share = covered = 0.0
    ms = 0.0
    per = []
    for it in items:
        t0 = time.perf_counter()
        r = retriever.search(it.question, k=k, mode=mode)
        ms += (time.perf_counter() - t0) * 1e3
        rank = next((i for i, h in enumerate(r.hits, start=1)
                     if any(source_matches(h.chunk.path, e) for e in it.expected_sources)), None)
        rec += rank is not None
        rr += 1.0 / rank if rank else 0.0
        row = {"question": it.question, "expected": it.expected_sources, "rank": rank,
               "retrieved": [h.chunk.citation() for h in r.hits], "relevant": r.relevant}
        if generator is not None:
            a = ask(it.question, retriever, generator, k=k, mode=mode, max_tokens=max_tokens)
            ok, share = keyword_hits(a.model_text, it.keywords)  # not the grounding note's quote
            kw_all += ok
            kw_share += share
            covered += a.covered
            row.update(answer=a.text, keywords_ok=ok, keyword_share=share, covered=a.covered)
        per.append(row)
        if on_item:
            on_item(row)
    n = len(items)
    res = EvalResult(mode, k, n, rec / n, rr / n, retrieval_ms_mean=ms / n, per_question=per)
    if generator is not None:
        res.keyword_hit_rate, res.keyword_recall, res.covered_rate = kw_all / n, kw_share / n, covered / n
    return res
