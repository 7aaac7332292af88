"""Render the fourth answer-quality corpus: the GNU manuals of Debian's essential tools, held out.

    python bench/info_corpus.py [--out DIR] [--force]   (default DIR: $EDGE_RAG_HOME/bench/info-corpus)

The Texinfo manuals that every Debian or Ubuntu machine installs with its essential packages
(coreutils, findutils, grep, sed, gzip, diffutils), read from /usr/share/info without the `info`
program: one document per manual node (`coreutils.info`'s "ls invocation" ->
`coreutils--ls-invocation.txt`), titled with its manual and node, its menu and index nodes left out.
About 600 documents written by people outside the team, in the prose of a reference manual rather
than a man page. `corpus.json` records the manuals, a sha256 per file and their digest.
examples/info_questions_heldout.jsonl asks for facts that sit in one node; it was written blind
(by someone who had not seen any answer on it) before any answer was measured on it, and is never
used to choose a recipe (bench/bench_answers.py `--corpus info --split heldout`).
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rendered_corpus import CORPUS_JSON, ensure, files_intact, write_meta  # noqa: E402
from bench.rendered_corpus import main as corpus_main  # noqa: E402

INFO_ROOT = Path("/usr/share/info")
# manual -> its Debian package (all Essential: yes)
MANUALS = {"coreutils": "coreutils", "find": "findutils", "grep": "grep", "sed": "sed", "gzip": "gzip",
           "diffutils": "diffutils"}
# the digest of corpus.json's sha256 map where the questions were written (Debian 12: coreutils 9.1,
# findutils 4.9.0, grep 3.8, sed 4.9, gzip 1.12, diffutils 3.8); another value means other manual versions
REFERENCE_DIGEST = "162b2ece798a0f76"
MIN_CHARS = 200  # a node shorter than this is a heading with a menu: nothing to ask about
_HEADER = re.compile(r"^File: [^,]+,\s+Node: ([^,\n]+)")
_SKIP_NODE = re.compile(r"(^|\s)(index|Index)$|^Top$|^Concept Index|^Index")


def info_corpus_dir() -> Path:
    """Where bench/bench_answers.py keeps the rendering: under the state root."""
    from edge.paths import home

    return home() / "bench" / "info-corpus"


def manual_files(manual: str, root: Path | None = None) -> list[Path]:
    """The installed files of `manual`: `find.info.gz` is an indirect table whose nodes sit in
    `find.info-1.gz`, `find.info-2.gz`; the table itself holds none, so it is read too, harmlessly."""
    root = INFO_ROOT if root is None else root
    parts = sorted(root.glob(f"{manual}.info-*.gz"), key=lambda p: int(re.sub(r"\D", "", p.name.split("-")[-1]) or 0))
    main = [p for p in (root / f"{manual}.info.gz", root / f"{manual}.info") if p.is_file()][:1]
    return main + parts


def node_slug(node: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", node.lower()).strip("-") or "node"


def split_nodes(text: str) -> list[tuple[str, str]]:
    """(node name, body) for each node of an Info file's text: nodes are separated by the 0x1f byte
    and open with a `File: ..., Node: NAME, Next: ...` line; the tag table and indirect table are no
    nodes. The body loses its menu (from `* Menu:` to the end of the node): a list of links."""
    out = []
    for part in text.split("\x1f"):
        part = part.lstrip("\n")
        m = _HEADER.match(part)
        if not m:
            continue
        body = part.split("\n", 1)[1] if "\n" in part else ""
        body = body.split("\n* Menu:", 1)[0]
        out.append((m.group(1).strip(), body.strip() + "\n"))
    return out


def render(out: Path, root: Path | None = None) -> dict:
    """Render every node of MANUALS into `out` (which must exist) and write corpus.json; returns its
    content. Raises EdgeRagError naming what is missing."""
    from edge.errors import EdgeRagError

    root = INFO_ROOT if root is None else root
    missing = [m for m in MANUALS if not manual_files(m, root)]
    if missing:
        raise EdgeRagError(f"info corpus: manuals not installed under {root}: {', '.join(missing)}",
                           fix=f"install their packages ({', '.join(MANUALS[m] for m in missing)}) and keep "
                               "/usr/share/info (a minimized image drops it: see `unminimize`)")
    texts = {}
    for manual in MANUALS:
        raw = "".join(gzip.open(p, "rt", encoding="utf-8", errors="replace").read() if p.suffix == ".gz"
                      else p.read_text(encoding="utf-8", errors="replace") for p in manual_files(manual, root))
        for node, body in split_nodes(raw):
            if _SKIP_NODE.search(node) or len(body) < MIN_CHARS:
                continue
            name = f"{manual}--{node_slug(node)}.txt"
            while name in texts:  # two nodes whose names differ only in punctuation
                name = name[:-4] + "-2.txt"
            texts[name] = f"{manual} manual: {node}\n\n{body}"
    if not texts:
        raise EdgeRagError(f"info corpus: no node found in the manuals under {root}",
                           fix="check that the files are Info files (`zcat coreutils.info.gz | head`)")
    return write_meta(out, texts, manuals=list(MANUALS))


def intact(folder: Path) -> bool:
    """A rendering of today's MANUALS whose files are what corpus.json says they are."""
    try:
        names = list(json.loads((folder / CORPUS_JSON).read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return files_intact(folder, "manuals", list(MANUALS), names)


def ensure_info_corpus(out_dir: Path | None = None, force: bool = False) -> Path:
    """The rendered corpus folder (default info_corpus_dir()), rendered once and kept while intact
    (bench/rendered_corpus.ensure); manuals that render other than the reference are said on stderr."""
    out = Path(out_dir) if out_dir is not None else info_corpus_dir()
    return ensure(out, force, lambda d: render(d), intact, REFERENCE_DIGEST, "info_corpus")


def main() -> None:
    corpus_main(__doc__, "info_corpus", "$EDGE_RAG_HOME/bench/info-corpus", ensure_info_corpus, REFERENCE_DIGEST)


if __name__ == "__main__":
    main()
