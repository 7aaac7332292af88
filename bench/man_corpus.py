"""Render the third answer-quality corpus: Debian manual pages nobody on the team wrote, held out.

    python bench/man_corpus.py [--out DIR] [--force]   (default DIR: $EDGE_RAG_HOME/bench/man-corpus)

A fixed list of common pages of sections 5, 7 and 8 (user accounts, name lookup, APT sources,
the file system layout, swap, the dynamic linker) that every Debian or Ubuntu machine installs,
none of them asked about by bench/scale_questions.jsonl. Each is rendered offline by
bench/scale_corpus.py's `render_man` (80 columns, no hyphenation, fixed locale) to
`<name>.<section>.txt`; `corpus.json` records the page list and a sha256 per file.
examples/man_questions_heldout.jsonl asks for facts that sit in one page; it was written before
anybody measured answers on it and is never used to choose a recipe (bench/bench_answers.py
`--corpus man --split heldout`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rendered_corpus import ensure, files_intact, write_meta  # noqa: E402
from bench.rendered_corpus import main as corpus_main  # noqa: E402
from bench.scale_corpus import MAN_ROOT, man_name, render_man  # noqa: E402

PAGES = (
    "adduser.conf.5", "deluser.conf.5", "hostname.5", "hosts.5", "nsswitch.conf.5", "os-release.5",
    "passwd.5", "services.5", "shadow.5", "sources.list.5", "sysctl.d.5",
    "environ.7", "glob.7", "hier.7",
    "ldconfig.8", "swapon.8", "useradd.8",
)
# the digest of corpus.json's sha256 map where the questions were written (Debian 12.11: man-db 2.11.2,
# groff 1.22.4, manpages 6.03, passwd 4.13, adduser 3.134, apt 2.6.1, systemd 252, util-linux 2.38.1);
# another value means other page versions, against which the held-out keywords were not checked
REFERENCE_DIGEST = "b6dda44d4c3c7dad"


def man_corpus_dir() -> Path:
    """Where bench/bench_answers.py keeps the rendered pages: under the state root, so that one
    rendering serves every run of the same home."""
    from edge.paths import home

    return home() / "bench" / "man-corpus"


def page_file(page: str) -> Path | None:
    """The installed source of `page` ("passwd.5"), or None."""
    section = page.rsplit(".", 1)[1]
    for p in (MAN_ROOT / f"man{section}" / f"{page}.gz", MAN_ROOT / f"man{section}" / page):
        if p.is_file():
            return p
    return None


def rendered_name(page: str) -> str:
    """The corpus file of `page`: "passwd.5" -> "passwd.5.txt" (scale_corpus's naming)."""
    return man_name(Path(page))


def render(out: Path) -> dict:
    """Render every page of PAGES into `out` (which must exist) and write corpus.json; returns its
    content. Raises EdgeRagError naming what is missing."""
    from edge.errors import EdgeRagError

    if shutil.which("man") is None:
        raise EdgeRagError("man corpus: the `man` command is not installed", fix="apt-get install man-db")
    missing = [p for p in PAGES if page_file(p) is None]
    if missing:
        raise EdgeRagError(f"man corpus: pages not installed under {MAN_ROOT}: {', '.join(missing)}",
                           fix="install their packages (manpages, passwd, adduser, apt, systemd, util-linux) "
                               "and keep /usr/share/man (a minimized image drops it: see `unminimize`)")
    texts = {}
    failed = []
    for page in PAGES:
        text = render_man(page_file(page))
        if not text:
            failed.append(page)
            continue
        texts[rendered_name(page)] = text
    if failed:
        raise EdgeRagError(f"man corpus: `man` could not render {', '.join(failed)}",
                           fix="run `man -l` on them to see why")
    meta = write_meta(out, texts, pages=list(PAGES))
    return meta


def intact(folder: Path) -> bool:
    """A rendering of today's PAGES whose files are what corpus.json says they are."""
    return files_intact(folder, "pages", list(PAGES), [rendered_name(p) for p in PAGES])


def ensure_man_corpus(out_dir: Path | None = None, force: bool = False) -> Path:
    """The rendered corpus folder (default man_corpus_dir()), rendered once and kept while it is
    intact for today's page list (bench/rendered_corpus.ensure). Pages that render other than the
    reference (other page versions) are said on stderr."""
    out = Path(out_dir) if out_dir is not None else man_corpus_dir()
    return ensure(out, force, lambda d: render(d), intact, REFERENCE_DIGEST, "man_corpus")


def main() -> None:
    corpus_main(__doc__, "man_corpus", "$EDGE_RAG_HOME/bench/man-corpus", ensure_man_corpus, REFERENCE_DIGEST)


if __name__ == "__main__":
    main()
