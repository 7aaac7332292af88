"""edge-rag ingest / search / ask / eval through the CLI entry point (fake engines)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_rag_fakes import HashEmbedder  # noqa: E402
from test_rag_prompt import FakeGenerator  # noqa: E402

from edge.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_engines(monkeypatch, tmp_path):
    import edge.cli.rag_cmd as cmd
    import edge.runtime.generator as genmod
    import rag.retrieve as ret

    emb_dir = tmp_path / "emb"
    emb_dir.mkdir()
    monkeypatch.setattr(cmd, "_embedder", lambda path, collection=None, backend="auto": (HashEmbedder(), emb_dir))

    class G:
        @staticmethod
        def from_bundle(path, backend="auto"):
            return FakeGenerator(answer="The hose leaks [1].")

    monkeypatch.setattr(genmod, "Generator", G)
    import edge.engines

    # never build the real default generator in a test
    monkeypatch.setattr(edge.engines, "default_generator_bundle", lambda progress=True: tmp_path / "gen")
    # thresholds for the hashing embedder
    orig = ret.Retriever.__init__

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        self.min_cosine, self.min_cosine_with_keywords = 0.8, 0.5

    monkeypatch.setattr(ret.Retriever, "__init__", init)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "codes.md").write_text("# Codes\n\n## E-214\n\nE-214: coolant pressure low. Check the hose.\n\n"
                                   "## E-300\n\nE-300: fan stall, replace the fan.\n")
    (docs / "junk.txt").write_bytes(b"\xff\xfe\xfa not utf8")
    return docs


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from edge.cli import main; rc = main(['ask', '--help']); "
            "bad = [m for m in ('torch', 'transformers', 'onnxruntime', 'faiss') if m in sys.modules]; "
            "print('BAD', bad); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BAD []" in out.stdout
    for opt in ("--json", "--engine", "--embedder", "--max-tokens", "--backend", "-k"):
        assert opt in out.stdout


def test_ingest_search_ask_eval(fake_engines, capsys, tmp_path):
    assert main(["ingest", str(fake_engines), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 documents" not in out and "1 documents" in out and "skipped 1 file" in out and "UTF-8" in out
    assert main(["search", "E-214", "-k", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["hits"][0]["source"] == "docs/codes.md" and d["hits"][0]["location"].startswith("line")
    assert main(["search", "E-214", "--mode", "keyword"]) == 0
    assert "[1] docs/codes.md" in capsys.readouterr().out
    assert main(["ask", "What does E-214 mean?", "--json", "-k", "1"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert a["text"] == "The hose leaks [1]." and a["sources"][0]["cited"] and a["covered"]
    assert {"retrieval_ms", "ttft_ms", "total_ms"} <= set(a["timings"])
    assert main(["ask", "What does E-214 mean?", "-k", "1"]) == 0
    res = capsys.readouterr()
    assert res.out.startswith("The hose leaks [1].") and "Sources:" in res.out and "first token" in res.err
    # refused: the answer line, then why on stderr
    assert main(["ask", "Who painted the Mona Lisa?", "-k", "1"]) == 0
    res = capsys.readouterr()
    assert res.out.startswith("The documents do not cover this question.") and "(nothing relevant retrieved)" in res.err
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "E-300 fan stall", "expected_source": "codes.md",
                             "expected_keywords": ["hose"]}) + "\n")
    assert main(["eval", str(q), "--mode", "all", "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "recall@1=1.000" in out and "keyword-hit=1.000" in out and out.count("n=1") == 3


def test_cli_errors_are_one_line(fake_engines, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["ingest", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no documents" in err and err.count("\n") == 1
    assert main(["search", "x"]) == 1
    assert "ingest" in capsys.readouterr().err
    assert main(["ingest", str(fake_engines), "-q"]) == 0
    capsys.readouterr()
    assert main(["search", "x", "--mode", "fuzzy"]) == 2
    assert "hybrid" in capsys.readouterr().err


def test_ingest_embed_overlap_is_recorded_in_the_collection(fake_engines, capsys):
    from edge.paths import index_dir
    from rag.store import Store

    from rag.chunk import ChunkParams

    assert main(["ingest", str(fake_engines), "--quiet"]) == 0
    assert main(["ingest", str(fake_engines), "--quiet", "--no-embed-overlap", "-c", "own"]) == 0
    assert main(["ingest", str(fake_engines), "--quiet", "--embed-overlap", "-c", "carried"]) == 0
    capsys.readouterr()
    for name, want in (("default", ChunkParams.embed_overlap), ("own", False), ("carried", True)):
        with Store(index_dir(name), readonly=True) as s:
            assert s.get_meta("chunk_params")["embed_overlap"] is want



def test_ingest_keeps_the_collections_embed_overlap_unless_told(fake_engines, tmp_path, capsys):
    from edge.paths import index_dir
    from rag.chunk import ChunkParams
    from rag.store import Store

    def stored(name):
        with Store(index_dir(name), readonly=True) as s:
            return s.get_meta("chunk_params")["embed_overlap"]

    flipped = not ChunkParams.embed_overlap
    flag = "--embed-overlap" if flipped else "--no-embed-overlap"
    assert main(["ingest", str(fake_engines), "--quiet", flag, "-c", "kept"]) == 0
    (fake_engines / "extra.md").write_text("# Extra\n\nA new page about the E-999 fault and its reset.\n")
    assert main(["ingest", str(fake_engines), "--quiet", "-c", "kept"]) == 0  # no flag: the collection's setting
    assert stored("kept") is flipped
    assert "chunk parameters changed" not in capsys.readouterr().err
    assert main(["ingest", str(fake_engines), "--quiet", "--rebuild", "-c", "kept"]) == 0  # --rebuild: the default
    assert stored("kept") is ChunkParams.embed_overlap
    # written before embed_overlap existed: its overlap was embedded, and a plain re-ingest keeps doing so
    with Store(index_dir("kept"), readonly=False) as s, s.transaction():
        s.set_meta({"chunk_params": {"max_tokens": 200, "overlap": 40}})
    (fake_engines / "extra.md").write_text("# Extra\n\nThe E-999 fault clears after a reset.\n")
    assert main(["ingest", str(fake_engines), "--quiet", "-c", "kept"]) == 0
    assert stored("kept") is True


def test_ingest_embed_tokens_default_zero_and_bad_values(fake_engines, capsys):
    from edge.paths import index_dir
    from rag.chunk import DEFAULT_EMBED_TOKENS
    from rag.store import Store

    assert main(["ingest", str(fake_engines), "--quiet"]) == 0
    assert main(["ingest", str(fake_engines), "--quiet", "--embed-tokens", "0", "-c", "whole"]) == 0
    assert main(["ingest", str(fake_engines), "--quiet", "--embed-tokens", "64", "-c", "c64"]) == 0
    for name, want in (("default", DEFAULT_EMBED_TOKENS), ("whole", None), ("c64", 64)):
        with Store(index_dir(name), readonly=True) as s:
            assert s.get_meta("chunk_params")["embed_tokens"] == want
    capsys.readouterr()
    assert main(["ingest", str(fake_engines), "--quiet", "--embed-tokens", "3", "-c", "bad"]) == 2
    err = capsys.readouterr().err
    assert "embed_tokens 3 is too small" in err and "Traceback" not in err


def test_ingest_keeps_the_collections_embed_tokens_unless_given(fake_engines, capsys, caplog):
    """A collection's chunks keep one kind of vector: ingesting it again without --embed-tokens uses the
    cap it was built with (no 'chunk parameters changed' warning); --rebuild takes the default or the flag."""
    from edge.paths import index_dir
    from rag.chunk import DEFAULT_EMBED_TOKENS
    from rag.store import Store

    def cap(name):
        with Store(index_dir(name), readonly=True) as s:
            return s.get_meta("chunk_params")["embed_tokens"]

    assert main(["ingest", str(fake_engines), "--quiet", "--embed-tokens", "64", "-c", "c"]) == 0
    (fake_engines / "extra.md").write_text("# Extra\n\nA new page about the charging dock.\n")
    caplog.clear()
    assert main(["ingest", str(fake_engines), "--quiet", "-c", "c"]) == 0
    assert cap("c") == 64 and "chunk parameters changed" not in caplog.text + capsys.readouterr().err
    assert main(["ingest", str(fake_engines), "--quiet", "--rebuild", "-c", "c"]) == 0
    assert cap("c") == DEFAULT_EMBED_TOKENS
    assert main(["ingest", str(fake_engines), "--quiet", "--rebuild", "--embed-tokens", "32", "-c", "c"]) == 0
    assert cap("c") == 32
