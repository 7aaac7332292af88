"""Ask: retrieve -> relevance gate -> prompt -> stream the generator (citations filtered) ->
grounding check -> answer + sources + timings.

The prompt and decoding come from the generator's `AnswerRecipe` (rag.prompt.recipe_for: passages,
answer budget, repetition penalty), greedy. Citations of passages that do not exist never reach
the user (rag.ground.CitationFilter); an answer that neither cites nor overlaps the passages is
followed by a note quoting the closest passage (`grounded: false`).

A question that passed the relevance gate on its keywords alone (`Retrieval.passed_on ==
"keywords"`: half its terms in one passage, but a cosine below the vector side's threshold) has weak
evidence of being covered: "What is the capital of Australia?" passes on pydoc text through
"capital" and "Australia/Sydney". Its answer is held until it ends and checked against the passages
(rag.ground); one the passages do not back is refused (NOT_COVERED, `covered: false`) instead of
shown with a warning: neither the question nor the answer then has evidence that the documents
cover it (`refuse_ungrounded`).

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

from rag.ground import (MIN_SUPPORT, AnswerGuard, CitationFilter, Grounding, fallback_note, ground, passage_headings,
                        strip_header_copies)
from rag.prompt import AnswerRecipe, Prompt, build_prompt, cited_numbers, recipe_for, retry_prompt, sources
from rag.retrieve import MIN_KEYWORD_COVERAGE, Retrieval, Retriever, keyword_coverage

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
    grounded: bool | None = None  # None: not generated (refused)
    model_text: str = ""  # what the model wrote, before the grounding note
    invalid_citations: list[int] = field(default_factory=list)  # dropped: no such passage
    support: float = 0.0  # the best passage's share of the answer's content terms (rag.ground)
    first_text: str | None = None  # a degenerate first answer, not shown, when the model was asked again

    def to_dict(self) -> dict:
        return asdict(self)


def sampling_params(max_tokens: int, recipe: AnswerRecipe | None = None, **kw):
    """Greedy decoding with the recipe's repetition penalty (1.0: measured best for facts)."""
    from edge.runtime.sampler import SamplingParams

    rp = recipe.repetition_penalty if recipe is not None else 1.0
    return SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.0, "repetition_penalty": rp, **kw})


def generator_recipe(generator) -> AnswerRecipe:
    """The recipe for a loaded generator, from its bundle manifest's model (fakes without one: small)."""
    bundle = getattr(generator, "bundle", None)
    if bundle is None:
        return recipe_for(None)
    from edge.models.spec import ModelSpec

    return recipe_for(ModelSpec.from_dict(bundle.manifest.model).n_params)


def refuse_ungrounded(r: Retrieval, g: Grounding, passages: list[str], question: str,
                      min_coverage: float = MIN_KEYWORD_COVERAGE) -> bool:
    """Whether an answer to a question retrieved as `r` is refused for not being in the passages:
    only where the gate passed on keywords alone (weak evidence that the documents cover it), and then
    unless a passage holds MIN_SUPPORT of the answer's content AND min_coverage of the question's terms.
    NOTE: the second half came from an invention grounded only in its source's title line: "The capital
    of Australia is Canberra. This information is found in the passage [1] of the Python Library
    Documentation: package zoneinfo." (Qwen2.5-Coder-1.5B, native backend, pydoc): 5 of its 8 content
    terms are zoneinfo's first line, a passage holding neither "capital" nor "australia"."""
    if r.passed_on != "keywords":
        return False
    return not (g.grounded and any(s >= MIN_SUPPORT and keyword_coverage(question, p) >= min_coverage
                                   for s, p in zip(g.support, passages)))


def ask(question: str, retriever: Retriever, generator, *, k: int = 5, mode: str = "hybrid",
        max_tokens: int | None = None, on_token: Callable[[str], None] | None = None, params=None,
        gate: bool = True, recipe: AnswerRecipe | None = None) -> Answer:
    """Answer `question` from the collection behind `retriever` with `generator` (streams through
    `on_token`). With `gate`, an irrelevant retrieval answers NOT_COVERED without generating.
    `generator` may be a zero-argument callable returning one: it is called only past the gate
    (its load time is reported as load_ms; ttft_ms and total_ms leave it out). `max_tokens` None: the
    recipe's answer budget."""
    t0 = time.perf_counter()
    r: Retrieval = retriever.search(question, k=k, mode=mode)
    t_ret = time.perf_counter()
    timings = {"retrieval_ms": (t_ret - t0) * 1e3, **{f"retrieval_{a}_ms": b for a, b in r.ms.items() if a != "total"}}
    gate_info = {"top_cosine": r.top_cosine, "keyword_hits": r.keyword_hits, "keyword_coverage": r.keyword_coverage}
    if gate and not r.relevant:
        if on_token:
            on_token(NOT_COVERED)
        timings.update(ttft_ms=(time.perf_counter() - t0) * 1e3, total_ms=(time.perf_counter() - t0) * 1e3)
        why = (f"no passage mentions {', '.join(r.missing)}" if r.missing else "nothing relevant retrieved")
        return Answer(question, NOT_COVERED, False, [], [], timings, notes=[why, f"gate: {gate_info}"])
    load_ms = 0.0
    if callable(generator) and not hasattr(generator, "stream"):
        tl = time.perf_counter()
        generator = generator()
        load_ms = (time.perf_counter() - tl) * 1e3
        timings["load_ms"] = load_ms
        t_ret = time.perf_counter()
    recipe = recipe or generator_recipe(generator)
    prompt: Prompt = build_prompt(question, r.hits, generator.tokenizer, int(generator.max_context), max_tokens,
                                  recipe)
    t_prompt = time.perf_counter()
    timings["prompt_ms"] = (t_prompt - t_ret) * 1e3
    params = params or sampling_params(prompt.answer_tokens, recipe)
    parts: list[str] = []
    t_first = None
    # weak evidence of coverage: the answer is held until grounding decides (refuse_ungrounded)
    held: list[str] | None = [] if gate and r.passed_on == "keywords" else None

    def emit(piece: str) -> None:
        nonlocal t_first
        if held is not None:
            held.append(piece)
        elif piece:
            t_first = t_first or time.perf_counter()  # what the user waits for: the first SHOWN text
            parts.append(piece)
            if on_token:
                on_token(piece)

    notes = list(prompt.notes)
    first = _generate(generator, prompt, question, params, emit)
    run, retried = first, False
    if first.guard.degenerate and prompt.passages:
        # nothing was shown: ask once more without the request to cite (rag.prompt.retry_prompt)
        notes.append(f"first answer {first.guard.degenerate} ({first.text!r}): asked again")
        run, retried = _generate(generator, retry_prompt(prompt, question, generator.tokenizer), question, params, emit), True
    model_text = run.text
    dropped = first.cites.dropped + (run.cites.dropped if retried else [])
    cited = cited_numbers(model_text, len(prompt.passages))
    g = ground(model_text, [p.text for p in prompt.passages], cited)
    notes += g.notes
    if dropped:
        notes.append(f"dropped citations of passages that do not exist: {sorted(set(dropped))}")
    if run.guard.degenerate:
        g.grounded = False
        notes.append(f"answer {run.guard.degenerate}: not shown")
    if held is not None and refuse_ungrounded(r, g, [p.text for p in prompt.passages], question, retriever.min_keyword_coverage):
        notes.append(f"passed the relevance gate on keywords alone (top cosine {r.top_cosine:.3f} < "
                     f"{retriever.min_cosine:.3f}) and no passage matching the question backs the answer: refused")
        if on_token:
            on_token(NOT_COVERED)
        t_end = time.perf_counter()
        timings.update(ttft_ms=(t_end - t0) * 1e3 - load_ms, generate_ms=0.0, total_ms=(t_end - t0) * 1e3 - load_ms)
        return Answer(question, NOT_COVERED, False, [], [], timings, prompt.n_tokens, 0, notes, False, model_text,
                      list(dropped), max(g.support, default=0.0), first.text if retried else None)
    if held is not None:  # backed by the passages: show what was held, as one piece
        pieces, held = held, None
        emit("".join(pieces))
    if not g.grounded and prompt.passages:
        best = max(prompt.passages, key=lambda p: keyword_coverage(question, p.text))
        where = f"{best.hit.chunk.path}, {best.hit.chunk.location()}"
        emit(fallback_note(question, best.n, best.text, where, answered=not run.guard.degenerate))
        cited = [best.n]
    text = "".join(parts).strip()  # what was streamed
    t_end = time.perf_counter()
    t_first = t_first or t_end
    # NOTE: ttft and total exclude the generator's load (and a first-use engine build inside it): load_ms says it
    timings.update(ttft_ms=(t_first - t0) * 1e3 - load_ms, generate_ms=(t_end - t_first) * 1e3,
                   total_ms=(t_end - t0) * 1e3 - load_ms)
    if run.request is not None:  # the last generation's (the retry's when there was one)
        from edge.runtime.generator import stats_of

        timings["generator"] = stats_of(run.request).to_dict()
    elif getattr(generator, "stats", None) is not None:
        timings["generator"] = generator.stats.to_dict()
    n_ans = len(generator.tokenizer.encode(model_text)) if model_text else 0
    supported = [g.attributed] if g.attributed else []
    return Answer(question, text, True, sources(prompt, text, supported), sorted(set(cited) | set(supported)),
                  timings, prompt.n_tokens, n_ans, notes, g.grounded, model_text, list(dropped),
                  max(g.support, default=0.0), first.text if retried else None)


@dataclass
class _Run:
    text: str  # the model's text after the citation filter (copied headers cut to their citation)
    cites: CitationFilter
    guard: AnswerGuard
    request: object = None  # the engine request (its stats), when the generator has an engine


def prompt_headings(prompt: Prompt) -> list[str]:
    """The headings of the prompt's passages (rag.ground.passage_headings): an answer that is only one
    of them says nothing."""
    return passage_headings([p.text for p in prompt.passages], [p.hit.chunk.heading for p in prompt.passages])


def _generate(generator, prompt: Prompt, question: str, params, emit: Callable[[str], None]) -> _Run:
    """One streamed answer to `prompt`: generator -> CitationFilter -> AnswerGuard -> emit."""
    cites, guard = CitationFilter(len(prompt.passages)), AnswerGuard(question, prompt_headings(prompt))
    said: list[str] = []

    def take(piece: str) -> None:
        piece = cites.feed(piece) if piece is not None else cites.flush()
        said.append(piece)
        emit(guard.feed(piece))

    # the engine's per-request stream: under concurrency its stats are this question's own
    rs = generator.submit(prompt.messages, params) if hasattr(generator, "engine") else None
    try:
        for piece in rs if rs is not None else generator.stream(prompt.messages, params):
            take(piece)
    finally:
        if rs is not None:
            rs.close()  # early exit (a client gone): abort, frees the KV blocks
    take(None)
    if not guard.degenerate:
        emit(guard.flush())
    return _Run(strip_header_copies("".join(said)).strip(), cites, guard, rs.request if rs is not None else None)


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
