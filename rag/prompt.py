"""Prompt assembly: numbered passages inside the generator's context budget, and the mapping of
the answer's [n] citations back to their sources.

How `ask` prompts a model is an `AnswerRecipe` (system line, how many passages and how long,
answer budget, repetition penalty), chosen per model by `recipe_for`. Every value in the
recipes was measured with bench/bench_answers.py on two corpora (see docs/measurements.md, "Answers");
the chat template is always the model's own.

Budget (tokens of the generator's own tokenizer, chat template included):

    max_context  >=  template + system + passages + question  +  answer_tokens

Passages go in rank order, the question after them (the order small models answer best: the
0.5B model got 16/36 manuals questions with the best passage last, next to the question, against
23/36 in rank order; without the numbered '[n] (file, lines) heading' headers, 16-18/36). A
passage longer than the recipe's `passage_tokens` is cut to the window of its sentences that
holds the most question terms; a passage listing several API entries (`name(args)` heads) of which the
question names one is shown without the other entries, and any other passage of the prompt without
that entry's siblings (`without_neighbour_entries`); a question asking what something returns is asked
for the value (`asks_return_value`, medium recipe); the first passage that does not fit the context whole is cut
the same way when at least MIN_PASSAGE_TOKENS of room is left, and the rest are dropped. A
question that leaves no room at all is a ContextLengthError. Retrieved chunks that overlap in one
document are one passage (`merge_overlapping`; its window is the chunks' budgets added).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from edge.errors import ContextLengthError
from rag.retrieve import Hit, query_terms

MIN_PASSAGE_TOKENS = 32
CITE_BODY = r"\d+(?:\s*[,;]\s*\d+)*"  # what a citation holds: "1", "2, 3"
_CITE = re.compile(r"\[(" + CITE_BODY + r")\]")


@dataclass(frozen=True)
class AnswerRecipe:
    """How `ask` prompts and decodes for one model (bench/bench_answers.py measures each field)."""

    name: str
    system: str
    max_passages: int = 5  # the top passages shown to the model
    passage_tokens: int = 256  # a longer passage is cut to its best window
    answer_tokens: int = 128  # default answer budget (--max-tokens overrides)
    repetition_penalty: float = 1.0  # 1.1 cost SmolLM2 facts (it avoids repeating the numbers it must quote)
    instruction: str = "Answer in one sentence and cite the passage number like [1]."
    # asked instead when the first answer was degenerate (rag.ground.degenerate): without the
    # request to cite, the 0.5B model stops opening with "[1]" or a copied header. On the 8 degenerate
    # first answers of the test questions (manuals + pydoc) it gave 4 keyword-complete answers and 1
    # degenerate one; the same prompt with only the top 1 or 2 passages 2, passages in reverse 3,
    # the question also before the passages 2 (bench/bench_answers.py answers, 0.5B int8 engine).
    retry_instruction: str = "Answer in one sentence."
    # added after `instruction` when the question asks what something returns (`asks_return_value`)
    return_instruction: str = ""


SYSTEM_PROMPT = (
    "Answer the question using the passages. Reply with the specific fact asked for, quoting names, numbers "
    "and codes exactly as written. If the passages do not answer the question, say that the documents do "
    "not cover it."
)

# Measured per model size on the shipped manuals and the pydoc corpus (docs/measurements.md, "Answers"):
# the 135M model loses the fact when given more than one passage. 0.5B+ models get five: the
# expected keywords were in the top 3 passages for 32/36 manuals and 30/32 pydoc questions, in
# the top 5 for 35/36 and 32/32 (the chunks are ~100-180 tokens, so five cost ~300 more tokens).
# 1B+ models are asked for every fact the question asks for, in one or two sentences: with "Answer in
# one sentence" the 1.5B answered questions that ask for two things with one of them (KS-BLT-310: "how
# often" without "what is it"; which robots get priority: one of the two rules; the re-localisation
# steps: what to check, not what to do), 3 of its 8 manuals test misses in session 6's run.
MULTI_FACT_INSTRUCTION = ("Answer with every fact the question asks for, in one or two sentences, and cite the "
                          "passage number like [1].")
# Questions that ask what an API entry returns were answered with another sentence of the entry: "What does
# heapq.heappushpop return?" got the entry's "runs more efficiently than heappush() followed by heappop()"
# (session 6, pydoc test, 1.5B int4; llama.cpp on the same prompt gave "the smallest item"). With this line
# after the instruction the engine gave "returns the smallest item" and kept median_low's right answer (the
# test set's two "What does X return" questions, engine-only probe, session 7). It is asked only with
# questions of that shape, so no other prompt changes.
RETURN_VALUE_INSTRUCTION = "If the question asks what something returns, answer with the value it returns."
_ASKS_RETURN = re.compile(r"\bwhat\b[^?]*\breturns?\b", re.I)


def asks_return_value(question: str) -> bool:
    """The question asks what something returns ("What does heapq.heappushpop return?"; not "the value
    returned by X", which asks about the value's attributes)."""
    return bool(_ASKS_RETURN.search(question))


RECIPES = {
    "tiny": AnswerRecipe("tiny", SYSTEM_PROMPT, max_passages=1, passage_tokens=256, answer_tokens=96),
    "small": AnswerRecipe("small", SYSTEM_PROMPT, max_passages=5, passage_tokens=256, answer_tokens=128),
    "medium": AnswerRecipe("medium", SYSTEM_PROMPT, max_passages=5, passage_tokens=256, answer_tokens=128,
                           instruction=MULTI_FACT_INSTRUCTION, return_instruction=RETURN_VALUE_INSTRUCTION),
}
TINY_MAX_PARAMS = 300e6
MEDIUM_MIN_PARAMS = 1e9  # measured on Qwen2.5-Coder-1.5B only; the 0.5B keeps "small" (not re-measured)


def recipe_for(n_params: int | None) -> AnswerRecipe:
    """The recipe for a generator of `n_params` parameters (unknown: small)."""
    if n_params and n_params <= TINY_MAX_PARAMS:
        return RECIPES["tiny"]
    return RECIPES["medium"] if n_params and n_params >= MEDIUM_MIN_PARAMS else RECIPES["small"]


@dataclass
class Passage:
    """A numbered passage as shown to the model."""

    n: int
    hit: Hit
    text: str  # possibly cut to fit
    truncated: bool = False
    chunks: int = 1  # retrieved chunks it holds (overlapping chunks of one document are one passage)

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
    dropped: int = 0  # retrieved hits that were not shown (recipe limit or context; not those merged into one)
    notes: list[str] = field(default_factory=list)
    recipe: AnswerRecipe | None = None


def user_message(question: str, passages: list[Passage], instruction: str) -> str:
    body = "\n\n".join(p.block() for p in passages) if passages else "(no passages)"
    return f"Passages:\n\n{body}\n\nQuestion: {question.strip()}\n{instruction}"


def instruction_for(question: str, recipe: AnswerRecipe) -> str:
    """The recipe's instruction line, followed by its return-value line for a question that asks for one."""
    if recipe.return_instruction and asks_return_value(question):
        return f"{recipe.instruction}\n{recipe.return_instruction}"
    return recipe.instruction


def messages_for(question: str, passages: list[Passage], recipe: AnswerRecipe) -> list[dict]:
    return [{"role": "system", "content": recipe.system},
            {"role": "user", "content": user_message(question, passages, instruction_for(question, recipe))}]


def retry_prompt(prompt: Prompt, question: str, tokenizer) -> Prompt:
    """The same passages (same numbers) asked with the recipe's retry instruction: for a second
    attempt after a degenerate answer (the retry instruction is not longer than the first: it fits)."""
    recipe = prompt.recipe or RECIPES["small"]
    msgs = [{"role": "system", "content": recipe.system},
            {"role": "user", "content": user_message(question, prompt.passages, recipe.retry_instruction)}]
    return replace(prompt, messages=msgs, n_tokens=count_prompt_tokens(tokenizer, msgs))


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


def best_window(tokenizer, text: str, question: str, budget: int) -> str:
    """The run of consecutive sentences of `text`, within `budget` tokens, that holds the most
    distinct question terms (ties: the earliest). Cut with ' ... ' marks where text was left out."""
    if _encode_len(tokenizer, text) <= budget:
        return text
    terms = query_terms(question)
    spans = [(m.start(), m.end()) for m in re.finditer(r".+?(?:(?<=[.!?:;])\s+|\n+|$)", text, re.S) if m.group().strip()]
    if not spans or not terms:
        return _cut_to_tokens(tokenizer, text, budget)
    lens = [_encode_len(tokenizer, text[a:b]) for a, b in spans]
    best, best_score = (0, 0), -1
    for i in range(len(spans)):
        used, j = 0, i
        while j < len(spans) and used + lens[j] <= budget - 4:
            used += lens[j]
            j += 1
        if j == i:
            continue
        low = text[spans[i][0]:spans[j - 1][1]].lower()
        score = sum(1 for t in terms if t in low)
        if score > best_score:
            best, best_score = (i, j), score
    i, j = best
    if j == i:
        return _cut_to_tokens(tokenizer, text, budget)
    out = text[spans[i][0]:spans[j - 1][1]].strip()
    return ("... " if i > 0 else "") + out + (" ..." if j < len(spans) else "")


# An entry head of an API reference (pydoc's FUNCTIONS and class bodies): `name(args)` at the start of a
# line, after indentation and pydoc's "|" margin. Its entry runs to the next line indented no deeper.
_ENTRY_HEAD = re.compile(r"^[ \t|]*([A-Za-z_]\w*)\(", re.M)
_NAMED = re.compile(r"[A-Za-z_]\w{2,}")
# a head line that is a whole signature (`median(data)`, `f(x) -> int`), not prose or code that starts with a
# call ("uuid_generate_time_safe(3).", "heappush(heap, item)  # pushes ...")
_SIGNATURE = re.compile(r"[ \t|]*[A-Za-z_]\w*\(.*\)(?:\s*->.*)?\s*$")


def _entry_col(line: str) -> int | None:
    """Column of a line's first character past indentation and a pydoc "|" margin (None: blank)."""
    m = re.match(r"[ \t|]*", line)
    return None if m.end() >= len(line.rstrip()) else len(line[: m.end()].expandtabs())


def _entry_end(text: str, start: int, col: int) -> int:
    """End of the entry whose head line starts at `start`: before the next line indented no deeper."""
    pos = text.find("\n", start)
    while pos != -1:
        nxt = text.find("\n", pos + 1)
        c = _entry_col(text[pos + 1: nxt if nxt != -1 else len(text)])
        if c is not None and c <= col:
            return pos + 1
        pos = nxt
    return len(text)


def _line_at(text: str, start: int) -> str:
    eol = text.find("\n", start)
    return text[start: eol if eol != -1 else len(text)]


def _entry_heads(text: str) -> list[tuple[int, int, str]]:
    """(offset of the head's line, column of its name, name) of every entry head in `text`."""
    return [(m.start(), _entry_col(_line_at(text, m.start())), m.group(1)) for m in _ENTRY_HEAD.finditer(text)]


def documented_entry(texts: list[str], question: str) -> str | None:
    """The one API entry the question names that the passages document (an entry head `name(` in any of
    `texts`), else None (none named, or two or more: a question comparing entries keeps them all)."""
    named = set(_NAMED.findall(question))
    asked = {name for t in texts for _, _, name in _entry_heads(t) if name in named}
    return asked.pop() if len(asked) == 1 else None


def sibling_names(a: str, b: str) -> bool:
    """Two different names of one family of entries: they share a stem of 4+ characters, or one is the
    start of the other (median / median_low / median_grouped, heappush / heappop / heappushpop,
    copy / copy2 / copyfile). Case counts: the class `UUID` is no sibling of the function `uuid4`."""
    return a != b and len(os.path.commonprefix([a, b])) >= min(4, len(a), len(b))


def without_neighbour_entries(text: str, question: str, entry: str | None = None) -> str | None:
    """`text` without the neighbours of the entry the question names, where `text` lists two or more
    entries at one indentation (an API reference: `median_high(data)`, `median_low(data)`, ...) and the
    question names exactly one of them; else None. The rest of the passage (module descriptions, the
    tail of an entry whose head is not in it) is kept; each run of dropped entries becomes one "...".
    Neighbouring entries differ by a word ("the larger" / "the smaller of the two middle values";
    mkdtemp / mkstemp) and the 1.5B int4 engine answered with the neighbour's line (sessions 5-6).

    `entry`: the entry the question names that another passage of the same prompt documents
    (`documented_entry`). A passage that holds none of the entries the question names loses the entries of
    `entry`'s family (`sibling_names`: median and median_grouped where the question asks for median_low,
    documented in the passage before): session 6's pydoc test run answered median_low's question with
    median's interpolation from such a passage, which the rule above left whole (it saw no named entry).
    Entries of other families stay there (a class's own signature line, another module's functions)."""
    named = set(_NAMED.findall(question))
    heads = _entry_heads(text)
    hits = [h for h in heads if h[2] in named]
    if len(hits) == 1:
        col = hits[0][1]
        drop = [(h[0], _entry_end(text, h[0], col)) for h in heads if h[1] == col and h is not hits[0]]
    elif not hits and entry is not None:
        drop = [(h[0], _entry_end(text, h[0], h[1])) for h in heads
                if sibling_names(h[2], entry) and _SIGNATURE.match(_line_at(text, h[0]))]
    else:
        return None
    if not drop:  # a lone entry, or no sibling: nothing to confuse it with
        return None
    out, pos = [], 0
    for a, b in drop:
        if a < pos:  # inside an entry already dropped
            continue
        out.append(text[pos:a])
        if not "".join(out).endswith("...\n"):
            out.append("...\n")
        pos = b
    out.append(text[pos:])
    return "".join(out).rstrip()


def merge_overlapping(hits: list[Hit]) -> list[tuple[Hit, int]]:
    """Hits whose chunks overlap in one document (the chunker carries a chunk's last sentences into
    the next) as one passage: the union of their text, at the rank of the better one; with how many
    chunks each passage holds. Two copies of the overlap would cost tokens and repeat the same
    sentences as if they were two sources."""
    out: list[list] = []  # [hit, parts]
    for h in hits:
        c = h.chunk
        for o in out:
            a = o[0].chunk
            if a.doc_id == c.doc_id and a.char_start < c.char_end and c.char_start < a.char_end:
                first, last = (a, c) if a.char_start <= c.char_start else (c, a)
                text = first.text + (last.text[first.char_end - last.char_start:] if last.char_end > first.char_end else "")
                end = max(a.char_end, c.char_end)
                o[0] = replace(o[0], chunk=replace(a, text=text, char_start=first.char_start, char_end=end,
                                                   loc_start=min(a.loc_start, c.loc_start),
                                                   loc_end=max(a.loc_end, c.loc_end), n_tokens=a.n_tokens + c.n_tokens))
                o[1] += 1
                break
        else:
            out.append([h, 1])
    return [(h, n) for h, n in out]


def build_prompt(question: str, hits: list[Hit], tokenizer, max_context: int, answer_tokens: int | None = None,
                 recipe: AnswerRecipe | None = None) -> Prompt:
    """Fit up to `recipe.max_passages` passages into the context (see the module docstring)."""
    recipe = recipe or RECIPES["small"]
    answer_tokens = int(answer_tokens or recipe.answer_tokens)
    base = count_prompt_tokens(tokenizer, messages_for(question, [], recipe))
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
    merged = merge_overlapping(hits[: recipe.max_passages])
    entry = documented_entry([h.chunk.text for h, _ in merged], question)
    for h, parts in merged:
        src = without_neighbour_entries(h.chunk.text, question, entry) or h.chunk.text
        text = best_window(tokenizer, src, question, recipe.passage_tokens * parts)
        p = Passage(len(passages) + 1, h, text, truncated=text != h.chunk.text, chunks=parts)
        cost = _encode_len(tokenizer, p.block()) + 2  # + the blank line joining blocks
        if used + cost <= room:
            passages.append(p)
            used += cost
            continue
        left = room - used - (_encode_len(tokenizer, Passage(p.n, h, "").block()) + 4)
        if left >= MIN_PASSAGE_TOKENS:
            p.text, p.truncated = best_window(tokenizer, src, question, left), True
            passages.append(p)
            notes.append(f"passage [{p.n}] cut to fit the context")
        break
    # Exact check with the template (token merges across boundaries can differ by a few).
    msgs = messages_for(question, passages, recipe)
    n = count_prompt_tokens(tokenizer, msgs)
    while passages and n + answer_tokens > max_context:
        passages.pop()
        msgs = messages_for(question, passages, recipe)
        n = count_prompt_tokens(tokenizer, msgs)
    return Prompt(msgs, passages, n, max_context, answer_tokens, len(hits) - sum(p.chunks for p in passages), notes,
                  recipe)


def cited_numbers(answer: str, n_passages: int) -> list[int]:
    """Passage numbers cited in the answer ('[1]', '[2, 3]'), in first-cited order, valid ones only."""
    out: list[int] = []
    for m in _CITE.finditer(answer):
        for x in re.split(r"\s*[,;]\s*", m.group(1)):
            v = int(x)
            if 1 <= v <= n_passages and v not in out:
                out.append(v)
    return out


def all_cited_numbers(answer: str) -> list[int]:
    """Every number cited in brackets, valid or not (what citation validity is measured on)."""
    return [int(x) for m in _CITE.finditer(answer) for x in re.split(r"\s*[,;]\s*", m.group(1))]


def sources(prompt: Prompt, answer: str, supported_by: list[int] | None = None) -> list[dict]:
    """Every passage given to the model, in passage order, marked `cited` when the answer cites it
    (or when `supported_by` names it: the grounding check attributed the answer to it)."""
    cited = set(cited_numbers(answer, len(prompt.passages))) | set(supported_by or ())
    out = []
    for p in prompt.passages:
        c = p.hit.chunk
        out.append({"n": p.n, "source": c.path, "location": c.location(), "unit": c.unit,
                    "loc_start": c.loc_start, "loc_end": c.loc_end, "heading": c.heading,
                    "cited": p.n in cited, "score": p.hit.score, "truncated": p.truncated})
    return out
