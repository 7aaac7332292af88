"""Compiling the native CPU step (csrc/native.c) with the system C compiler at first use.

    lib = load()            # ctypes.CDLL, built once per (source, flags, compiler, CPU) and cached

The shared object lives under $EDGE_RAG_HOME/native/<hash>.so, the hash covering the source, the
flags, the compiler's version line and the CPU's flags, so a changed source, compiler or machine
builds a new one. -march=native picks the ISA paths this CPU has (AVX-512 VNNI, AVX2; the scalar
path always exists); -ffp-contract=off keeps every path's float operations the same (no FMA
contraction), which is what makes their outputs bitwise equal (see native.c).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from edge.errors import BackendError
from edge.textsafe import say

SOURCE = Path(__file__).parent / "csrc" / "native.c"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-pthread", "-fPIC", "-shared", "-std=gnu11")


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise BackendError("the native CPU backend needs a C compiler (cc) to build its kernels on first use",
                           fix="install one (Debian/Ubuntu: apt-get install gcc; Jetson: it ships with JetPack) or use --backend onnxruntime")
    return cc


def _cpu_tag() -> str:
    from edge.cpu import cpu_flags

    return " ".join(sorted(cpu_flags()))


def build(extra_flags: tuple[str, ...] = (), out_dir: Path | None = None, source: Path = SOURCE) -> Path:
    """Path of the shared object for this source + flags + compiler + CPU (compiled if absent); `source`: native.c,
    or the native encoder's encoder.c."""
    from edge.paths import home

    cc = compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise BackendError(f"the C compiler {cc} does not run ({e})", fix="install gcc, or set CC to a working compiler") from None
    # EDGE_RAG_NATIVE_CFLAGS: extra flags for experiments (e.g. -DYIELD_NS=0 -DPRIV_ROWS=0; see native.c)
    flags = FLAGS + tuple(extra_flags) + tuple(os.environ.get("EDGE_RAG_NATIVE_CFLAGS", "").split())
    h = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(flags).encode(), "".join(version).encode(), _cpu_tag().encode()):
        h.update(part)
        h.update(b"\0")
    folder = out_dir or home() / "native"
    folder.mkdir(parents=True, exist_ok=True)
    so = folder / f"{source.stem}-{h.hexdigest()[:16]}.so"
    if so.exists():
        return so
    say(f"compiling the native CPU kernels ({source.name}) for this CPU (once; cached in {folder})")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    r = subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        first = (r.stderr.strip().splitlines() or ["(no output)"])[0]
        raise BackendError(f"compiling the native CPU kernels failed: {first}",
                           fix="check that `cc` works (Debian/Ubuntu: apt-get install gcc), or use --backend onnxruntime")
    os.replace(tmp, so)  # atomic: a concurrent builder sees the whole file or none
    return so


# EDGE_RAG_NATIVE_ISA: run another x86 CPU's kernel path on this one (a reviewer's AVX2-only EPYC on an
# AVX-512 Xeon). avx2 and scalar compile the whole step for that CPU (attention and norms included: the
# code such a CPU runs); avx512 and vnni pick the zmm tile of the -march=native build (er_set_isa).
# avxvnni compiles an AVX-VNNI CPU's build of native.c and encoder.c (Alder Lake: their ymm code, its dots by
# vpdpbusd; avxvnni_build), on a CPU with AVX-512 VNNI instead the same code with the EVEX instruction (a stand-in);
# its er_set_isa code is avx2's (TILE_CODE): the same ymm tile.
ISA_ENV = "EDGE_RAG_NATIVE_ISA"
ISA_BUILDS = {"avx2": ("-march=haswell", "-mtune=generic"),  # AVX2 + FMA + F16C, no AVX-512 (Haswell, AMD Zen 1-3)
              "scalar": ("-march=x86-64", "-mtune=generic")}  # the portable C everywhere (what an ARM build runs)
ISA_NEEDS = {"avx2": ("avx2", "fma", "f16c"), "avx512": ("avx512bw",), "vnni": ("avx512bw", "avx512_vnni")}
TILE_CODE = {"avxvnni": "avx2"}  # a path beyond abi.ISA_NAMES -> the er_set_isa path whose tile it is


def avxvnni_build(flags) -> tuple[str, ...]:
    """cc flags of the avxvnni path (native.c and encoder.c alike): an Alder Lake's own build where the CPU has
    AVX-VNNI, else the EVEX stand-in (AVXVNNI_EVEX in both files; -mprefer-vector-width=256 keeps the compiler's own
    loops on ymm)."""
    if "avx_vnni" in flags:
        return ("-march=alderlake", "-mtune=generic")
    return ("-march=haswell", "-mtune=generic", "-mavx512vl", "-mavx512vnni", "-mprefer-vector-width=256",
            "-DAVXVNNI_EVEX")


def tile_name(lib, code: int) -> str:
    """The name of native.c's er_set_isa path `code` in `lib`: its avx2 tile is "avxvnni" where it takes its dots by
    vpdpbusd (an AVX-VNNI build)."""
    from edge.runtime.cpu.abi import ISA_NAMES

    name = ISA_NAMES[code]
    return "avxvnni" if name == "avx2" and lib.er_ymm_vnni() else name


def avxvnni_needs(flags) -> tuple[str, ...]:
    """What the avxvnni path needs of a CPU: AVX-VNNI (Alder Lake and later client cores), or for its stand-in AVX-512
    VNNI with 256-bit vectors (the same ymm instruction, EVEX-encoded: a CPU without AVX-VNNI can time it)."""
    vnni = ("avx_vnni",) if "avx_vnni" in flags else ("avx512_vnni", "avx512vl")
    return ISA_NEEDS["avx2"] + vnni


def kernel_path(encoder: bool = False) -> str:
    """The kernel path a -march=native build takes on this CPU, from its flags (nothing compiled: `edge-rag doctor`):
    vnni, avx512, avxvnni, avx2, neon (the sentence encoder's alone) or scalar; $EDGE_RAG_NATIVE_ISA where set."""
    from edge.cpu import cpu_flags, is_x86

    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if forced:
        return forced
    f = cpu_flags()
    if not is_x86():
        return "neon" if encoder and "asimddp" in f else "scalar"
    if "avx512bw" in f:
        return "vnni" if "avx512_vnni" in f else "avx512"
    if all(x in f for x in ISA_NEEDS["avx2"]):
        return "avxvnni" if "avx_vnni" in f else "avx2"
    return "scalar"


def forced_isa() -> tuple[str | None, tuple[str, ...]]:
    """($EDGE_RAG_NATIVE_ISA or None, the extra cc flags it needs: native.c's, and encoder.c's but for avx512's, see
    edge.runtime.cpu.encoder.load_lib); a value this CPU cannot run is a one-line error."""
    from edge.cpu import cpu_flags, is_x86
    from edge.errors import UsageError
    from edge.runtime.cpu.abi import ISA_NAMES

    isa = os.environ.get(ISA_ENV, "").strip().lower() or None
    if isa is None:
        return None, ()
    names = ISA_NAMES + tuple(TILE_CODE)
    if isa not in names:
        raise UsageError(f"{ISA_ENV}={isa} is not a native kernel path", fix=f"use one of {', '.join(names)}, or unset it")
    x86 = is_x86()
    flags = cpu_flags()
    needs = avxvnni_needs(flags) if isa == "avxvnni" else ISA_NEEDS.get(isa, ())
    missing = [f for f in needs if f not in flags]
    if isa == "avxvnni" and any(f.startswith("avx512") for f in missing):  # neither AVX-VNNI nor the stand-in's flags
        missing = [f for f in ISA_NEEDS["avx2"] if f not in flags] + ["avx_vnni (or avx512_vnni + avx512vl: its stand-in)"]
    if isa != "scalar" and (not x86 or missing):
        raise BackendError(f"{ISA_ENV}={isa}: this CPU cannot run it (no {', '.join(missing) or 'x86'})", fix=f"unset {ISA_ENV}")
    if isa == "avxvnni":
        return isa, avxvnni_build(flags)
    return isa, ISA_BUILDS.get(isa, ()) if x86 else ()


@lru_cache(maxsize=4)
def load(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled library with its functions' signatures set."""
    lib = ctypes.CDLL(str(build(extra_flags)))
    from edge.runtime.cpu import abi

    abi.declare(lib)
    return lib
