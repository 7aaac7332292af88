"""edge-rag's C ABI: include/edge_rag.h and libedgerag.so (edge/capi/edge_rag.c, which embeds
CPython and calls edge.capi.bridge). Build it with `make capi` or `python -m edge.capi.build`.

    cc -I$(python -m edge.capi.build --include-dir) app.c -Lbuild -ledgerag -Wl,-rpath,$PWD/build
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def include_dir() -> Path:
    """The folder holding edge_rag.h (shipped in the package, like numpy.get_include())."""
    return HERE / "include"


def source() -> Path:
    """libedgerag.so's C source."""
    return HERE / "edge_rag.c"
