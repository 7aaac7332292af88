"""Build the retrieval-at-scale corpus: real technical documents nobody on the team wrote.

    python bench/scale_corpus.py [--out /tmp/scale-corpus]

Two sources, both on every Debian machine with Python, rendered to plain text offline:

    pydoc/<module>.txt   `pydoc` text of every public standard-library module and submodule
                         (tests, IDLE, tkinter, lib2to3, private `_x` modules and modules that act
                         on import are left out), rendered by the running Python
    man/<page>.<s>.txt   the English manual pages of sections 5 (file formats), 7 (overviews) and
                         8 (administration) installed under /usr/share/man, rendered by `man` at
                         80 columns without hyphenation or justification; pages that only point
                         at another page (`.so`) and symbolic links are left out (duplicates)

Deterministic for one machine image: names are sorted, object addresses and the FILE section
(paths of this machine) are dropped, and `MANWIDTH`/`LANG` are fixed. `corpus.json` in the output
records the Python version, the page and module counts and a sha256 of every file, so that two
builds can be compared (`--check`). bench/scale_questions.jsonl asks for facts in single documents.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import json
import os
import pkgutil
import pydoc
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
MAN_SECTIONS = ("5", "7", "8")
# packages whose import has side effects, needs a display, or that are test suites / tools
SKIP_TOP = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "antigravity", "this",
            "turtle", "site", "pydoc_data", "venv", "xxlimited", "xxsubtype", "xxlimited_35"}
MIN_CHARS = 400  # a module with no docs at all ("NAME x DATA ...") says nothing worth retrieving
MAX_CHARS = 200_000  # a few modules (typing, tkinter's) would be a tenth of the corpus alone


def stdlib_modules() -> list[str]:
    std = sysconfig.get_paths()["stdlib"]
    names = set()

    def walk(path, prefix):
        for m in pkgutil.iter_modules(path, prefix):
            parts = m.name.split(".")
            if parts[0] in SKIP_TOP or any(p.startswith("_") for p in parts) or "test" in parts or "tests" in parts:
                continue
            names.add(m.name)
            if m.ispkg:
                try:
                    pkg = importlib.import_module(m.name)
                except Exception:
                    continue
                walk(getattr(pkg, "__path__", []), m.name + ".")

    walk([std, os.path.join(std, "lib-dynload")], "")
    for b in sys.builtin_module_names:  # sys, math, time, ... live in the interpreter
        if not b.startswith("_") and b not in SKIP_TOP:
            names.add(b)
    return sorted(names)


def render_pydoc(name: str) -> str | None:
    try:
        text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
    except BaseException:  # noqa: BLE001 - a module that cannot be imported here is skipped
        return None
    text = re.sub(r"\nFILE\n(?:    .*\n)+\n?", "\n", text)
    text = re.sub(r" at 0x[0-9a-f]+>", ">", text)
    text = re.sub(r"\nMODULE REFERENCE\n(?:    .*\n|\n)+?(?=\n[A-Z])", "\n", text)  # docs.python.org URL block
    return text.rstrip() + "\n"


def man_pages() -> list[Path]:
    out = []
    for s in MAN_SECTIONS:
        d = MAN_ROOT / f"man{s}"
        for p in sorted(d.iterdir()) if d.is_dir() else []:
            if p.is_symlink() or not p.is_file():
                continue
            opener = gzip.open if p.suffix == ".gz" else open
            try:
                with opener(p, "rt", encoding="utf-8", errors="replace") as f:
                    head = f.read(400)
            except OSError:
                continue
            if re.match(r"^(?:\.\\\".*\n)*\.so\s", head):
                continue
            out.append(p)
    return out


def render_man(p: Path) -> str | None:
    env = dict(os.environ, MANWIDTH="80", LANG="C.UTF-8", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="")
    try:
        r = subprocess.run(["man", "--nj", "--nh", "-l", str(p)], capture_output=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        return None
    text = r.stdout.decode("utf-8", errors="replace")
    text = re.sub(r".\x08", "", text)  # overstrike bold/underline
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return text.strip() + "\n"


def man_name(p: Path) -> str:
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) + ".txt"


def build(out: Path, jobs: int = 2) -> dict:
    (out / "pydoc").mkdir(parents=True, exist_ok=True)
    (out / "man").mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    skipped = {"pydoc": [], "man": []}
    for name in stdlib_modules():
        text = render_pydoc(name)
        if text is None or len(text) < MIN_CHARS:
            skipped["pydoc"].append(name)
            continue
        rel = f"pydoc/{name}.txt"
        files[rel] = text[:MAX_CHARS]
    pages = man_pages()
    with ThreadPoolExecutor(jobs) as ex:
        for p, text in zip(pages, ex.map(render_man, pages)):
            if text is None or len(text) < MIN_CHARS:
                skipped["man"].append(p.name)
                continue
            rel = f"man/{man_name(p)}"
            files[rel] = text[:MAX_CHARS]
    for rel, text in files.items():
        (out / rel).write_text(text, encoding="utf-8")
    meta = {"python": sys.version.split()[0], "documents": len(files),
            "pydoc": sum(r.startswith("pydoc/") for r in files), "man": sum(r.startswith("man/") for r in files),
            "characters": sum(map(len, files.values())), "skipped": skipped,
            "sha256": {rel: hashlib.sha256(t.encode()).hexdigest() for rel, t in sorted(files.items())}}
    (out / "corpus.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/scale-corpus")
    ap.add_argument("--jobs", type=int, default=2, help="man pages rendered at once")
    args = ap.parse_args()
    out = Path(args.out)
    meta = build(out, args.jobs)
    digest = hashlib.sha256(json.dumps(meta["sha256"], sort_keys=True).encode()).hexdigest()[:16]
    print(json.dumps({"figure": "scale_corpus", "out": str(out), "documents": meta["documents"],
                      "pydoc": meta["pydoc"], "man": meta["man"], "characters": meta["characters"],
                      "python": meta["python"], "digest": digest}))


if __name__ == "__main__":
    main()
