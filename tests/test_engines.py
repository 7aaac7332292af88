"""edge.engines: the default generator chosen per profile, and what a first-use build says."""

from __future__ import annotations

import pytest

import edge.engines as engines
from edge.errors import ModelError
from edge.models.spec import ModelSpec

# Qwen2.5-Coder-0.5B-Instruct's shape (from its GGUF), SmolLM2-135M's
QWEN05 = ModelSpec("qwen2", 24, 896, 4864, 14, 2, 64, 151936, 32768, tie_embeddings=True, attention_bias=True)
SMOL = ModelSpec("llama", 30, 576, 1536, 9, 3, 64, 49152, 8192, tie_embeddings=True)
QWEN15 = ModelSpec("qwen2", 28, 1536, 8960, 12, 2, 128, 151936, 32768, tie_embeddings=True, attention_bias=True)


@pytest.fixture
def models(monkeypatch, tmp_path):
    """Both candidates 'installed' (specs only); `installed` lists which resolve."""
    monkeypatch.setenv("EDGE_RAG_HOME", str(tmp_path))
    installed = {"qwen2.5-coder-0.5b-instruct-q4_k_m", "default"}
    import edge.models.defaults as defaults
    import edge.models.pypi_models as pypi_models
    import edge.models.spec as spec_mod

    def resolve(model):
        if str(model) not in installed:
            raise ModelError(f"{model} not installed")
        return tmp_path / f"{model}.gguf"

    def parts(m):
        if m.name not in installed:
            raise ModelError(f"{m.name} parts not installed")
        return []

    monkeypatch.setattr(defaults, "resolve_model", resolve)
    monkeypatch.setattr(pypi_models, "part_files", parts)
    monkeypatch.setattr(spec_mod, "read_spec", lambda p: QWEN15 if "1.5b" in str(p) else QWEN05 if "qwen" in str(p) else SMOL)
    return installed


def test_the_answer_model_is_qwen_where_it_fits(models, capsys):
    for profile in ("cpu", "orin-nano-4gb", "orin-nano-8gb", "agx-orin-64gb"):
        assert engines.choose_generator(profile) is engines.QWEN05, profile
    # the join of the part packages is announced on stderr (it copies ~0.5 GB)
    assert "joining the installed part packages" in capsys.readouterr().err


def test_the_1_5b_where_it_is_installed_fits_and_decodes_fast_enough(models, capsys):
    models.add("qwen2.5-coder-1.5b-instruct-q4_k_m")
    # Orin NX / AGX / Nano 8 GB: it fits and the bandwidth bounds its decode at 44-133 tok/s; the cpu
    # profile at ~16 tok/s, above MIN_DECODE_TOK_S
    for profile in ("cpu", "orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb"):
        assert engines.choose_generator(profile) is engines.QWEN15, profile
    # on a 4 GB Nano the int8 form does not fit: the same model in int4 g32 (bounded at 35 tok/s), by plain rounding
    assert engines.choose_generator("orin-nano-4gb") is engines.QWEN15_INT4
    assert engines.QWEN15_INT4.rtn and engines.QWEN15_INT4.group_size == 32


def test_a_model_whose_decode_is_bounded_below_min_decode_tok_s_is_passed_over(models):
    """The same CPU with a third of the memory bandwidth (8 GB/s, one DDR4 channel): the planner bounds the
    1.5B at ~5 tok/s in int8 and ~8 in int4, under MIN_DECODE_TOK_S; the 0.5B (~16) is chosen."""
    import dataclasses

    from edge.profiles import load_profile

    models.add("qwen2.5-coder-1.5b-instruct-q4_k_m")
    cpu = load_profile("cpu")
    slow = dataclasses.replace(cpu, power_modes=tuple(dataclasses.replace(m, bandwidth_gbps=8.0) for m in cpu.power_modes))
    assert engines.choose_generator(slow) is engines.QWEN05
    assert engines.choose_generator(cpu) is engines.QWEN15


def test_the_1_5b_int4_first_use_build_is_plain_rounding(models, monkeypatch):
    import edge.build.generator as gen

    models.add("qwen2.5-coder-1.5b-instruct-q4_k_m")
    built = []
    monkeypatch.setattr(gen, "build_generator_bundle", lambda model, out, **kw: built.append((model, kw)))
    out = engines.default_generator_bundle(progress=False, profile="orin-nano-4gb")
    assert out.name == "qwen2.5-coder-1.5b-int4-g32"
    assert built == [("qwen2.5-coder-1.5b-instruct-q4_k_m", {"profile": "orin-nano-4gb", "quant": "int4", "group_size": 32,
                                                            "awq": False, "context": 4096, "progress": False,
                                                            "report": False})]


def test_a_model_whose_parts_are_not_installed_is_not_announced(models, capsys):
    assert engines.choose_generator("orin-nano-8gb") is engines.QWEN05  # the 1.5B is not installed
    err = capsys.readouterr().err
    assert "qwen2.5-coder-0.5b" in err and "1.5b" not in err


def test_smollm2_when_the_qwen_parts_are_not_installed(models):
    models.discard("qwen2.5-coder-0.5b-instruct-q4_k_m")
    assert engines.choose_generator("orin-nano-8gb") is engines.SMOLLM2
    models.clear()
    with pytest.raises(ModelError, match="no default generator is installed"):
        engines.choose_generator("cpu")


def test_a_first_use_build_is_announced_on_stderr_even_without_a_terminal(models, monkeypatch, tmp_path, capsys):
    import edge.build.generator as gen

    built = []
    monkeypatch.setattr(gen, "build_generator_bundle", lambda model, out, **kw: built.append((model, kw)))
    out = engines.default_generator_bundle(progress=True, profile="cpu")
    assert out.name == engines.QWEN05.bundle
    assert built == [("qwen2.5-coder-0.5b-instruct-q4_k_m", {"profile": "cpu", "quant": "int8", "group_size": None,
                                                            "awq": True, "context": 4096, "progress": True, "report": False})]
    err = capsys.readouterr().err
    assert "edge-rag: first use: building the Qwen2.5-Coder-0.5B-Instruct int8 engine" in err
    assert "edge-rag: built Qwen2.5-Coder-0.5B-Instruct int8 in" in err
