"""Prompt assembly: numbered passages inside the generator's context budget, and the mapping of
the answer's [n] citations back to their sources.

Budget (tokens of the generator's own tokenizer, chat template included):

    max_context  >=  template + system + passages + question  +  answer_tokens

Passages go in rank order; the first one that does not fit whole is cut at a word boundary
when at least MIN_PASSAGE_TOKENS of room is left, and the rest are dropped. A question that
leaves no room at all is a ContextLengthError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edge.errors import ContextLengthError
from rag.retrieve import Hit

SYSTEM_PROMPT = (
    "You are a technical assistant. Answer the question using only the numbered passages from the "
    "user's documents. Cite every passage you use with its number in brackets, like [1]. If the "
    "passages do not contain the answer, say that the documents do not cover it. Be brief."
)
MIN_PASSAGE_TOKENS = 32
_CITE = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")


@dataclass
class Passage:
    """A numbered passage as shown to the model."""

    n: int
    hit: Hit
    text: str  # possibly cut to fit
    truncated: bool = False

    @property
    def citation(self) -> str:
        return self.hit.chunk.citation()

    def block(self) -> str:
        c = self.hit.chunk
        head = f" {c.heading}" if c.heading else ""
        return f"[{self.n}] ({c.path}, {c.location()}){head}\n{self.text}"


@dataclass
class Prompt:
    messages: list[dict]
    passages: list[Passage]
    n_tokens: int  # the whole prompt, template included
    max_context: int
    answer_tokens: int
    dropped: int = 0  # retrieved hits that did not fit
    notes: list[str] = field(default_factory=list)


def user_message(question: str, passages: list[Passage]) -> str:
    body = "\n\n".join(p.block() for p in passages) if passages else "(no passages)"
    return (f"Passages:\n\n{body}\n\nQuestion: {question.strip()}\n"
            "Answer from the passages above only, citing them like [1].")


def messages_for(question: str, passages: list[Passage], system: str = SYSTEM_PROMPT) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user_message(question, passages)}]


def count_prompt_tokens(tokenizer, messages: list[dict]) -> int:
    """Tokens of the templated prompt, counted the way the generator will encode it."""
    encode_chat = getattr(tokenizer, "encode_chat", None)
    if encode_chat is not None:
        return len(encode_chat(messages, add_generation_prompt=True))
    apply = getattr(tokenizer, "apply_chat_template", None)
    if apply is not None:
        out = apply(messages, add_generation_prompt=True)
        if isinstance(out, str):
            return len(tokenizer.encode(out))
        return len(out)
    return len(tokenizer.encode("\n\n".join(m["content"] for m in messages)))


def _encode_len(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text))


def _cut_to_tokens(tokenizer, text: str, budget: int) -> str:
    """Longest word-boundary prefix of `text` with at most `budget` tokens (binary search)."""
    words = text.split(" ")
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _encode_len(tokenizer, " ".join(words[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]).rstrip() + " ..."


def build_prompt(question: str, hits: list[Hit], tokenizer, max_context: int, answer_tokens: int = 256,
                 system: str = SYSTEM_PROMPT) -> Prompt:
    """Fit as many passages as the context allows (see the module docstring)."""
    base = count_prompt_tokens(tokenizer, messages_for(question, [], system))
    room = max_context - answer_tokens - base
    if room < 0:
        qt = _encode_len(tokenizer, question)
        raise ContextLengthError(
            f"the question ({qt} tokens) plus the prompt template ({base - qt} tokens) and the answer budget "
            f"({answer_tokens} tokens) exceed the generator's context of {max_context} tokens",
            fix="shorten the question or lower --max-tokens")
    passages: list[Passage] = []
    used = 0
    notes: list[str] = []
    for i, h in enumerate(hits):
        p = Passage(len(passages) + 1, h, h.chunk.text)
        cost = _encode_len(tokenizer, p.block()) + 2  # + the blank line joining blocks
        if used + cost <= room:
            passages.append(p)
            used += cost
            continue
        left = room - used - (_encode_len(tokenizer, Passage(p.n, h, "").block()) + 4)
        if left >= MIN_PASSAGE_TOKENS:
            p.text, p.truncated = _cut_to_tokens(tokenizer, h.chunk.text, left), True
            passages.append(p)
            notes.append(f"passage [{p.n}] cut to fit the context")
        break
    # Exact check with the template (token merges across boundaries can differ by a few).
    msgs = messages_for(question, passages, system)
    n = count_prompt_tokens(tokenizer, msgs)
    while passages and n + answer_tokens > max_context:
        passages.pop()
        msgs = messages_for(question, passages, system)
        n = count_prompt_tokens(tokenizer, msgs)
    return Prompt(msgs, passages, n, max_context, answer_tokens, len(hits) - len(passages), notes)


def cited_numbers(answer: str, n_passages: int) -> list[int]:
    """Passage numbers cited in the answer ('[1]', '[2, 3]'), in first-cited order, valid ones only."""
    out: list[int] = []
    for m in _CITE.finditer(answer):
        for x in re.split(r"\s*[,;]\s*", m.group(1)):
            v = int(x)
            if 1 <= v <= n_passages and v not in out:
                out.append(v)
    return out


def sources(prompt: Prompt, answer: str) -> list[dict]:
    """Every passage given to the model, in passage order, marked `cited` when the answer cites it."""
    cited = cited_numbers(answer, len(prompt.passages))
    out = []
    for p in prompt.passages:
        c = p.hit.chunk
        out.append({"n": p.n, "source": c.path, "location": c.location(), "unit": c.unit,
                    "loc_start": c.loc_start, "loc_end": c.loc_end, "heading": c.heading,
                    "cited": p.n in cited, "score": p.hit.score, "truncated": p.truncated})
    return out
