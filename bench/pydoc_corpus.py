"""Render the second answer-quality corpus: `pydoc` text of Python standard-library modules.

    python bench/pydoc_corpus.py [--out examples/pydoc]

Text nobody on the team wrote (the Python documentation strings, PSF license), rendered offline
by the running Python (examples/pydoc was rendered by CPython 3.11.7). The FILE section (a path on
the rendering machine) is dropped so that the corpus is the same on every machine.
examples/pydoc_questions.jsonl asks for facts that sit in one module's text.
"""

from __future__ import annotations

import argparse
import importlib
import pydoc
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
    "base64 bisect calendar colorsys copy csv difflib filecmp fnmatch fractions functools getpass glob "
    "graphlib gzip heapq hmac html json mimetypes netrc pprint queue reprlib sched secrets shlex shutil "
    "statistics string struct tempfile textwrap timeit uuid wave zipfile zlib zoneinfo"
).split()


def render(name: str) -> str:
    text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
    # drop "FILE\n    /path/on/this/machine.py" (and the trailing blank line)
    text = re.sub(r"\nFILE\n(?:    .*\n)+\n?", "\n", text)
    # object addresses ("<function copy2 at 0x7f85...>") differ per process
    return re.sub(r" at 0x[0-9a-f]+>", ">", text).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "examples" / "pydoc"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name in MODULES:
        text = render(name)
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        total += len(text)
    print(f"{len(MODULES)} modules, {total} characters -> {out} (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
