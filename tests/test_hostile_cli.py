"""Hostile use of the `edge-rag` command line: every mistake is one line on stderr and a non-zero
exit, never a traceback, on the typer the bounds allow (0.29 vendors click as `typer._click`);
ingest never reads outside the folder, keeps heading-only documents, and a full disk or a
read-only home leaves the collection serviceable. Issue 13's failures are reproduced here first;
add a case for every new bug found."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_rag_fakes import HashEmbedder  # noqa: E402

from edge.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MANUAL = "# Codes\n\n## E-214\n\nE-214: coolant pressure low. Check the hose.\n\n## E-300\n\nE-300: fan stall.\n"


@pytest.fixture
def docs(tmp_path, monkeypatch):
    """A folder of documents and the hashing embedder behind the CLI (no engine is built)."""
    import edge.cli.rag_cmd as cmd

    emb_dir = tmp_path / "emb"
    emb_dir.mkdir()
    monkeypatch.setattr(cmd, "_embedder", lambda path, collection=None, backend="auto": (HashEmbedder(), emb_dir))
    d = tmp_path / "docs"
    d.mkdir()
    (d / "codes.md").write_text(MANUAL)
    return d


def run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    res = capsys.readouterr()
    return rc, res.out, res.err


def one_line_error(rc: int, err: str, needle: str = "", code: int | None = None) -> None:
    assert rc != 0 and (code is None or rc == code), (rc, err)
    assert "Traceback" not in err
    assert err.startswith("error:") and err.count("\n") == 1, repr(err)
    assert needle.lower() in err.lower(), err


# --------------------------------------------------------------------------- usage mistakes (no state needed)

USAGE = [
    # issue 13: tracebacks on typer 0.29
    (["nosuchcmd"], "nosuchcmd"),
    (["ask", "--jsn", "q"], "--jsn"),
    (["plan", "--context", "abc"], "--context"),
    (["search"], "query"),
    (["ingest"], "path"),
    (["ask"], "question"),
    (["search", "q", "-k", "x"], "-k"),
    (["search", "q", "-k", "1.5"], "-k"),
    (["search", "q", "--json", "--json=3"], "json"),
    (["ingest", "docs", "--chunk-tokens", "many"], "--chunk-tokens"),
    (["generate"], "prompt"),
    (["generate", "x", "--max-tokens", "abc"], "--max-tokens"),
    (["generate", "x", "--temperature", "hot"], "--temperature"),
    (["serve", "--port", "abc"], "--port"),
    (["serve", "--deadline", "soon"], "--deadline"),
    (["verify"], "bundles"),
    (["build", "--nosuch"], "--nosuch"),
    (["profiles", "show"], ""),
    (["profiles", "nosuch"], "nosuch"),
    (["eval"], "questions"),
    (["--nosuch"], "--nosuch"),
    (["ask", "q", "-k"], "-k"),
    (["search", "q", "--mode"], "--mode"),
]


@pytest.mark.parametrize("args,needle", USAGE, ids=[" ".join(a) or "-" for a, _ in USAGE])
def test_usage_mistakes_are_one_line(capsys, args, needle):
    rc, out, err = run(args, capsys)
    one_line_error(rc, err, needle, code=2)


def test_the_cli_catches_the_frameworks_own_exception_classes():
    import typer

    from edge.cli import framework_exceptions

    usage, abort, exit_ = framework_exceptions()
    assert usage and abort and exit_
    try:
        import typer._click.exceptions as vendored  # typer >= 0.29
    except ImportError:
        vendored = None
    if vendored is not None:
        assert vendored.ClickException in usage
    assert any(issubclass(typer.BadParameter, u) for u in usage)


def test_help_and_version_paths_exit_zero(capsys):
    for args in (["--help"], ["ask", "--help"], ["verify", "--help"], ["serve", "--help"]):
        rc, out, err = run(args, capsys)
        assert rc == 0 and "Usage" in out and not err, (args, err)
    assert "--follow-links" in run(["ingest", "--help"], capsys)[1]
    assert "--api-key" in run(["serve", "--help"], capsys)[1]


# --------------------------------------------------------------------------- bad values

BAD_VALUES = [
    # issue 13: tracebacks
    (["ingest", "{docs}", "--chunk-tokens", "0"], "--chunk-tokens"),
    (["ingest", "{docs}", "--chunk-tokens", "-1"], "--chunk-tokens"),
    (["ingest", "{docs}", "--chunk-tokens", "7"], "--chunk-tokens"),
    (["ingest", "{docs}", "--chunk-tokens", "100", "--overlap", "200"], "--overlap"),
    (["ingest", "{docs}", "--chunk-tokens", "100", "--overlap", "51"], "--overlap"),
    (["ingest", "{docs}", "--overlap", "-1"], "--overlap"),
    (["ingest", "{docs}", "-c", "x" * 300], "collection name"),
    (["ingest", "{docs}", "-c", "a\x1b[31mb"], "collection name"),
    (["ingest", "{docs}", "-c", "a\nb"], "collection name"),
    (["ingest", "{docs}", "-c", "a\tb"], "collection name"),
    (["ingest", "{docs}", "-c", "../etc"], "collection name"),
    (["ingest", "{docs}", "-c", "a/b"], "collection name"),
    (["ingest", "{docs}", "-c", ".hidden"], "collection name"),
    (["ingest", "{docs}", "-c", ""], "collection name"),
    (["ingest", "{docs}", "-c", "-x"], "collection name"),
    (["ingest", "{docs}", "-c", "na\u202eme"], "collection name"),
    (["search", "q", "-c", "x" * 300], "collection name"),
    (["search", "q", "-c", "a\x07b"], "collection name"),
    (["ask", "q", "-c", "a/b"], "collection name"),
    (["eval", "{docs}/codes.md", "-c", ".."], ""),
    (["serve", "--port", "1", "-c", "x" * 300], "collection name"),
    (["ingest", "{docs}/nosuch"], "no such file"),
    (["ingest", "{docs}", "--index-memory", "lots"], "size"),
    (["ingest", "{docs}", "--index-memory", "-5MB"], "size"),
    (["search", "q"], "does not exist"),
    (["ask", "q"], "does not exist"),
    (["search", "q", "-c", "other"], "does not exist"),
    (["serve", "--port", "0"], "port"),
    (["serve", "--port", "99999"], "port"),
    (["serve", "--host", "0.0.0.0"], "--api-key"),
    (["serve", "--host", "::"], "--insecure"),
    (["serve", "--max-body", "huge"], "size"),
    (["serve", "--max-embed-chars", "0"], "max_embed_chars"),
    (["serve", "--deadline", "0"], "deadline"),
    (["verify", "{docs}/nosuch"], "not an engine bundle"),
    (["verify", "{docs}/codes.md"], "not an engine bundle"),
    (["verify", "{docs}"], "not an engine bundle"),
    (["eval", "{docs}/nosuch.jsonl"], ""),
]


@pytest.mark.parametrize("args,needle", BAD_VALUES, ids=range(len(BAD_VALUES)))
def test_bad_values_are_one_line(docs, capsys, args, needle):
    args = [a.replace("{docs}", str(docs)) for a in args]
    rc, out, err = run(args, capsys)
    one_line_error(rc, err, needle)
    assert "\x1b" not in err and "\u202e" not in err  # a hostile name is shown escaped


def test_undecodable_argument_bytes_are_one_line(tmp_path):
    code = "import sys; from edge.cli import main; sys.exit(main())"
    for args in ([b"ask", b"caf\xe9?"], [b"search", b"\xff\xfe"], [b"ingest", str(tmp_path).encode(), b"-c", b"n\xffme"]):
        p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, timeout=120,
                           env={**os.environ, "EDGE_RAG_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)})
        err = p.stderr.decode("utf-8", "replace")
        assert p.returncode == 2 and "Traceback" not in err and err.count("\n") == 1 and "UTF-8" in err, err


def test_an_undecodable_file_name_is_skipped_not_a_crash(docs, capsys):
    with open(os.fsencode(str(docs)) + b"/caf\xe9.md", "w") as f:
        f.write(MANUAL)
    rc, out, err = run(["ingest", str(docs), "-q"], capsys)
    assert rc == 0 and "not valid UTF-8" in out, err
    assert _ingested_paths() == ["docs/codes.md"]
    odd = os.fsdecode(os.fsencode(str(docs)) + b"/caf\xe9.md")  # an argument naming it is let through to ingest
    one_line_error(*run(["ingest", odd], capsys)[::2], "UTF-8")


# --------------------------------------------------------------------------- ingest: links, special files, headings

def _ingested_paths(collection: str = "default") -> list[str]:
    from edge.paths import index_dir
    from rag.store import Store

    with Store(index_dir(collection), readonly=True) as s:
        return sorted(r.relpath for r in s.documents().values())


def test_a_symlink_out_of_the_folder_is_refused(docs, tmp_path, capsys):
    # issue 13: `ln -s /etc/passwd docs/p.txt` was indexed and served as a source
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (docs / "p.txt").symlink_to(secret)
    (docs / "etc").symlink_to(tmp_path)  # a folder link out of the tree
    rc, out, err = run(["ingest", str(docs), "-q"], capsys)
    assert rc == 0, err
    assert _ingested_paths() == ["docs/codes.md"]
    assert "p.txt" in out and "symbolic link" in out and "--follow-links" in out
    # even with --follow-links, never outside the folder
    rc, out, err = run(["ingest", str(docs), "-q", "--follow-links"], capsys)
    assert rc == 0 and _ingested_paths() == ["docs/codes.md"], out
    assert "outside" in out
    rc, out, err = run(["search", "root bash", "--mode", "keyword", "--json"], capsys)
    assert json.loads(out)["hits"] == []


def test_a_link_inside_the_folder_needs_follow_links(docs, capsys):
    sub = docs / "sub"
    sub.mkdir()
    (sub / "fan.md").write_text("# Fan\n\nThe fan is replaced yearly.\n")
    (docs / "alias.md").symlink_to(sub / "fan.md")
    (docs / "loop").symlink_to(docs)  # a loop back into the tree
    assert run(["ingest", str(docs), "-q"], capsys)[0] == 0
    assert _ingested_paths() == ["docs/codes.md", "docs/sub/fan.md"]
    rc, out, err = run(["ingest", str(docs), "-q", "--follow-links"], capsys)
    assert rc == 0, err
    assert _ingested_paths() == ["docs/alias.md", "docs/codes.md", "docs/sub/fan.md"]


def test_a_previously_indexed_file_replaced_by_a_link_is_dropped(docs, tmp_path, capsys):
    (docs / "s.md").write_text("# S\n\nThe vault code is 1234.\n")
    assert run(["ingest", str(docs), "-q"], capsys)[0] == 0
    assert _ingested_paths() == ["docs/codes.md", "docs/s.md"]
    secret = tmp_path / "outside.md"
    secret.write_text("# Secret\n\nThe vault code is 9999.\n")
    (docs / "s.md").unlink()
    (docs / "s.md").symlink_to(secret)
    assert run(["ingest", str(docs), "-q", "--follow-links"], capsys)[0] == 0
    assert _ingested_paths() == ["docs/codes.md"]


def test_fifos_devices_and_hard_links_are_refused(docs, tmp_path, capsys):
    os.mkfifo(docs / "pipe.txt")  # reading it would block the ingest forever
    os.link(docs / "codes.md", docs / "hard.md")
    (docs / "other.md").write_text("# Other\n\nPlain text.\n")
    rc, out, err = run(["ingest", str(docs), "-q"], capsys)
    assert rc == 0, err
    assert _ingested_paths() == ["docs/other.md"], "both names of the hard-linked file are refused"
    assert "not a regular file" in out and "hard link" in out
    (docs / "hard.md").unlink()
    assert run(["ingest", str(docs), "-q"], capsys)[0] == 0
    assert _ingested_paths() == ["docs/codes.md", "docs/other.md"]


def test_a_fifo_named_directly_is_refused(docs, capsys):
    os.mkfifo(docs / "pipe.md")
    one_line_error(*run(["ingest", str(docs / "pipe.md")], capsys)[::2], "regular file")


def test_heading_only_documents_are_kept(docs, capsys):
    # issue 13: skipped as "no text"; a file edited down to one heading lost its chunks
    (docs / "stub.md").write_text("# Kestrel AMR-200 docking station\n")
    (docs / "two.rst").write_text("Title\n=====\n\nSub\n---\n")
    rc, out, err = run(["ingest", str(docs), "-q"], capsys)
    assert rc == 0 and "no text" not in out, out
    assert _ingested_paths() == ["docs/codes.md", "docs/stub.md", "docs/two.rst"]
    rc, out, err = run(["search", "docking station", "--mode", "keyword", "--json"], capsys)
    assert json.loads(out)["hits"][0]["source"] == "docs/stub.md"
    (docs / "codes.md").write_text("# Codes\n")  # edited down to its heading
    assert run(["ingest", str(docs), "-q"], capsys)[0] == 0
    assert "docs/codes.md" in _ingested_paths()


def test_escape_sequences_in_documents_do_not_reach_the_terminal(docs, capsys):
    (docs / "evil.md").write_text("# Ev\x1b]0;pwned\x07il\n\nCoolant \x1b[2J\x1b[31mreset\x1b[0m sequence \u202edrow\x9b.\n")
    assert run(["ingest", str(docs), "-q"], capsys)[0] == 0
    rc, out, err = run(["search", "coolant reset sequence", "--mode", "keyword"], capsys)
    assert rc == 0 and "reset" in out
    for bad in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert bad not in out
    rc, out, err = run(["search", "coolant reset sequence", "--mode", "keyword", "--json"], capsys)
    assert "\\u001b" in out  # JSON keeps the stored text, escaped


def test_control_character_file_names_are_shown_escaped(docs, capsys):
    (docs / "bad\x1b[31m.txt").write_bytes(b"\xff\xfe not utf8")
    rc, out, err = run(["ingest", str(docs), "-q"], capsys)
    assert rc == 0 and "\x1b" not in out and "\\x1b" in out


# --------------------------------------------------------------------------- full disk, read-only home

def _stale(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name or ".partial-" in p.name)


class DiskFull:
    """Raise ENOSPC at the n-th write of an ingest: SQLite row writes, the commit, the index
    temp file's write / fsync / rename. `count` says how many writes a clean ingest makes."""

    def __init__(self, monkeypatch, n: int):
        import rag.index as index_mod
        import rag.store as store_mod

        self.n, self.count = n, 0
        full = OSError(errno.ENOSPC, "No space left on device")
        sql_full = sqlite3.OperationalError("database or disk is full")

        def hit(exc):
            self.count += 1
            if self.count == self.n:
                raise exc

        def wrap(obj, name, exc):
            orig = getattr(obj, name)

            def f(*a, **kw):
                hit(exc)
                return orig(*a, **kw)

            monkeypatch.setattr(obj, name, f)

        wrap(store_mod.Store, "add_document", sql_full)
        wrap(store_mod.Store, "delete_document", sql_full)
        wrap(store_mod.Store, "set_meta", sql_full)
        orig_exit = store_mod._Txn.__exit__

        def txn_exit(self_, et, ev, tb):
            if et is None:
                try:
                    hit(sql_full)
                except sqlite3.OperationalError:
                    self_.db.execute("ROLLBACK")
                    raise
            return orig_exit(self_, et, ev, tb)

        monkeypatch.setattr(store_mod._Txn, "__exit__", txn_exit)
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            hit(full)
            return real_fsync(fd)

        def replace(a, b):
            hit(full)
            return real_replace(a, b)

        monkeypatch.setattr(index_mod.os, "fsync", fsync)
        monkeypatch.setattr(index_mod.os, "replace", replace)


def _keyword_hits(q: str) -> list[str]:
    from rag.retrieve import Retriever

    with Retriever(None, "default") as r:
        return [h.chunk.path for h in r.search(q, k=5, mode="keyword").hits]


def _vector_hits(q: str) -> list[str]:
    from rag.retrieve import Retriever

    with Retriever(HashEmbedder(), "default") as r:
        return [h.chunk.path for h in r.search(q, k=5, mode="vector").hits]


def test_disk_full_at_each_write_of_an_ingest(docs, monkeypatch, capsys):
    """ENOSPC at the 1st, 2nd, ... write of an update: a one-line error, no temp file left,
    search (keyword and vector) keeps working, and the next ingest completes."""
    from edge.paths import index_dir
    from rag.ingest import check_collection

    assert run(["ingest", str(docs), "-q"], capsys)[0] == 0
    d = index_dir()
    n = 1
    while True:
        (docs / f"new{n}.md").write_text(f"# New {n}\n\nZebra rule {n}.\n")
        with monkeypatch.context() as m:
            fault = DiskFull(m, n)
            rc, out, err = run(["ingest", str(docs), "-q"], capsys)
        if rc == 0:
            if fault.count < n:  # this ingest made fewer than n writes: every one has been failed once
                break
            n += 1  # a write whose failure is harmless (the folder's fsync after the rename)
            continue
        one_line_error(rc, err, "")
        assert "space" in err or "full" in err, err
        assert "codes.md" in " ".join(_keyword_hits("coolant hose"))  # the previous generation serves
        assert _vector_hits("coolant pressure low hose")
        assert _stale(d) == []
        rc, out, err = run(["search", "zebra", "--mode", "keyword"], capsys)
        assert rc == 0 and "Traceback" not in err
        rc, out, err = run(["ingest", str(docs), "-q"], capsys)  # the next ingest completes
        assert rc == 0, err
        assert check_collection(d) == []
        assert f"docs/new{n}.md" in _keyword_hits(f"zebra rule {n}")
        n += 1
    assert n >= 6, f"only {n - 1} writes were failed"


def test_stale_index_temp_files_are_removed_on_the_next_open(docs, capsys):
    from edge.paths import index_dir

    assert run(["ingest", str(docs), "-q"], capsys)[0] == 0
    d = index_dir()
    dead = 2 ** 22 + 12345  # above pid_max on most systems: no such process
    for pid in (dead, dead + 1):
        (d / f".vectors.faiss.tmp-{pid}").write_bytes(b"half a file")
    rc, out, err = run(["search", "coolant", "--mode", "keyword"], capsys)
    assert rc == 0 and _stale(d) == []
    alive = d / f".vectors.faiss.tmp-{os.getppid()}"  # a writer still running keeps its file
    alive.write_bytes(b"x")
    run(["search", "coolant"], capsys)
    assert alive.exists()


def test_an_index_that_cannot_be_repaired_on_disk_is_served_from_memory(docs, monkeypatch, capsys):
    # issue 13: ENOSPC after the SQLite commit left every later search crashing, even --mode keyword
    import rag.index as index_mod
    from edge.paths import index_dir

    assert run(["ingest", str(docs), "-q"], capsys)[0] == 0
    (docs / "more.md").write_text("# More\n\nWater pump primes slowly.\n")
    with monkeypatch.context() as m:
        m.setattr(index_mod.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        rc, out, err = run(["ingest", str(docs), "-q"], capsys)
        one_line_error(rc, err, "generation 2")
        for mode in ("keyword", "vector", "hybrid"):
            rc, out, err = run(["search", "water pump primes", "--mode", mode], capsys)
            assert rc == 0 and "more.md" in out and "Traceback" not in err, (mode, err)
        assert _stale(index_dir()) == []
    assert run(["ingest", str(docs), "-q"], capsys)[0] == 0


def test_a_read_only_home_is_one_line(docs, tmp_path, monkeypatch, capsys):
    # issue 13: a traceback. Root ignores file modes, so the refusal is injected where the OS gives it.
    ro = OSError(errno.EROFS, "Read-only file system")

    def refuse(self, *a, **kw):
        raise OSError(ro.errno, ro.strerror, str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    monkeypatch.setenv("EDGE_RAG_HOME", str(tmp_path / "ro-home"))
    for args in (["ingest", str(docs)], ["search", "x"]):
        rc, out, err = run(args, capsys)
        one_line_error(rc, err, "read-only")
        assert "EDGE_RAG_HOME" in err


def test_a_read_only_store_is_one_line(docs, monkeypatch, capsys):
    import rag.store as store_mod

    assert run(["ingest", str(docs), "-q"], capsys)[0] == 0
    real = sqlite3.connect

    def ro_connect(path, *a, **kw):
        if "mode=ro" in str(path):
            return real(path, *a, **kw)
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(store_mod.sqlite3, "connect", ro_connect)
    (docs / "n.md").write_text("# N\n\nNew text.\n")
    rc, out, err = run(["ingest", str(docs)], capsys)
    one_line_error(rc, err, "readonly")
    assert run(["search", "coolant", "--mode", "keyword"], capsys)[0] == 0


def test_a_file_size_limit_mid_ingest_is_one_line_and_recoverable(docs, tmp_path):
    """A real short write: RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), as a
    full disk would, in a child process running the real CLI."""
    home = tmp_path / "home"
    code = ("import resource, signal, sys; sys.path[:0] = [{root!r}, {tests!r}]\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "import edge.cli.rag_cmd as cmd; from test_rag_fakes import HashEmbedder; from pathlib import Path\n"
            "cmd._embedder = lambda p, c=None, b='auto': (HashEmbedder(), Path({emb!r}))\n"
            "lim = int(sys.argv[1])\n"
            "if lim: resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))\n"
            "from edge.cli import main; sys.exit(main(sys.argv[2:]))").format(
        root=str(ROOT), tests=str(ROOT / "tests"), emb=str(tmp_path))
    env = {**os.environ, "EDGE_RAG_HOME": str(home)}

    def cli(limit: int, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, str(limit), *args], capture_output=True, text=True,
                              env=env, timeout=120)

    assert cli(0, "ingest", str(docs), "-q").returncode == 0
    for i in range(40):
        (docs / f"big{i}.md").write_text(f"# Big {i}\n\n" + " ".join(f"word{i}x{j}" for j in range(300)) + "\n")
    p = cli(64 * 1024, "ingest", str(docs), "-q")
    assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.startswith("error:"), p.stderr
    assert p.stderr.count("\n") == 1, p.stderr
    p = cli(0, "search", "coolant hose", "--mode", "keyword")
    assert p.returncode == 0 and "codes.md" in p.stdout, p.stderr
    assert cli(0, "ingest", str(docs), "-q").returncode == 0
    p = cli(0, "search", "word7x5", "--mode", "keyword")
    assert p.returncode == 0 and "big7.md" in p.stdout


# --------------------------------------------------------------------------- verify

@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from helpers_tiny import make_tiny_bundle, tiny_hf_model

    return make_tiny_bundle(tmp_path_factory.mktemp("verify") / "gen", tiny_hf_model("llama", seed=3), "int4",
                            forms=("ort",))


def _copy(bundle: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(bundle, dst)
    return dst


def test_verify_accepts_an_intact_bundle(tiny_bundle, capsys):
    rc, out, err = run(["verify", str(tiny_bundle)], capsys)
    assert rc == 0 and out.startswith("ok:") and "artifacts" in out, err
    rc, out, err = run(["verify", str(tiny_bundle), "--json"], capsys)
    assert rc == 0 and json.loads(out)["ok"] is True


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "append", "manifest"])
def test_verify_refuses_a_damaged_bundle(tiny_bundle, tmp_path, capsys, damage):
    b = _copy(tiny_bundle, tmp_path / "b")
    w = b / "weights.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 0x01
        w.write_bytes(bytes(data))
    elif damage == "delete":
        w.unlink()
    elif damage == "append":
        with open(w, "ab") as f:
            f.write(b"\0")
    else:
        (b / "manifest.json").write_text("{not json")
    rc, out, err = run(["verify", str(b)], capsys)
    one_line_error(rc, err, "manifest" if damage == "manifest" else "weights.safetensors")


def test_serve_verifies_what_it_loads(tiny_bundle, tmp_path, monkeypatch, capsys):
    # issue 13: the CPU backend hashed only the graph it loads; altered weights went unnoticed
    b = _copy(tiny_bundle, tmp_path / "b")
    w = b / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01
    w.write_bytes(bytes(data))
    import edge.cli.rag_cmd as cmd

    monkeypatch.setattr(cmd, "_embedder", lambda path, collection=None, backend="auto": (HashEmbedder(), tmp_path))
    rc, out, err = run(["serve", "--port", "18555", "--engine", str(b)], capsys)
    one_line_error(rc, err, "weights.safetensors")


def test_a_killed_builds_partial_folder_is_removed_by_the_next_build(tmp_path):
    from edge.bundle import BundleWriter, Manifest, Quant

    out = tmp_path / "engines" / "gen"
    out.parent.mkdir()
    dead = out.parent / f".gen.partial-{2 ** 22 + 999}"
    dead.mkdir()
    (dead / "weights.safetensors").write_bytes(b"half")
    old = out.parent / f".gen.old-{2 ** 22 + 998}"
    old.mkdir()
    other = out.parent / f".other.partial-{2 ** 22 + 997}"  # another bundle's: not ours to touch
    other.mkdir()
    w = BundleWriter(out, "embedder")
    (w.path("tokenizer.json")).write_text("{}")
    w.commit(Manifest(kind="embedder", model={}, quant=Quant("fp32")))
    assert sorted(p.name for p in out.parent.iterdir()) == [".other.partial-4195301", "gen"]


def test_embedding_batches_are_bounded_by_attention_size():
    from edge.runtime.embedder import MAX_BATCH_CELLS, length_buckets

    lengths = [512] * 40 + [20] * 100
    batches = length_buckets(lengths, 32)
    assert sorted(np.concatenate(batches).tolist()) == list(range(140))
    for b in batches:
        s = max(lengths[i] for i in b)
        assert len(b) * s * s <= MAX_BATCH_CELLS or len(b) == 1
    assert max(len(b) for b in batches) == 32  # short texts still go 32 at a time
