"""bench/man_corpus.py and the man corpus's held-out questions: the file parses, names only pages of
the fixed list, avoids the pages the retrieval-at-scale questions ask about; rendering names what is
missing and is deterministic (kept while intact and atomic: tests/test_rendered_corpus.py), and every
expected keyword sits in its page (where `man` and the pages are
installed, as on the Debian 12 image the questions were written on)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import man_corpus  # noqa: E402
from bench.man_corpus import PAGES, REFERENCE_DIGEST, ensure_man_corpus, page_file, rendered_name  # noqa: E402
from edge.errors import EdgeRagError  # noqa: E402
from rag.eval import keyword_hits, load_questions  # noqa: E402

QUESTIONS = ROOT / "examples" / "man_questions_heldout.jsonl"


def _missing_reason() -> str | None:
    if shutil.which("man") is None:
        return "the `man` command is not installed (apt-get install man-db)"
    missing = [p for p in PAGES if page_file(p) is None]
    return f"man pages not installed: {', '.join(missing)}" if missing else None


def test_questions_parse_and_name_pages_of_the_list():
    items = load_questions(QUESTIONS)
    names = {rendered_name(p) for p in PAGES}
    assert 22 <= len(items) <= 24
    assert len({it.question for it in items}) == len(items)
    for it in items:
        assert len(it.expected_sources) == 1 and it.expected_sources[0] in names, it.question
        assert 1 <= len(it.keywords) <= 2, it.question
        # a keyword the question already holds would be found in any answer that repeats it
        assert not keyword_hits(it.question, it.keywords)[1], it.question
    assert names == {it.expected_sources[0] for it in items}  # every page answers something


def test_pages_are_not_the_retrieval_scale_questions_pages():
    asked = {d.split("/", 1)[1] for line in (ROOT / "bench" / "scale_questions.jsonl").read_text().splitlines()
             if line.strip() for d in json.loads(line)["docs"] if d.startswith("man/")}
    assert asked and not asked & {rendered_name(p) for p in PAGES}
    assert {p.rsplit(".", 1)[1] for p in PAGES} <= {"5", "7", "8"}


def test_missing_pages_are_named_and_leave_no_folder(tmp_path, monkeypatch):
    root = tmp_path / "share-man"
    (root / "man5").mkdir(parents=True)
    (root / "man5" / "passwd.5").write_text(".TH PASSWD 5\n")
    monkeypatch.setattr(man_corpus, "MAN_ROOT", root)
    monkeypatch.setattr(man_corpus.shutil, "which", lambda name: "/usr/bin/man")
    out = tmp_path / "cache" / "man-corpus"
    with pytest.raises(EdgeRagError) as e:
        ensure_man_corpus(out)
    msg = str(e.value)
    assert "\n" not in msg and "shadow.5" in msg and "useradd.8" in msg and "passwd.5," not in msg
    assert not out.exists() and list(out.parent.iterdir()) == []  # the temporary folder went too


def test_missing_man_command_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(man_corpus.shutil, "which", lambda name: None)
    with pytest.raises(EdgeRagError, match=r"`man` command is not installed \(apt-get install man-db\)$"):
        ensure_man_corpus(tmp_path / "man-corpus")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    why = _missing_reason()
    if why:
        pytest.skip(why)
    return ensure_man_corpus(tmp_path_factory.mktemp("man") / "man-corpus")


def test_rendering_is_deterministic(rendered, tmp_path):
    """(Kept while intact, redone when edited, never half there: tests/test_rendered_corpus.py.)"""
    meta = json.loads((rendered / "corpus.json").read_text())
    assert meta["pages"] == list(PAGES)
    assert sorted(p.name for p in rendered.iterdir()) == sorted([rendered_name(p) for p in PAGES] + ["corpus.json"])
    again = ensure_man_corpus(tmp_path / "man-corpus")
    assert json.loads((again / "corpus.json").read_text())["sha256"] == meta["sha256"]


def test_every_keyword_is_in_its_page(rendered):
    meta = json.loads((rendered / "corpus.json").read_text())
    if meta["digest"] != REFERENCE_DIGEST:
        pytest.skip(f"these pages render to digest {meta['digest']}, not the Debian 12 reference "
                    f"{REFERENCE_DIGEST} the keywords were checked against (other page versions)")
    for it in load_questions(QUESTIONS):
        text = (rendered / it.expected_sources[0]).read_text(encoding="utf-8")
        ok, share = keyword_hits(text, it.keywords)
        assert ok, (it.question, it.keywords, share)
