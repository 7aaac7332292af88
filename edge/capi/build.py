"""Compile libedgerag.so with the system C compiler against this interpreter's libpython.

    python -m edge.capi.build [--out build] [--examples] [--sanitize address] [--include-dir]

One definition of the flags, used by `make capi`, the tests and a Jetson with an installed wheel
(the header and the C source ship in the package). The library records this interpreter
(sys.executable, unresolved, so a virtualenv's site-packages apply) as its default Python;
$EDGE_RAG_PYTHON overrides it at run time.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from edge.capi import include_dir, source
from edge.errors import BackendError, UsageError

LIB_NAME = "libedgerag.so"


def compiler(cxx: bool = False) -> str:
    """$CC / $CXX, else the system cc / c++."""
    env = os.environ.get("CXX" if cxx else "CC")
    for cand in ([env] if env else []) + (["c++", "g++", "clang++"] if cxx else ["cc", "gcc", "clang"]):
        if shutil.which(cand.split()[0]):
            return cand
    raise BackendError(f"no {'C++' if cxx else 'C'} compiler found", fix="install gcc (apt-get install build-essential)")


def python_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) to embed this interpreter (what `python3-config --embed` gives)."""
    inc = sysconfig.get_paths()["include"]
    libdir = sysconfig.get_config_var("LIBDIR")
    ver = sysconfig.get_config_var("LDVERSION") or sysconfig.get_config_var("VERSION")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") and not Path(libdir, f"libpython{ver}.so").exists():
        raise BackendError(f"this Python ({sys.executable}) has no shared libpython to embed",
                           fix="use a Python built with --enable-shared (Debian's python3-dev, pyenv with "
                               "PYTHON_CONFIGURE_OPTS=--enable-shared)")
    libs = shlex.split(sysconfig.get_config_var("LIBS") or "") + shlex.split(sysconfig.get_config_var("SYSLIBS") or "")
    return [f"-I{inc}"], [f"-L{libdir}", f"-Wl,-rpath,{libdir}", f"-lpython{ver}", *libs]


def sanitize_flags(sanitize: str | None) -> list[str]:
    if not sanitize:
        return []
    if sanitize not in ("address", "thread", "undefined"):
        raise UsageError(f"unknown sanitizer {sanitize!r}", fix="use address, thread or undefined")
    return [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]


def build_library(out_dir: str | Path, *, sanitize: str | None = None, python: str | None = None) -> Path:
    """Compile edge_rag.c into out_dir/libedgerag.so and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cflags, ldflags = python_flags()
    lib = out_dir / LIB_NAME
    default_python = python or sys.executable
    cmd = [*shlex.split(compiler()), "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration",
           "-fvisibility=hidden", "-pthread", f"-I{include_dir()}", *cflags, f'-DER_DEFAULT_PYTHON="{default_python}"',
           *sanitize_flags(sanitize), str(source()), "-o", str(lib), *ldflags]
    run(cmd)
    return lib


def build_program(src: str | Path, out: str | Path, lib: str | Path, *, sanitize: str | None = None,
                  extra: list[str] | None = None) -> Path:
    """Compile a C (.c) or C++ (.cpp) program against the header and link it to `lib` (rpath set)."""
    src, lib = Path(src), Path(lib).resolve()
    cxx = src.suffix in (".cpp", ".cc", ".cxx")
    std = "-std=c++17" if cxx else "-std=c11"
    cmd = [*shlex.split(compiler(cxx)), std, "-O2", "-Wall", "-Wextra", "-pthread", f"-I{include_dir()}",
           *sanitize_flags(sanitize), str(src), "-o", str(out), f"-L{lib.parent}", "-ledgerag",
           f"-Wl,-rpath,{lib.parent}", *(extra or [])]
    run(cmd)
    return Path(out)


def run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise BackendError(f"compiling failed: {shlex.join(cmd)}\n{p.stderr.strip()}")
    if p.stderr.strip():  # warnings: shown, never silent
        print(p.stderr.strip(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge.capi.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build", help="output folder (default: build)")
    ap.add_argument("--sanitize", default=None, help="address | thread | undefined")
    ap.add_argument("--examples", action="store_true",
                    help="also build examples/c/ask.c and examples/cpp/robot_node.cpp (from a source checkout) into --out")
    ap.add_argument("--include-dir", action="store_true", help="print the folder holding edge_rag.h and exit")
    a = ap.parse_args(argv)
    if a.include_dir:
        print(include_dir())
        return 0
    try:
        lib = build_library(a.out, sanitize=a.sanitize)
        print(lib)
        if a.examples:
            examples = Path(__file__).resolve().parents[2] / "examples"
            for src in (examples / "c" / "ask.c", examples / "cpp" / "robot_node.cpp"):
                if not src.exists():
                    raise UsageError(f"{src} not found", fix="--examples needs a source checkout of edge-rag")
                print(build_program(src, Path(a.out) / src.stem, lib, sanitize=a.sanitize))
    except (BackendError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
