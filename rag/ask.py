"""Ask: retrieve -> relevance gate -> prompt -> stream the generator -> answer + sources + timings.

Timings (milliseconds, wall clock in this process):
    retrieval  embed the question + vector search + keyword search + fusion
    prompt     prompt assembly (tokenizing passages against the context budget)
    ttft       from the call to the first streamed token (what the user waits for)
    generate   first token to last
    total      the whole call
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from rag.prompt import Prompt, build_prompt, cited_numbers, sources
from rag.retrieve import Retrieval, Retriever

NOT_COVERED = "The documents do not cover this question."


@dataclass
class Answer:
    question: str
    text: str
    covered: bool  # False: the relevance gate refused to generate
    sources: list[dict]
    cited: list[int]
    timings: dict = field(default_factory=dict)
    n_prompt_tokens: int = 0
    n_answer_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def sampling_params(max_tokens: int, **kw):
    """Greedy decoding with a mild repetition penalty: factual answers from a small model."""
    from edge.runtime.sampler import SamplingParams

    fields = getattr(SamplingParams, "__dataclass_fields__", {})
    args = {"max_tokens": max_tokens, "temperature": 0.0, "repetition_penalty": 1.1, **kw}
    return SamplingParams(**{k: v for k, v in args.items() if not fields or k in fields})


def ask(question: str, retriever: Retriever, generator, *, k: int = 5, mode: str = "hybrid",
        max_tokens: int = 256, on_token: Callable[[str], None] | None = None, params=None,
        gate: bool = True) -> Answer:
    """Answer `question` from the collection behind `retriever` with `generator` (streams through
    `on_token`). With `gate`, an irrelevant retrieval answers NOT_COVERED without generating.
    `generator` may be a zero-argument callable returning one: it is called only past the gate
    (its load time is reported as load_ms and counts in ttft)."""
    t0 = time.perf_counter()
    r: Retrieval = retriever.search(question, k=k, mode=mode)
    t_ret = time.perf_counter()
    timings = {"retrieval_ms": (t_ret - t0) * 1e3, **{f"retrieval_{a}_ms": b for a, b in r.ms.items() if a != "total"}}
    gate_info = {"top_cosine": r.top_cosine, "keyword_hits": r.keyword_hits, "keyword_coverage": r.keyword_coverage}
    if gate and not r.relevant:
        if on_token:
            on_token(NOT_COVERED)
        timings.update(ttft_ms=(time.perf_counter() - t0) * 1e3, total_ms=(time.perf_counter() - t0) * 1e3)
        return Answer(question, NOT_COVERED, False, [], [], timings,
                      notes=[f"nothing relevant retrieved: {gate_info}"])
    if callable(generator) and not hasattr(generator, "stream"):
        tl = time.perf_counter()
        generator = generator()
        timings["load_ms"] = (time.perf_counter() - tl) * 1e3
        t_ret = time.perf_counter()
    prompt: Prompt = build_prompt(question, r.hits, generator.tokenizer, int(generator.max_context), max_tokens)
    t_prompt = time.perf_counter()
    timings["prompt_ms"] = (t_prompt - t_ret) * 1e3
    params = params or sampling_params(max_tokens)
    parts: list[str] = []
    t_first = None
    for piece in generator.stream(prompt.messages, params):
        if t_first is None:
            t_first = time.perf_counter()
        parts.append(piece)
        if on_token:
            on_token(piece)
    t_end = time.perf_counter()
    text = "".join(parts).strip()
    t_first = t_first or t_end
    timings.update(ttft_ms=(t_first - t0) * 1e3, generate_ms=(t_end - t_first) * 1e3, total_ms=(t_end - t0) * 1e3)
    stats = getattr(generator, "stats", None) or getattr(generator, "last_stats", None)
    if stats is not None:
        timings["generator"] = stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
    n_ans = len(generator.tokenizer.encode(text)) if text else 0
    return Answer(question, text, True, sources(prompt, text), cited_numbers(text, len(prompt.passages)), timings,
                  prompt.n_tokens, n_ans, prompt.notes)


def format_sources(answer: Answer) -> str:
    """'Sources:' then one line per passage: '[1] manuals/x.md, lines 3-9 (cited)'."""
    if not answer.sources:
        return ""
    lines = ["Sources:"]
    for s in answer.sources:
        mark = " *" if s["cited"] else ""
        head = f" — {s['heading']}" if s["heading"] else ""
        lines.append(f"  [{s['n']}]{mark} {s['source']}, {s['location']}{head}")
    if any(s["cited"] for s in answer.sources):
        lines.append("  (* cited in the answer)")
    return "\n".join(lines)
