"""Retrieval: FTS5 escaping, reciprocal rank fusion, modes, the relevance gate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_rag_fakes import HashEmbedder  # noqa: E402

from edge.errors import UsageError  # noqa: E402
from rag.ingest import ingest  # noqa: E402
from rag.retrieve import RRF_K, Retriever, fts_query, keyword_coverage, query_terms, rrf  # noqa: E402

MANUAL = """# Controller manual

## Error E-214

E-214 means the coolant pressure sensor reads below 0.8 bar. Check hose PN 40-118-2 for leaks.

## Error E-2140

E-2140 is a different code: firmware checksum failure. Reflash the controller.

## Cleaning

Wipe the touch screen with a dry cloth. Never use solvents on the housing.

## Network

The controller gets its address by DHCP; a static address is set in the web page under Settings.
"""


@pytest.fixture
def retriever(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "controller.md").write_text(MANUAL)
    (d / "other.txt").write_text("Unrelated text about gardening tools and watering plants in summer.\n")
    emb = HashEmbedder()
    ingest(d, embedder=emb, progress=False)
    with Retriever(emb) as r:
        yield r


def test_query_terms_and_escaping():
    assert query_terms("What does error E-214 mean?") == ["error", "e-214"]
    q = fts_query('E-214 "quoted" NEAR(a b) AND col:x * -minus (paren')
    assert q.count('"') % 2 == 0 and " OR " in q
    assert '"e-214"' in q and '"near"' in q and '"col:x"' in q
    assert fts_query("what is the") == ""  # only stopwords


def test_dotted_names_are_also_searched_by_their_parts(tmp_path):
    """API docs name a function under its module's page ("quote(s)" in shlex's): the phrase
    "shlex.quote" matches no chunk, so the keyword side must also search "shlex" and "quote"."""
    assert fts_query("What does shlex.quote return?") == '"shlex.quote" OR "shlex" OR "quote" OR "return"'
    assert fts_query("queue.Queue.get_nowait") == '"queue.queue.get_nowait" OR "queue" OR "get_nowait"'
    assert fts_query("the 2.4 GHz band, E-214, a.b") == '"2.4" OR "ghz" OR "band" OR "e-214" OR "a.b"'  # not names
    d = tmp_path / "docs"
    d.mkdir()
    (d / "shlex.txt").write_text("FUNCTIONS\n    quote(s)\n        Return a shell-escaped version of the string s.\n")
    (d / "tuple.txt").write_text("\n".join(f"__m{i}__(self, value, /)\n    Return self{i}value." for i in range(12)) + "\n")
    emb = HashEmbedder()
    ingest(d, embedder=emb, progress=False)
    with Retriever(emb) as r:
        res = r.search("What does shlex.quote return?", k=1, mode="keyword")
    assert "shell-escaped" in res.hits[0].chunk.text


def test_hostile_queries_do_not_break_fts(retriever):
    for q in ['E-214', '"', 'NEAR(', 'a AND OR NOT', 'x*', '^start', 'col:val', "it's", '((()))', '-', 'E-214 -leaks']:
        res = retriever.search(q, k=3, mode="keyword")
        assert isinstance(res.hits, list)
    res = retriever.search("E-214", k=3, mode="keyword")
    assert "0.8 bar" in res.hits[0].chunk.text  # the phrase e+214, not E-2140
    assert all("checksum" not in h.chunk.text for h in res.hits[:1])


def test_rrf_math():
    fused = rrf([[1, 2, 3], [3, 1]])
    assert fused[1] == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + 2))
    assert fused[3] == pytest.approx(1 / (RRF_K + 3) + 1 / (RRF_K + 1))
    assert fused[2] == pytest.approx(1 / (RRF_K + 2))
    assert max(fused, key=fused.get) == 1


def test_modes_and_hybrid_fusion(retriever):
    q = "coolant pressure sensor E-214"
    v = retriever.search(q, k=4, mode="vector")
    kw = retriever.search(q, k=4, mode="keyword")
    from rag.retrieve import Fusion

    h = retriever.search(q, k=4, mode="hybrid", fusion=Fusion("rrf", 0.5))
    assert all(x.keyword_score is None or x.vector_score is None or True for x in h.hits)
    assert [x.score for x in v.hits] == sorted((x.score for x in v.hits), reverse=True)
    assert all(-1.0001 <= x.score <= 1.0001 for x in v.hits)
    # hybrid scores are exactly the RRF of the two lists it was built from
    vr = {x.chunk.id: x.vector_rank for x in h.hits}
    for x in h.hits:
        want = sum(1 / (RRF_K + r) for r in (x.vector_rank, x.keyword_rank) if r is not None)
        assert x.score == pytest.approx(want)
    assert h.hits[0].chunk.heading.endswith("Error E-214")
    assert kw.hits[0].chunk.heading.endswith("Error E-214")
    assert h.hits[0].vector_rank is not None and h.hits[0].keyword_rank == 1 and vr


def test_relevance_gate(retriever):
    # thresholds for the hashing embedder (its unrelated texts reach cosine ~0.4 through collisions)
    retriever.min_cosine, retriever.min_cosine_with_keywords = 0.8, 0.5
    yes = retriever.search("What does error E-214 mean?", k=3)
    assert yes.relevant and yes.keyword_coverage == 1.0
    no = retriever.search("Who won the football world cup in 1954?", k=3)
    assert not no.relevant and no.keyword_hits == 0 and no.passed_on == ""
    assert keyword_coverage("static address DHCP", MANUAL) == 1.0
    # a code alone is enough, even where the vector side is far off
    retriever.min_cosine = retriever.min_cosine_with_keywords = 1.01
    assert retriever.search("PN 40-118-2", k=3).passed_on == "code"
    assert not retriever.search("coolant gardening", k=3).relevant


def test_a_question_naming_what_no_passage_holds_is_not_covered(retriever):
    """The gate refuses a question that names a function or setting (a dotted name, a name with an
    underscore) found in no retrieved passage, however high its cosine; a name that is there passes."""
    from rag.retrieve import api_names, missing_names

    assert api_names("What does Python's difflib.get_close_matches return?") == ["difflib.get_close_matches"]
    assert api_names("When is ensure_ascii true, and what is 2.4 GHz?") == ["ensure_ascii"]
    # documentation names a function under its module's page: the last part is enough
    assert missing_names("What does queue.Queue.get_nowait raise?", ["get_nowait()\n  Remove and return"]) == []
    assert missing_names("What does difflib.get_close_matches return?", ["Reading os-release in python"]) == [
        "difflib.get_close_matches"]
    retriever.min_cosine = -1.0  # every question passes on cosine
    r = retriever.search("Which sensor does reset_coolant_sensor calibrate?", k=3)
    assert not r.relevant and r.missing == ["reset_coolant_sensor"]
    assert retriever.search("What does the coolant pressure sensor read?", k=3).passed_on == "cosine"
    spaced = retriever.search("Which error means coolant pressure_sensor failure?", k=3)
    assert not spaced.relevant and spaced.missing == ["pressure_sensor"]  # the manual writes "pressure sensor"


def test_a_question_naming_a_code_no_passage_holds_is_not_covered(retriever):
    """An error code or part number (a term with a letter and a digit) that no retrieved passage holds
    makes the question uncovered, whatever its cosine: "What does error E-214 mean on the Kestrel
    robot?" passed on cosine over GNU manuals (find's "Error Messages" node) and got an invented
    meaning. A code that is there, or is there without its separators, passes; bare numbers are no codes."""
    from rag.retrieve import letter_codes, missing_names

    assert letter_codes("Is E-214 or KS-BAT-48105 rated 57.6 V, or PN 40-118-2?") == ["e-214", "ks-bat-48105"]
    assert letter_codes("What does base64.b16decode or sha3_256 allow?") == []  # names: the name rule
    assert missing_names("Which digest does SHA-256 give?", ["sha256sum prints SHA256 digests"]) == []
    assert missing_names("What does error E-215 mean?", ["E-214 means the coolant pressure"]) == ["e-215"]
    assert missing_names("What does E-214 mean?", ["E-2140 is a different code"]) == ["e-214"]
    # a code the passages hold is enough: the user's own version or serial beside it is no reason to refuse
    assert missing_names("Why does E-214 come back after firmware v2.3.1?", ["E-214 means the coolant"]) == []
    retriever.min_cosine = -1.0  # every question passes on cosine
    r = retriever.search("What does error E-999 mean?", k=3)
    assert not r.relevant and r.missing == ["e-999"]
    assert retriever.search("What does error E-214 mean?", k=3).relevant


def test_bad_arguments(retriever):
    with pytest.raises(UsageError, match="mode"):
        retriever.search("x", mode="fuzzy")
    with pytest.raises(UsageError):
        retriever.search("   ")


def test_identical_passages_from_two_copies_are_one_source(tmp_path):
    """A folder ingested from two paths indexes every passage twice; the results show each once
    and still fill k with other passages."""
    emb = HashEmbedder()
    for name in ("a", "b"):
        d = tmp_path / name / "docs"
        d.mkdir(parents=True)
        (d / "controller.md").write_text(MANUAL)
        ingest(d, embedder=emb, progress=False)
    with Retriever(emb) as r:
        for mode in ("hybrid", "vector", "keyword"):
            res = r.search("What does E-214 mean?", k=3, mode=mode)
            texts = [h.chunk.text for h in res.hits]
            assert len(texts) == len(set(texts)), (mode, texts)
            # keyword search only matches the passages holding the terms (one, twice over)
            assert len(texts) == (1 if mode == "keyword" else 3), (mode, texts)
            assert "coolant pressure" in texts[0]


def test_default_fusion_keeps_a_decisive_keyword_hit_that_the_vector_list_lacks():
    """What RRF lost on the example corpus: a keyword hit far ahead of the rest of its list, absent from
    the vector candidates, outranks passages that are mediocre in both lists; when the keyword list's
    best is barely ahead, the vector side decides."""
    from rag.retrieve import DEFAULT_FUSION, FUSION_CANDIDATES, Fusion

    vec = [(10 + j, 0.8 - 0.005 * j) for j in range(FUSION_CANDIDATES)]
    rest = [(10 + j, 8.0 - 0.05 * j) for j in range(FUSION_CANDIDATES - 1)]
    decisive = DEFAULT_FUSION.fuse(vec, [(99, 20.0)] + rest)
    assert max(decisive, key=decisive.get) == 99
    plain_rrf = Fusion("rrf", 0.5).fuse(vec, [(99, 20.0)] + rest)
    assert sorted(plain_rrf, key=plain_rrf.get, reverse=True).index(99) >= 5  # RRF buries it
    close = DEFAULT_FUSION.fuse(vec, [(99, 8.05)] + rest)
    assert max(close, key=close.get) == 10


def test_fusion_methods_math_and_parse():
    from rag.retrieve import Fusion

    vec, kw = [(1, 0.9), (2, 0.5), (4, 0.7)], [(2, 10.0), (3, 5.0)]
    c = Fusion("convex", 0.5).fuse(vec, kw)
    assert c == pytest.approx({1: 0.5, 2: 0.5, 3: 0.0, 4: 0.25})  # min-max per list, absent = 0
    assert Fusion("convex", 0.8).fuse(vec, kw)[1] > Fusion("convex", 0.8).fuse(vec, kw)[2]
    # adaptive: a keyword list whose best hit holds none of the question's terms is ignored
    a0 = Fusion("adaptive", 0.5).fuse(vec, kw, kw_coverage=0.0)
    assert sorted(a0, key=a0.get, reverse=True)[:3] == [1, 4, 2]
    assert Fusion("adaptive", 0.5).fuse(vec, kw, kw_coverage=1.0) == pytest.approx(c)
    # rrf:0.5 is plain reciprocal rank fusion
    assert Fusion("rrf", 0.5).fuse(vec, kw) == pytest.approx(rrf([[1, 2, 4], [2, 3]]))  # lists in the order given
    assert Fusion.parse("adaptive:0.7") == Fusion("adaptive", 0.7)
    for bad in ("mean:0.5", "convex:1.5", "convex:x"):
        with pytest.raises(UsageError):
            Fusion.parse(bad)
