"""bench/info_corpus.py and the info corpus's held-out questions: nodes are split from Info files as
the format defines them (no tag table, no menu), a missing manual is named in one line and leaves no
folder, the rendering is deterministic, and every expected keyword sits in its node (where the Debian 12
manuals the questions were written on are installed). Kept while intact and atomic: tests/test_rendered_corpus.py."""

from __future__ import annotations

import collections
import gzip
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import info_corpus  # noqa: E402
from bench.info_corpus import MANUALS, REFERENCE_DIGEST, ensure_info_corpus, manual_files, split_nodes  # noqa: E402
from edge.errors import EdgeRagError  # noqa: E402
from rag.eval import keyword_hits, load_questions  # noqa: E402

QUESTIONS = ROOT / "examples" / "info_questions_heldout.jsonl"
QUESTIONS2 = ROOT / "examples" / "info_questions_heldout2.jsonl"  # the second blind set: other nodes
BODY = "Some text about the tool that is long enough to be a document of its own. " * 4


def _info(*nodes: tuple[str, str]) -> str:
    """An Info file: a preamble, nodes behind 0x1f, and a tag table."""
    parts = ["This is t.info, produced by makeinfo.\n"]
    parts += [f"\nFile: t.info,  Node: {name},  Next: x,  Up: Top\n\n{body}" for name, body in nodes]
    parts.append("\nTag Table:\nNode: Top\x7f1\n\x1f\nEnd Tag Table\n")
    return "\x1f".join(parts)


def test_split_nodes_drops_the_tag_table_and_menus():
    text = _info(("Top", "Overview.\n\n* Menu:\n\n* tac invocation::  Reverse.\n"),
                 ("tac invocation", BODY + "\n* Menu:\n\n* sub::  x\n"))
    nodes = split_nodes(text)
    assert [n for n, _ in nodes] == ["Top", "tac invocation"]
    assert nodes[0][1] == "Overview.\n" and nodes[1][1] == BODY.strip() + "\n"


def _install(root: Path, manuals, text: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for m in manuals:
        with gzip.open(root / f"{m}.info.gz", "wt", encoding="utf-8") as f:
            f.write(text)


def test_render_names_files_by_manual_and_node_and_skips_index_and_short_nodes(tmp_path, monkeypatch):
    root = tmp_path / "info"
    _install(root, MANUALS, _info(("Top", BODY), ("tac invocation", BODY), ("Concept index", BODY),
                                  ("tiny", "short\n"), ("tac: invocation", BODY)))
    monkeypatch.setattr(info_corpus, "INFO_ROOT", root)
    out = ensure_info_corpus(tmp_path / "cache" / "info-corpus")
    meta = json.loads((out / "corpus.json").read_text())
    names = sorted(meta["sha256"])
    assert names == sorted(f"{m}--{s}.txt" for m in MANUALS for s in ("tac-invocation", "tac-invocation-2"))
    assert (out / "sed--tac-invocation.txt").read_text().startswith("sed manual: tac invocation\n\n")
    assert meta["manuals"] == list(MANUALS)


def test_split_manuals_are_read_in_part_order(tmp_path):
    root = tmp_path / "info"
    root.mkdir()
    for name in ("find.info.gz", "find.info-2.gz", "find.info-10.gz", "find.info-1.gz"):
        (root / name).write_bytes(b"")
    assert [p.name for p in manual_files("find", root)] == ["find.info.gz", "find.info-1.gz", "find.info-2.gz",
                                                            "find.info-10.gz"]


def test_missing_manuals_are_named_and_leave_no_folder(tmp_path, monkeypatch):
    root = tmp_path / "info"
    _install(root, ["coreutils", "grep"], _info(("x", BODY)))
    monkeypatch.setattr(info_corpus, "INFO_ROOT", root)
    out = tmp_path / "cache" / "info-corpus"
    with pytest.raises(EdgeRagError) as e:
        ensure_info_corpus(out)
    msg = str(e.value)
    assert "\n" not in msg and "find, sed, gzip, diffutils" in msg and "findutils" in msg and "coreutils," not in msg
    assert not out.exists() and list(out.parent.iterdir()) == []


def _missing_reason() -> str | None:
    missing = [m for m in MANUALS if not manual_files(m)]
    return f"Info manuals not installed under /usr/share/info: {', '.join(missing)}" if missing else None


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    why = _missing_reason()
    if why:
        pytest.skip(why)
    return ensure_info_corpus(tmp_path_factory.mktemp("info") / "info-corpus")


def test_rendering_is_deterministic(rendered, tmp_path):
    """(Kept while intact, redone when edited, never half there: tests/test_rendered_corpus.py.)"""
    meta = json.loads((rendered / "corpus.json").read_text())
    assert len(meta["sha256"]) > 300
    again = ensure_info_corpus(tmp_path / "info-corpus")
    assert json.loads((again / "corpus.json").read_text())["sha256"] == meta["sha256"]


@pytest.mark.parametrize("qfile", [QUESTIONS, QUESTIONS2], ids=["set1", "set2"])
def test_questions_parse_spread_over_the_manuals_and_do_not_give_their_keywords(qfile):
    items = load_questions(qfile)
    assert len(items) == 24 and len({it.question for it in items}) == 24
    assert len({it.expected_sources[0] for it in items}) == 24
    per = collections.Counter(it.expected_sources[0].split("--", 1)[0] for it in items)
    assert set(per) == set(MANUALS) and per["coreutils"] == 10
    for it in items:
        assert len(it.expected_sources) == 1 and 1 <= len(it.keywords) <= 2, it.question
        assert not keyword_hits(it.question, it.keywords)[1], it.question


def test_the_second_set_asks_about_other_nodes():
    first = {it.expected_sources[0] for it in load_questions(QUESTIONS)}
    assert not first & {it.expected_sources[0] for it in load_questions(QUESTIONS2)}


@pytest.mark.parametrize("qfile", [QUESTIONS, QUESTIONS2], ids=["set1", "set2"])
def test_every_keyword_is_in_its_node(rendered, qfile):
    meta = json.loads((rendered / "corpus.json").read_text())
    if meta["digest"] != REFERENCE_DIGEST:
        pytest.skip(f"these manuals render to digest {meta['digest']}, not the Debian 12 reference "
                    f"{REFERENCE_DIGEST} the keywords were checked against (other manual versions)")
    for it in load_questions(qfile):
        text = (rendered / it.expected_sources[0]).read_text(encoding="utf-8")
        ok, share = keyword_hits(text, it.keywords)
        assert ok, (it.question, it.keywords, share)
