"""`edge-rag generate` and `edge-rag chat` on a tiny bundle: streaming, --json, bad values."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from helpers_tiny import make_tiny_bundle, tiny_hf_model

from edge.cli import main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("cli") / "gen", tiny_hf_model("llama", seed=2), "int4", forms=("ort",), max_context=64)


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_is_deterministic_when_greedy(bundle, capsys):
    argv = ["generate", "hello", "--engine", str(bundle), "--temperature", "0", "--max-tokens", "8", "--json"]
    code, out, _ = run(argv, capsys)
    assert code == 0
    a = json.loads(out)
    assert set(a) >= {"text", "n_prompt", "n_generated", "ttft_s", "prefill_tok_s", "decode_tok_s"}
    assert 0 < a["n_generated"] <= 8
    _, out2, _ = run(argv, capsys)
    assert json.loads(out2)["text"] == a["text"]


def test_generate_streams_the_same_text(bundle, capsys):
    _, out, _ = run(["generate", "hello", "--engine", str(bundle), "--temperature", "0", "-n", "8", "--json"], capsys)
    want = json.loads(out)["text"]
    code, streamed, _ = run(["generate", "hello", "--engine", str(bundle), "--temperature", "0", "-n", "8"], capsys)
    assert code == 0 and streamed == want + "\n"


def test_raw_skips_the_chat_template(bundle, capsys):
    _, a, _ = run(["generate", "hello", "--engine", str(bundle), "-t", "0", "-n", "4", "--json"], capsys)
    _, b, _ = run(["generate", "hello", "--engine", str(bundle), "-t", "0", "-n", "4", "--json", "--raw"], capsys)
    assert json.loads(a)["n_prompt"] > json.loads(b)["n_prompt"] == 5


@pytest.mark.parametrize("flag,value,field", [
    ("--temperature", "-1", "temperature"), ("--top-p", "1.5", "top_p"), ("--top-k", "-2", "top_k"),
    ("--max-tokens", "0", "max_tokens"), ("--repetition-penalty", "0", "repetition_penalty"),
])
def test_invalid_sampling_values_are_one_line_errors(bundle, capsys, flag, value, field):
    code, out, err = run(["generate", "hi", "--engine", str(bundle), flag, value], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and field in err and err.count("\n") == 1


def test_prompt_too_long_and_truncate(bundle, capsys):
    long = "z" * 100
    code, _, err = run(["generate", long, "--engine", str(bundle), "--raw", "-n", "4"], capsys)
    assert code == 2 and "100 tokens" in err and "--truncate" in err and err.count("\n") == 1
    code, _, err = run(["generate", long, "--engine", str(bundle), "--raw", "-n", "4", "--truncate", "-t", "0"], capsys)
    assert code == 0 and "truncated" in err


def test_missing_engine_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run(["generate", "hi", "--engine", str(tmp_path / "nope")], capsys)
    assert code != 0 and err.startswith("error: ") and "edge-rag build" in err


def test_chat_repl_multi_turn_reset_exit(bundle, capsys, monkeypatch):
    code, out, err = run(["chat", "--engine", str(bundle), "-t", "0", "-n", "4"], capsys, "hi\nagain\n/reset\nhi\n/exit\nnever\n", monkeypatch)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 3  # three replies; "never" is after /exit
    assert lines[0] == lines[2]  # after /reset the same first turn gives the same greedy reply
    assert "reset" in err


def test_help_does_not_import_heavy_modules():
    code = "import sys; from edge.cli import main; main(['generate', '--help']); bad=[m for m in ('torch','transformers','onnxruntime') if m in sys.modules]; assert not bad, bad"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--max-tokens" in r.stdout and "--stop" in r.stdout
