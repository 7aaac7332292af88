"""bench/rendered_corpus.py, the machinery the man and info answer corpora share, with a stand-in render
(no manuals needed): a rendering is kept while intact, redone when a file changed, never half there."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.rendered_corpus import CORPUS_JSON, corpus_digest, ensure, files_intact, write_meta  # noqa: E402

DOCS = {"a.txt": "alpha\n", "b.txt": "beta\n"}
REFERENCE = corpus_digest({n: hashlib.sha256(t.encode()).hexdigest() for n, t in DOCS.items()})


class Renderer:
    """render / intact of a two-file corpus; counts its renderings; `fail` makes the next one raise midway."""

    def __init__(self):
        self.calls = 0
        self.fail = False

    def render(self, out: Path) -> dict:
        self.calls += 1
        (out / "a.txt").write_text("half")
        if self.fail:
            raise OSError("killed midway")
        return write_meta(out, DOCS, docs=sorted(DOCS))

    def intact(self, out: Path) -> bool:
        return files_intact(out, "docs", sorted(DOCS), list(DOCS))


def test_a_rendering_is_kept_while_intact_and_redone_when_a_file_changed(tmp_path, capsys):
    r, out = Renderer(), tmp_path / "corpus"
    assert ensure(out, False, r.render, r.intact, REFERENCE, "t") == out and r.calls == 1
    assert ensure(out, False, r.render, r.intact, REFERENCE, "t") == out and r.calls == 1  # intact: kept
    (out / "b.txt").write_text("edited\n")
    ensure(out, False, r.render, r.intact, REFERENCE, "t")
    assert r.calls == 2 and (out / "b.txt").read_text() == "beta\n"
    ensure(out, True, r.render, r.intact, REFERENCE, "t")  # --force
    assert r.calls == 3 and json.loads((out / CORPUS_JSON).read_text())["digest"] == REFERENCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no temporary folder left
    assert capsys.readouterr().err == ""  # the reference digest: nothing said


def test_a_failed_rendering_leaves_the_folder_as_it_was(tmp_path):
    r, out = Renderer(), tmp_path / "corpus"
    r.fail = True
    with pytest.raises(OSError, match="killed midway"):
        ensure(out, False, r.render, r.intact, REFERENCE, "t")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # never half a corpus
    r.fail = False
    ensure(out, False, r.render, r.intact, REFERENCE, "t")
    (out / "b.txt").write_text("edited\n")
    r.fail = True
    with pytest.raises(OSError):
        ensure(out, False, r.render, r.intact, REFERENCE, "t")
    assert (out / "a.txt").read_text() == "alpha\n" and (out / "b.txt").read_text() == "edited\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_another_digest_than_the_reference_is_said_on_stderr(tmp_path, capsys):
    r = Renderer()
    ensure(tmp_path / "corpus", False, r.render, r.intact, "0" * 16, "label")
    err = capsys.readouterr().err
    assert err.startswith("label: ") and "not the reference 0000000000000000" in err
