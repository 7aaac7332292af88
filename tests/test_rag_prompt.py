"""Prompt assembly within the context budget, citations, ask() with a fake generator."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_rag_fakes import HashEmbedder  # noqa: E402

from edge.errors import ContextLengthError  # noqa: E402
from rag.ask import NOT_COVERED, ask, format_sources, refuse_ungrounded  # noqa: E402
from rag.ingest import ingest  # noqa: E402
from rag.ground import AnswerGuard, CitationFilter, degenerate, ground, support  # noqa: E402
from rag.prompt import (RECIPES, RETURN_VALUE_INSTRUCTION, asks_return_value, best_window, build_prompt,  # noqa: E402
                        cited_numbers, count_prompt_tokens, documented_entry, recipe_for, sibling_names,
                        without_neighbour_entries)
from rag.retrieve import Hit, Retrieval, Retriever  # noqa: E402
from rag.store import ChunkRow  # noqa: E402


class WordTokenizer:
    """One token per whitespace-separated word; the 'template' adds 3 tokens per message + 2."""

    def encode(self, text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        return " ".join(f"<{m['role']}> {m['content']} </s>" for m in messages) + (" <assistant>" if add_generation_prompt else "")


class FakeGenerator:
    """Streams `answer` word by word; a list of answers gives one per call (the last repeats)."""

    def __init__(self, max_context: int = 400, answer: str | list[str] = "E-214 means low coolant pressure [1]. See also [3, 9]."):
        self.tokenizer = WordTokenizer()
        self.max_context = max_context
        self.answers = [answer] if isinstance(answer, str) else list(answer)
        self.calls: list = []

    def stream(self, messages, params):
        self.calls.append((messages, params))
        for w in self.answers[min(len(self.calls), len(self.answers)) - 1].split(" "):
            yield w + " "


def hit(i: int, words: int, path: str = "m.md") -> Hit:
    text = " ".join(f"w{i}_{j}" for j in range(words))
    # chunk i sits at its own offsets in document 1 (chunks that overlap are merged: see below)
    return Hit(ChunkRow(i, 1, path, "line", i, text, f"H{i}", 10 * i, 10 * i + 4, 10_000 * i, 10_000 * i + len(text),
                        words), 1.0 / i)


WIDE = replace(RECIPES["small"], max_passages=10, passage_tokens=1000)


def test_passages_fill_the_budget_in_rank_order():
    tok = WordTokenizer()
    hits = [hit(i, 60) for i in range(1, 8)]
    p = build_prompt("What is w?", hits, tok, max_context=400, answer_tokens=100, recipe=WIDE)
    assert p.n_tokens == count_prompt_tokens(tok, p.messages) and p.n_tokens + 100 <= 400
    assert [x.hit.chunk.id for x in p.passages] == list(range(1, len(p.passages) + 1))
    assert 2 <= len(p.passages) < 7 and p.dropped == 7 - len(p.passages)
    user = p.messages[1]["content"]
    assert "[1] (m.md, lines 10-14) H1" in user and user.rstrip().endswith(WIDE.instruction)
    # the question comes after the passages
    assert user.index("Question: What is w?") > user.index("[2] (m.md")
    # with a bigger context everything fits, untruncated
    p2 = build_prompt("What is w?", hits, tok, max_context=4000, answer_tokens=100, recipe=WIDE)
    assert len(p2.passages) == 7 and not any(x.truncated for x in p2.passages)


def test_the_recipe_caps_passages_and_answer_budget():
    tok = WordTokenizer()
    hits = [hit(i, 20) for i in range(1, 8)]
    p = build_prompt("What is w?", hits, tok, max_context=4000)
    assert len(p.passages) == RECIPES["small"].max_passages == 5 and p.dropped == 2
    assert p.answer_tokens == RECIPES["small"].answer_tokens
    tiny = build_prompt("What is w?", hits, tok, max_context=4000, recipe=RECIPES["tiny"])
    assert len(tiny.passages) == 1
    assert recipe_for(134_515_008) is RECIPES["tiny"]
    assert recipe_for(494_032_768) is RECIPES["small"] and recipe_for(None) is RECIPES["small"]
    # 1B+ (Qwen2.5-Coder-1.5B: 1,777,088,000 in its manifest) is asked for every fact the question asks for
    med = recipe_for(1_777_088_000)
    assert med is RECIPES["medium"] and med.instruction != RECIPES["small"].instruction
    assert "every fact" in med.instruction and med.retry_instruction == RECIPES["small"].retry_instruction
    p = build_prompt("What is w and how often?", hits, tok, max_context=4000, recipe=med)
    assert p.messages[1]["content"].rstrip().endswith(med.instruction) and len(p.passages) == 5


def test_overlapping_chunks_of_one_document_are_one_passage():
    # the chunker carries a chunk's last sentences into the next: both retrieved would show them twice
    tok = WordTokenizer()
    doc = "| E-405 | no charge current |\n| E-409 | cell above 60 C |\n| E-418 | capacity below 70 % |\n| E-420 | dock timeout |"
    rows = doc.split("\n")
    a_end = len("\n".join(rows[:3]))
    b_start = len("\n".join(rows[:2])) + 1

    def chunk(i, doc_id, s, e, l0, l1, path="m.md"):
        return Hit(ChunkRow(i, doc_id, path, "line", i, doc[s:e], "Power", l0, l1, s, e, 9), 1.0 / i)

    hits = [chunk(1, 1, 0, a_end, 86, 88), hit(2, 5), chunk(3, 1, b_start, len(doc), 88, 89),
            chunk(4, 2, b_start, len(doc), 88, 89, "other.md")]  # same offsets, another document: kept apart
    p = build_prompt("Which code is raised above 60 C?", hits, tok, max_context=4000)
    assert [x.n for x in p.passages] == [1, 2, 3] and [x.chunks for x in p.passages] == [2, 1, 1] and p.dropped == 0
    first = p.passages[0]
    assert first.text == doc and first.hit.chunk.location() == "lines 86-89" and not first.truncated
    assert p.messages[1]["content"].count("E-418") == 2  # once from document 1, once from other.md
    assert p.passages[2].hit.chunk.path == "other.md"
    # the better-ranked chunk may be the later one in the document: the union is the same
    p2 = build_prompt("q?", [hits[2], hits[0]], tok, max_context=4000)
    assert len(p2.passages) == 1 and p2.passages[0].text == doc and p2.passages[0].hit.score == 1 / 3


def test_a_long_passage_keeps_the_window_that_matches_the_question():
    tok = WordTokenizer()
    filler = " ".join(f"Filler sentence {i} says nothing." for i in range(60))
    text = filler + " The coolant pump part number is KS-PMP-9. " + filler
    out = best_window(tok, text, "What is the coolant pump part number?", 40)
    assert "KS-PMP-9" in out and out.startswith("... ") and out.endswith(" ...")
    assert len(tok.encode(out)) <= 44
    assert best_window(tok, "short text.", "anything", 40) == "short text."


def test_a_passage_is_cut_to_fit():
    tok = WordTokenizer()
    p = build_prompt("q?", [hit(1, 30), hit(2, 500)], tok, max_context=300, answer_tokens=50, recipe=WIDE)
    assert len(p.passages) == 2 and p.passages[1].truncated and p.passages[1].text.endswith("...")
    assert p.n_tokens + 50 <= 300


def test_question_longer_than_context_is_a_clear_error():
    with pytest.raises(ContextLengthError, match="exceed the generator's context of 100 tokens"):
        build_prompt("word " * 200, [hit(1, 10)], WordTokenizer(), max_context=100, answer_tokens=20)


def test_citations():
    assert cited_numbers("See [2] and [1, 3]; not [9] or [x]. Again [2].", 3) == [2, 1, 3]
    assert cited_numbers("no citations", 3) == []


def test_citation_filter_drops_passages_that_do_not_exist_across_stream_pieces():
    f = CitationFilter(3)
    pieces = ["E-214 is low pressure [", "1]", " and [3, ", "7] but not [9]", " nor [12", "]. List [a] x[", "2"]
    out = "".join(f.feed(p) for p in pieces) + f.flush()
    assert out == "E-214 is low pressure [1] and [3] but not  nor . List [a] x[2"
    assert f.dropped == [7, 9, 12]
    # an unclosed bracket is plain text once it runs long or the line ends
    g = CitationFilter(2)
    assert g.feed("range [0 to 100 of the sensor\nnext") + g.flush() == "range [0 to 100 of the sensor\nnext"


def test_grounding_attributes_uncited_answers_and_flags_inventions():
    passages = ["E-214: LiDAR contamination, clean the window; the robot slows to 60 % speed.",
                "E-300: fan stall in the battery bay."]
    g = ground("E-214 means the LiDAR window is dirty; speed drops to 60 %.", passages, [])
    assert g.grounded and g.attributed == 1 and g.support[0] > g.support[1]
    assert ground("See [2].", passages, [2]).grounded is False  # citations alone carry no answer
    bad = ground("The story provided by the user is about mechanical failures of engines.", passages, [])
    assert not bad.grounded and bad.attributed is None
    assert support("[1] [2] [3]", passages[0]) == 0.0

@pytest.fixture
def retriever(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "codes.md").write_text("# Codes\n\n## E-214\n\nE-214: coolant pressure low. Check the hose.\n\n"
                                "## E-300\n\nE-300: fan stall.\n")
    ingest(d, embedder=HashEmbedder(), progress=False)
    with Retriever(HashEmbedder()) as r:
        r.min_cosine, r.min_cosine_with_keywords = 0.8, 0.5
        yield r


def test_ask_streams_and_maps_citations(retriever):
    gen = FakeGenerator()
    streamed: list[str] = []
    a = ask("What does E-214 mean?", retriever, gen, k=2, max_tokens=50, on_token=streamed.append)
    assert a.covered and "".join(streamed).strip() == a.text
    assert a.cited == [1] and a.sources[0]["cited"] and a.sources[0]["source"] == "docs/codes.md"
    # [3, 9] named passages that were never shown: dropped from the stream, reported
    assert "[3" not in a.text and a.invalid_citations == [3, 9] and a.grounded
    assert a.sources[0]["heading"] == "Codes > E-214"
    assert {"retrieval_ms", "ttft_ms", "total_ms"} <= set(a.timings)
    assert 0 <= a.timings["retrieval_ms"] <= a.timings["ttft_ms"] <= a.timings["total_ms"]
    msgs, params = gen.calls[0]
    assert params.max_tokens == 50 and params.temperature == 0.0
    assert "E-214: coolant pressure low" in msgs[1]["content"]
    out = format_sources(a)
    assert "[1] * docs/codes.md, line" in out and "Codes > E-214" in out


def test_ask_refuses_when_nothing_is_relevant(retriever):
    gen = FakeGenerator()
    a = ask("Who painted the Mona Lisa?", retriever, gen)
    assert not a.covered and a.text == NOT_COVERED and a.sources == [] and gen.calls == []
    # a lazily loaded generator is not even loaded
    loads = []
    ask("Who painted the Mona Lisa?", retriever, lambda: loads.append(1) or gen)
    assert loads == []


def test_ask_times_leave_out_a_first_use_load(retriever):
    import time

    def slow_load():  # a first-use engine build happens inside the load
        time.sleep(0.3)
        return FakeGenerator()

    t0 = time.perf_counter()
    a = ask("What does E-214 mean?", retriever, slow_load, k=2, max_tokens=50)
    wall_ms = (time.perf_counter() - t0) * 1e3
    t = a.timings
    assert a.covered and t["load_ms"] >= 300
    # the load is counted once, beside the total, not inside it (no bound on how fast this CPU is)
    assert 0 <= t["ttft_ms"] <= t["total_ms"] and t["total_ms"] + t["load_ms"] <= wall_ms


def test_ask_with_a_question_longer_than_the_context(retriever):
    gen = FakeGenerator(max_context=300)
    q = "What does E-214 mean? " + " ".join(f"pad{i}" for i in range(5000))
    with pytest.raises(ContextLengthError, match="exceed the generator's context of 300 tokens"):
        ask(q, retriever, gen, max_tokens=50)
    assert gen.calls == []


def test_an_answer_not_in_the_passages_is_flagged_with_the_closest_quote(retriever):
    gen = FakeGenerator(answer="[1] [2] [3]")
    streamed: list[str] = []
    a = ask("What does E-214 mean?", retriever, gen, k=2, on_token=streamed.append)
    # only citations, twice (first answer and the retry): neither is shown, the passage is quoted instead
    assert len(gen.calls) == 2 and a.grounded is False and a.model_text == "[1] [2]" and a.first_text == "[1] [2]"
    assert "[1] [2]" not in a.text and a.text.startswith("The model gave no answer of its own. Closest passage [1]")
    assert "E-214: coolant pressure low" in a.text and "".join(streamed).strip() == a.text
    invented = ask("What does E-214 mean?", retriever, FakeGenerator(answer="It is a story about dragons."), k=2)
    assert invented.grounded is False and invented.text.startswith("It is a story about dragons.")
    assert invented.cited and invented.sources[invented.cited[0] - 1]["cited"]


def test_degenerate_answers_are_named():
    q = "What line width does pprint use by default?"
    assert degenerate("[1] [2] [3] [4] [5]", q) == "only citations or passage headers"
    assert degenerate("[1] (pydoc/pprint.txt, lines 1-32)", q) == "only citations or passage headers"
    assert degenerate("What line width does pprint use by default? [1].", q) == "the question repeated back"
    assert degenerate("[1] (pydoc/pprint.txt, lines 1-32) The default width is 80.", q) is None
    assert degenerate("The documents do not cover this question.", q) is None  # a refusal is an answer
    # the question's words, but not in its order: the answer to a choice question
    assert degenerate("Lower priority numbers mean higher priority. [1]",
                      "In the sched module, do lower priority numbers mean higher or lower priority?") is None


def test_answer_guard_holds_what_says_nothing_and_cuts_copied_headers():
    def run(question, pieces):
        g = AnswerGuard(question)
        shown = "".join(g.feed(p) for p in pieces)
        return shown + ("" if g.degenerate else g.flush()), g.degenerate

    q = "Which ZipFile compression constant requires zlib?"
    header = ["[", "1", "] (", "py", "doc", "/z", "lib", ".txt", ", lines", " 171", "-", "202", ")"]
    assert run(q, header) == ("", "only citations or passage headers")
    assert run(q, header + [" zlib", ".DEFL", "ATED"]) == ("[1] zlib.DEFLATED", None)
    # the question coming back word by word (a word still growing) stays held to the end
    echo = ["Which", " Zip", "File", " compression", " constant", " requires", " zlib", "?", " [", "1", "]"]
    assert run(q, echo) == ("", "the question repeated back")
    shown, why = run("What does error E-214 mean?", ["Error", " E", "-", "214", " means", " LiDAR", " contamination"])
    assert shown == "Error E-214 means LiDAR contamination" and why is None


def test_a_copied_section_title_is_degenerate():
    """An answer that is only a passage's heading says nothing: "[1] 4.5 Zero Address" answered "How do I
    make systemd-networkd give an interface a static IP address?" over GNU sed's manual (session 21)."""
    from rag.ground import passage_headings

    info = "sed manual: Zero Address\n\n4.5 Zero Address\n================\n\nAn address of 0 ..."
    md = "## Error E-214\n\nE-214 means the coolant pressure is low."
    hs = passage_headings([info, md], ["Errors > Error E-214"])
    assert "4.5 zero address" in hs and "error e-214" in hs and "errors" in hs
    q = "How do I make systemd-networkd give an interface a static IP address?"
    assert degenerate("[1] 4.5 Zero Address", q, headings=hs) == "only a passage's heading"
    assert degenerate("4.5 Zero Address.", q, headings=hs) == "only a passage's heading"
    assert degenerate("[1, 2] 4.5 Zero Address", q, headings=hs) == "only a passage's heading"  # any citation form
    assert degenerate("[1] 4.5 Zero", q, partial=True, headings=hs) == "only a passage's heading"  # still streaming
    assert degenerate("[1] 4.5 Zero", q, headings=hs) is None  # ended: not a heading
    assert degenerate("Error E-214 means the coolant pressure is low [1].", q, headings=hs) is None
    g = AnswerGuard(q, hs)
    assert "".join(g.feed(p) for p in ["[1]", " 4", ".5", " Zero", " Address"]) == ""
    assert g.degenerate == "only a passage's heading"


def test_a_copied_heading_is_asked_again(retriever):
    gen = FakeGenerator(answer=["[1] Codes.", "E-214 means the coolant pressure is low."])
    a = ask("What does E-214 mean?", retriever, gen, k=2)
    assert len(gen.calls) == 2 and a.first_text == "[1] Codes."
    assert a.text == "E-214 means the coolant pressure is low."


def test_a_degenerate_first_answer_is_asked_again_without_being_shown(retriever):
    gen = FakeGenerator(answer=["[1] [2]", "E-214 means the coolant pressure is low."])
    streamed: list[str] = []
    a = ask("What does E-214 mean?", retriever, gen, k=2, on_token=streamed.append)
    assert len(gen.calls) == 2 and a.first_text == "[1] [2]"
    assert a.text == "E-214 means the coolant pressure is low." == "".join(streamed).strip()
    assert a.grounded and a.cited == [1]  # attributed: the retry cites nothing
    first, retry = gen.calls[0][0][1]["content"], gen.calls[1][0][1]["content"]
    assert first.endswith(RECIPES["small"].instruction) and retry.endswith(RECIPES["small"].retry_instruction)
    assert first[: first.rindex("Question:")] == retry[: retry.rindex("Question:")]  # the same passages
    # a good first answer is not asked twice, also when it was held to its end (an unclosed bracket)
    one = FakeGenerator(answer="E-214 means the coolant pressure is low [1].")
    assert ask("What does E-214 mean?", retriever, one, k=2).first_text is None and len(one.calls) == 1
    held = FakeGenerator(answer="[E-214 means the coolant pressure is low.")
    a = ask("What does E-214 mean?", retriever, held, k=2)
    assert len(held.calls) == 1 and a.first_text is None and a.text == "[E-214 means the coolant pressure is low."


def test_an_ungrounded_answer_to_a_question_passed_on_keywords_alone_is_refused(retriever):
    # the cosine side alone would refuse it; half its terms in one passage let it through (weak)
    retriever.min_cosine, retriever.min_cosine_with_keywords = 1.01, -1.0
    q = "How is the hose of the coolant described?"
    r = retriever.search(q, k=2)
    assert r.relevant and r.passed_on == "keywords"
    streamed: list[str] = []
    a = ask(q, retriever, FakeGenerator(answer="The capital is Canberra [1]."), k=2, on_token=streamed.append)
    # nothing of the invention reaches the user: held to its end, then refused
    assert not a.covered and a.text == NOT_COVERED and "".join(streamed) == NOT_COVERED and a.sources == []
    assert a.model_text == "The capital is Canberra [1]." and a.grounded is False
    assert any("keywords alone" in n for n in a.notes)
    # an answer the passages back is shown, in one piece once it ended
    streamed.clear()
    ok = ask(q, retriever, FakeGenerator(answer="Check the coolant hose; pressure low [1]."), k=2,
             on_token=streamed.append)
    assert ok.covered and ok.grounded and streamed == [ok.text + " "] and ok.text.startswith("Check the coolant hose")
    assert ok.timings["ttft_ms"] <= ok.timings["total_ms"]
    # without the gate (eval of the model alone), nothing is held or refused
    free = ask(q, retriever, FakeGenerator(answer="The capital is Canberra [1]."), k=2, gate=False)
    assert free.covered and free.text.startswith("The capital is Canberra")
    # passed on the cosine: the same invention is shown, followed by the warning and a quote
    retriever.min_cosine = -1.0
    assert retriever.search(q, k=2).passed_on == "cosine"
    shown = ask(q, retriever, FakeGenerator(answer="The capital is Canberra [1]."), k=2)
    assert shown.covered and "not backed by the passages" in shown.text


def test_a_question_naming_a_function_no_passage_holds_is_refused_before_generating(retriever):
    retriever.min_cosine = -1.0  # the cosine alone would let anything through
    gen = FakeGenerator(answer="It returns a list of the closest matches [1].")
    a = ask("What does difflib.get_close_matches return?", retriever, gen, k=2)
    assert not a.covered and a.text == NOT_COVERED and gen.calls == []
    assert any("no passage mentions difflib.get_close_matches" in n for n in a.notes)


def test_a_keyword_pass_needs_the_answer_backed_by_a_passage_about_the_question():
    """An answer grounded only in an unrelated passage's title line is refused on a keyword-only pass
    (Qwen2.5-Coder-1.5B's answer on the pydoc corpus, session 14); on-topic support stands."""
    passages = ["Python Library Documentation: package zoneinfo\n\nNAME\n    zoneinfo\n\nCLASSES\n    ZoneInfo(tzinfo)",
                "E-300: fan stall in the battery bay. The capital cost of a spare fan is 40 EUR."]
    q = "What is the capital of Australia?"
    answer = ("The capital of Australia is Canberra. This information is found in the passage [1] of the Python "
              "Library Documentation: package zoneinfo.")
    g = ground(answer, passages, [1])
    assert g.grounded and g.support[0] >= 0.5  # the title line alone carries it past MIN_SUPPORT
    r = Retrieval(q, "hybrid", [], 0.17, 1, 0.5, "keywords")
    assert refuse_ungrounded(r, g, passages, q)
    assert not refuse_ungrounded(replace(r, passed_on="cosine"), g, passages, q)  # strong evidence: shown with notes
    q2 = "What is the capital cost of a spare fan?"
    ok = ground("A spare fan costs 40 EUR [2].", passages, [2])
    assert ok.grounded and not refuse_ungrounded(replace(r, query=q2), ok, passages, q2)
    assert refuse_ungrounded(replace(r, query=q2), ok, passages, q2, min_coverage=1.01)  # the gate's own threshold
    assert refuse_ungrounded(replace(r, query=q2), replace(ok, grounded=False), passages, q2)


# pydoc's FUNCTIONS section (statistics.txt): the tail of an entry whose head is in the chunk before, then
# two sibling entries that differ by one word, then a third
PYDOC_ENTRIES = """\
        Inputs may be any numeric type that can be coerced to a float.
    
    median_high(data)
        Return the high median of data.
        
        When it is even, the larger of the two middle values is returned.
    
    median_low(data)
        Return the low median of numeric data.
        
        When it is even, the smaller of the two middle values is returned.
    
    mode(data)
        Return the most common data point from discrete or nominal data.
     |  mode(self)
     |      a method of a class, indented deeper: not a sibling"""


def test_a_named_entry_is_shown_without_its_neighbours():
    q = "What does statistics.median_low return when the number of data points is even?"
    out = without_neighbour_entries(PYDOC_ENTRIES, q)
    assert "the smaller of the two middle values" in out and "median_low(data)" in out
    assert "the larger" not in out and "median_high" not in out and "mode(data)" not in out
    assert out.startswith("        Inputs may be any numeric type")  # text that is no sibling entry stays
    assert out.count("...") == 2  # one mark per run of dropped entries (before and after median_low)
    # nothing named, two named, or a lone entry: the passage is shown as it is
    assert without_neighbour_entries(PYDOC_ENTRIES, "Which function returns the median?") is None
    assert without_neighbour_entries(PYDOC_ENTRIES, "How do median_low and median_high differ?") is None
    lone = PYDOC_ENTRIES[PYDOC_ENTRIES.index("    median_low"): PYDOC_ENTRIES.index("    mode(data)")]
    assert without_neighbour_entries(lone, q) is None
    # manuals text (tables, numbered checks, a command) has no entry heads
    manual = "| E-214 | Fault | LiDAR degraded |\nCheck 1. Run kestrel-cli diag(brake) first.\n  2. Replace (part KS-BLT-310)."
    assert without_neighbour_entries(manual, "What does E-214 mean and what is kestrel-cli?") is None


def test_build_prompt_shows_the_named_entry_without_its_neighbours():
    tok = WordTokenizer()
    doc = PYDOC_ENTRIES
    h = Hit(ChunkRow(1, 1, "statistics.txt", "line", 0, doc, "", 501, 520, 0, len(doc), 60), 1.0)
    p = build_prompt("What does median_low return?", [h], tok, max_context=4000)
    assert "the smaller of the two" in p.passages[0].text and "the larger" not in p.passages[0].text
    assert p.passages[0].truncated
    # the unnamed question sees the whole passage
    p2 = build_prompt("What does the median return?", [h], tok, max_context=4000)
    assert p2.passages[0].text == doc and not p2.passages[0].truncated


# the chunk before PYDOC_ENTRIES in statistics.txt: the tail of mean's entry, then median's family
PYDOC_SIBLINGS = """\
        >>> mean([1, 2, 3, 4, 4])
        2.8
    
    median(data)
        Return the median (middle value) of numeric data.
        
        When the number of data points is even, the median is interpolated by
        taking the average of the two middle values:
    
    median_grouped(data, interval=1.0)
        Estimates the median for numeric data binned around the midpoints.
    
    mode(data)
        Return the most common data point from discrete or nominal data.
        Calls uuid_generate_time_safe(3).
        uuid_generate_time_safe(3)."""


def _hit(path: str, text: str, start: int) -> Hit:
    return Hit(ChunkRow(start, start, path, "line", 0, text, "", start, start + 20, 0, len(text), 60), 1.0)  # one document each: not merged


def test_a_passage_of_the_named_entrys_siblings_loses_them():
    q = "What does statistics.median_low return when the number of data points is even?"
    lone = PYDOC_ENTRIES[PYDOC_ENTRIES.index("    median_low"): PYDOC_ENTRIES.index("    mode(data)")]
    assert documented_entry([lone, PYDOC_SIBLINGS], q) == "median_low"
    out = without_neighbour_entries(PYDOC_SIBLINGS, q, "median_low")
    # median's interpolation (what session 6's engine answered with) and median_grouped are gone
    assert "interpolated" not in out and "median(data)" not in out and "median_grouped" not in out
    # the tail of an entry before them, another family's entry and prose that starts with a call stay
    assert out.startswith("        >>> mean(") and "mode(data)" in out and out.count("uuid_generate_time_safe(3)") == 2
    assert out.count("...") == 1
    # without the entry documented elsewhere in the prompt, a passage naming none of its entries stays whole
    assert without_neighbour_entries(PYDOC_SIBLINGS, q) is None
    p = build_prompt(q, [_hit("statistics.txt", lone, 520), _hit("statistics.txt", PYDOC_SIBLINGS, 460)],
                     WordTokenizer(), max_context=4000)
    assert "smaller of the two" in p.passages[0].text and "interpolated" not in p.passages[1].text
    assert p.passages[1].truncated and not p.passages[0].truncated
    # a question naming two documented entries compares them: nothing is dropped anywhere
    assert documented_entry([lone, PYDOC_SIBLINGS], "Do median_low and median differ?") is None
    p2 = build_prompt("Do median_low and median differ?", [_hit("statistics.txt", lone, 520),
                      _hit("statistics.txt", PYDOC_SIBLINGS, 460)], WordTokenizer(), max_context=4000)
    assert "interpolated" in p2.passages[1].text


def test_sibling_names_share_a_stem():
    for a, b in [("median", "median_low"), ("median_grouped", "median_low"), ("heappop", "heappushpop"),
                 ("copy2", "copytree")]:
        assert sibling_names(a, b) and sibling_names(b, a)
    for a, b in [("UUID", "uuid4"), ("getuser", "getpass"), ("wrap", "TextWrapper"), ("mode", "mode")]:
        assert not sibling_names(a, b)


def test_a_question_for_a_return_value_is_asked_for_the_value():
    assert asks_return_value("What does heapq.heappushpop return?")
    assert asks_return_value("In what unit does wave's getsampwidth() return the sample width?")
    assert not asks_return_value("What attributes does the value returned by shutil.disk_usage have?")
    assert not asks_return_value("How do I return a robot to its dock?")
    h = _hit("heapq.txt", "heappushpop(heap, item, /)\n    Push item on the heap, then pop and return the smallest.", 40)
    msg = build_prompt("What does heapq.heappushpop return?", [h], WordTokenizer(), 4000,
                       recipe=RECIPES["medium"]).messages[1]["content"]
    assert msg.endswith(RECIPES["medium"].instruction + "\n" + RETURN_VALUE_INSTRUCTION)
    for q, r in [("What does heapq.heappush do?", "medium"), ("What does heapq.heappushpop return?", "small")]:
        msg = build_prompt(q, [h], WordTokenizer(), 4000, recipe=RECIPES[r]).messages[1]["content"]
        assert RETURN_VALUE_INSTRUCTION not in msg and msg.endswith(RECIPES[r].instruction)


def test_where_an_answer_says_it_found_the_fact_is_not_its_content():
    # the 1.5B's second sentence names the passage's lines: not words the passage text holds
    passage = "Fit the new wheel. Tighten the wheel bolts crosswise to 12 Nm."
    answer = "The bolts are tightened to 12 Nm. This is specified in the passage [1] on lines 44-52."
    assert ground(answer, [passage], [1]).grounded and support(answer, passage) == 0.75
    # an invention stays ungrounded, whatever it says about lines
    assert not ground("The bolts take 40 Nm of torque from a torque wrench, see lines 3-4.", [passage], [1]).grounded


def test_an_answer_naming_a_command_no_passage_holds_is_not_grounded():
    """A command or option in a code span whose first word no passage holds came from the model's memory
    ("How do I change my login shell?" over GNU coreutils' manual: "use the `chsh` command", session 21)."""
    from rag.ground import unheld_commands

    passages = ["'who' prints information about users who are logged on.", "Use '--null' (-0) to end lines with NUL."]
    assert unheld_commands("To change your login shell, use the `chsh` command [1].", passages) == ["chsh"]
    assert unheld_commands("Run ```\napt-mark hold <package-name>\n``` to pin it.", passages) == ["apt-mark hold <package-name>"]
    assert unheld_commands("Give `--null` (or `-0`) and `who`; `1024` bytes.", passages) == []  # held, or no word
    g = ground("To change your login shell, use the `chsh` command [1].", passages, [1])
    assert not g.grounded and "`chsh`, which no passage holds" in g.notes[-1]
    assert ground("Use `--null` to end lines with NUL [2].", passages, [2]).grounded
    # a module's page names its function without the module: `shlex.quote` is held by "quote(s)"
    page = ["shlex - A lexical analyzer class\n\nquote(s)\n    Return a shell-escaped version of the string *s*."]
    assert unheld_commands("`shlex.quote` returns a shell-escaped version of *s* [1].", page) == []
    assert unheld_commands("Use `shlex.split` on it [1].", page) == ["shlex.split"]
