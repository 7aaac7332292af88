"""edge.cpu: which CPUs saturate ONNX Runtime's u8s8 int8 GEMM (the int8 LM head's kernel choice)."""

from __future__ import annotations

import pytest

from edge.cpu import parse_cpuinfo_flags, u8s8_exact

AVX2_EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 ssse3 fma avx avx2 bmi2 sha_ni\n\nprocessor\t: 1\n"
VNNI_XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512vl avx512_vnni\n"
ALDER_LAKE = "flags\t\t: avx avx2 avx_vnni\n"
ORIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp\n"


def test_flags_are_read_from_the_first_processor():
    assert "avx2" in parse_cpuinfo_flags(AVX2_EPYC) and "avx512_vnni" not in parse_cpuinfo_flags(AVX2_EPYC)
    assert "asimddp" in parse_cpuinfo_flags(ORIN)
    assert parse_cpuinfo_flags("nothing here") == set()


@pytest.mark.parametrize("text,machine,exact", [
    (AVX2_EPYC, "x86_64", False),  # vpmaddubsw: two u8*s8 products summed in int16 saturate
    (VNNI_XEON, "x86_64", True),
    (ALDER_LAKE, "x86_64", True),
    (ORIN, "aarch64", True),  # ARM int8 dot products accumulate in int32
])
def test_u8s8_exact_per_isa(text, machine, exact, monkeypatch):
    monkeypatch.delenv("EDGE_RAG_U8S8", raising=False)
    assert u8s8_exact(parse_cpuinfo_flags(text), machine) is exact


def test_the_choice_can_be_forced_for_another_cpu(monkeypatch):
    monkeypatch.setenv("EDGE_RAG_U8S8", "saturates")
    assert u8s8_exact(parse_cpuinfo_flags(VNNI_XEON), "x86_64") is False
    monkeypatch.setenv("EDGE_RAG_U8S8", "exact")
    assert u8s8_exact(parse_cpuinfo_flags(AVX2_EPYC), "x86_64") is True
