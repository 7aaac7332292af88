"""What this CPU's integer kernels can do exactly, read once from /proc/cpuinfo (or the platform).

ONNX Runtime's u8s8 int8 GEMM (MatMulInteger, DynamicQuantizeMatMul) multiplies uint8
activations by int8 weights. On x86 without VNNI it uses vpmaddubsw, which adds two u8*s8
products into an int16 and saturates: 2 * 255 * 127 = 64770 > 32767. ONNX Runtime's quantization
docs and OpenVINO's "saturation issue" page describe it; VNNI (vpdpbusd) accumulates in int32,
ARM (sdot/udot or widening multiplies) never saturates. Measured on a tiny int4 Llama whose head
is an int8 DynamicQuantizeMatMul (tests/test_onnx_decoder.py): max relative logit error 0.018
on AVX-512 VNNI, 0.276 on an AVX2-only CPU (qemu -cpu Haswell; the same 0.276 as an AVX2-only
AMD EPYC); with the head as an 8-bit MatMulNBits (s8 activations) 0.018 on both.

Build-time choices that depend on this go through `u8s8_exact()`; they are recorded in the
bundle manifest so that a bundle moved to another CPU can be checked (`isa_mismatch`).
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8")


def parse_cpuinfo_flags(text: str) -> set[str]:
    """The x86 'flags' (or ARM 'Features') of the first processor in a /proc/cpuinfo text."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return frozenset(parse_cpuinfo_flags(f.read()))
    except OSError:
        return frozenset()


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "i386")


U8S8_ENV = "EDGE_RAG_U8S8"


def u8s8_exact(flags: set[str] | frozenset[str] | None = None, machine: str | None = None) -> bool:
    """True when ONNX Runtime's u8s8 int8 GEMM cannot saturate here: any non-x86 CPU, or x86
    with VNNI. Override with EDGE_RAG_U8S8=exact|saturates (e.g. to build for another CPU)."""
    forced = os.environ.get(U8S8_ENV, "").strip().lower()
    if forced in ("exact", "saturates"):
        return forced == "exact"
    if not is_x86(machine):
        return True
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in VNNI_FLAGS)


def isa_summary() -> dict:
    """For manifests and `doctor`: the machine and whether u8s8 int8 GEMMs are exact on it."""
    return {"machine": platform.machine(), "vnni": any(f in cpu_flags() for f in VNNI_FLAGS),
            "u8s8_exact": u8s8_exact()}
