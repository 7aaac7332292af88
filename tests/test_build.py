"""`edge-rag build` for generators: a tiny checkpoint in, a verified bundle out; bad input gives
one line on stderr and a non-zero exit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge.bundle import Bundle
from edge.errors import BundleError
from tiny_checkpoints import make_checkpoint, write_gguf


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama", tied=True)


def test_build_int4_awq_bundle_verifies_and_refuses_a_flipped_byte(tiny_llama, tmp_path):
    from edge.build.generator import build_generator_bundle

    out = build_generator_bundle(tiny_llama, tmp_path / "gen", profile="orin-nano-8gb", quant="int4", group_size=32, progress=False)
    b = Bundle.open(out, kind="generator")
    m = b.manifest
    assert {"weights.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(m.artifacts)
    assert b.spec.n_layers == 2 and b.spec.tie_embeddings
    q = m.quant
    assert (q.recipe, q.group_size, q.awq, q.method) == ("int4", 32, True, "awq+gptq")
    assert q.policy["lm_head"] == "int8" and q.policy["tied_lm_head_copy"]
    assert len(q.report["layers"]) == 2 * 7 + 1
    assert m.profile == "orin-nano-8gb" and m.plan["profile"] == "orin-nano-8gb"
    lim = m.limits  # tiny model: max_position 256; the plan's KV budget, capped at max_batch sequences
    assert lim.max_context == 256 and 1 <= lim.max_batch <= 8 and lim.kv_block_size == 16 and lim.kv_dtype == "fp16"
    assert lim.kv_blocks == lim.max_batch * 256 // 16
    row = next(r for r in m.plan["options"] if r["quant"] == "int4" and r["group_size"] == 32)
    assert m.planned_weight_bytes == row["weight_bytes"]
    assert m.calibration["tokens"] > 0 and "pydoc_data" in m.calibration["source"]
    assert len(m.source["config_sha256"]) == 64
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["eos_token_id"] == 259 and tcfg["chat_template"]
    w = b.load_weights()
    assert w["model.layers.0.self_attn.q_proj.qweight"].dtype == np.uint8
    assert w["model.layers.0.self_attn.q_proj.scales"].shape == (64, 2)
    assert not list(tmp_path.glob(".gen.partial-*"))  # atomic: no leftovers
    # each weight stored once: the ORT graph references weights.safetensors, the TensorRT form is derived on the target
    import onnx

    assert "model.trt.onnx" not in m.artifacts
    g = onnx.load(str(out / "model.ort.onnx"), load_external_data=False)
    ext = [t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and {e.value for t in ext for e in t.external_data if e.key == "location"} == {"weights.safetensors"}
    spans = {tuple(e.value for e in t.external_data if e.key in ("offset", "length")) for t in ext}  # the tied head is read twice
    assert sum(int(n) for _, n in spans) == sum(
        v.nbytes for k, v in w.items() if k.startswith(("model.layers.", "lm_head")) and k.endswith((".qweight", ".scales")))
    inline = [t.name for t in g.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 20_000 and "rotary" not in t.name]
    assert inline == [], inline

    p = out / "weights.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for weights.safetensors"):
        Bundle.open(out)


def test_fp32_bundle_reproduces_the_checkpoint(tiny_llama, tmp_path):
    from edge.build.generator import build_generator_bundle
    from edge.models.checkpoint import load_checkpoint
    from edge.models.reference import forward
    from edge.quant.rtn import dequantize_tensors

    out = build_generator_bundle(tiny_llama, tmp_path / "gen", profile="cpu", quant="fp32", progress=False)
    m = Bundle.open(out).manifest
    assert m.quant.recipe == "fp32" and m.calibration is None and m.planned_weight_bytes is None
    spec, w = load_checkpoint(tiny_llama)
    bw = dequantize_tensors(Bundle.open(out).load_weights())
    assert set(bw) == set(w) and all(np.array_equal(bw[k], w[k]) for k in w)
    ids = np.arange(10)
    assert np.array_equal(forward(spec, bw, ids), forward(spec, w, ids))


def test_auto_takes_the_plan_recommendation(tiny_llama, tmp_path):
    from edge.build.generator import build_generator_bundle
    from edge.plan import plan_model
    from edge.models.spec import read_spec

    out = build_generator_bundle(tiny_llama, tmp_path / "gen", profile="orin-nano-8gb", quant="auto", context=128, progress=False)
    m = Bundle.open(out).manifest
    rec = plan_model(read_spec(tiny_llama), "orin-nano-8gb", context=128).recommendation
    assert m.quant.recipe == rec.quant and m.quant.requested == "auto"
    assert m.limits.max_context == 128 and m.plan["request"]["context"] == 128


def test_kv_dtype_int8_writes_the_plan_int8_column(tiny_llama, tmp_path, capsys):
    """`build --kv-dtype int8`: the manifest's pool is the plan's int8-KV column (more tokens than the fp16
    build of the same budget), which --backend native allocates as int8 (tests/test_native_backend.py);
    a bad value is a one-line error."""
    from edge.plan import kv_bytes_per_token

    got = {}
    for kv in ("fp16", "int8"):
        out = tmp_path / kv
        code, stdout, err = _cli(["build", "--model", str(tiny_llama), "--profile", "orin-nano-8gb", "--quant", "int8", "--context", "128",
                                  "--out", str(out), "--quiet", "--json", "--kv-dtype", kv], capsys)
        assert code == 0, err
        got[kv] = Bundle.open(out).manifest.limits
    spec = Bundle.open(tmp_path / "int8").spec
    assert got["fp16"].kv_dtype == "fp16" and got["int8"].kv_dtype == "int8"
    assert kv_bytes_per_token(spec, "int8") < kv_bytes_per_token(spec, "fp16")
    assert got["int8"].max_batch >= got["fp16"].max_batch and got["int8"].max_context == got["fp16"].max_context == 128
    code, _, err = _cli(["build", "--model", str(tiny_llama), "--profile", "orin-nano-8gb", "--quant", "int8", "--out",
                         str(tmp_path / "bad"), "--quiet", "--kv-dtype", "fp8"], capsys)
    assert code != 0 and "--kv-dtype" in err and "fp8" in err


def _cli(args, capsys):
    from edge.cli import main

    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_build_tiny_model(tiny_llama, tmp_path, capsys):
    out = tmp_path / "engine"
    code, stdout, err = _cli(["build", "--model", str(tiny_llama), "--profile", "orin-nano-8gb", "--quant", "int8",
                              "--out", str(out), "--quiet", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["quant"]["recipe"] == "int8" and summary["quant"]["method"] == "rtn"
    assert Bundle.open(out).manifest.quant.recipe == "int8"
    assert summary["limits"]["kv_blocks"] >= summary["limits"]["max_context"] // 16


def test_cli_build_rtn_with_calib_file(tiny_llama, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "engine"
    code, _, err = _cli(["build", "--model", str(tiny_llama), "--profile", "cpu", "--quant", "int4", "--group-size", "64",
                         "--rtn", "--calib", str(calib), "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    m = Bundle.open(out).manifest
    assert (m.quant.awq, m.quant.group_size, m.calibration["source"]) == (False, 64, str(calib))


@pytest.mark.slow  # transformers' GGUF tokenizer conversion: ~7 s
def test_cli_build_gguf(tmp_path, capsys):
    path = write_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "engine"
    code, _, err = _cli(["build", "--model", str(path), "--profile", "cpu", "--quant", "int4", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    m = Bundle.open(out).manifest
    assert m.source["format"] == "gguf" and len(m.source["sha256"]) == 64
    assert m.quant.group_size == 128  # the largest group that tiles hidden 256
    assert json.loads((out / "tokenizer_config.json").read_text())["source"] == "gguf"


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["--quant", "int3"], 2, "unsupported quant 'int3'"),
        (["--quant", "int4", "--group-size", "48"], 2, "unsupported group size 48"),
        (["--quant", "int8", "--group-size", "64"], 2, "--group-size applies to int4"),
        (["--calib", "/no/such/calib.txt", "--quant", "int4"], 2, "no such file"),
        (["--context", "100000"], 2, "context 100000 is outside"),
        (["--profile", "orin-nano-9gb"], 1, "orin-nano"),
    ],
)
def test_cli_bad_options(tiny_llama, tmp_path, capsys, args, code, needle):
    got, _, err = _cli(["build", "--model", str(tiny_llama), "--out", str(tmp_path / "e")] + args, capsys)
    assert got == code, err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists()


def test_cli_bad_checkpoints(tiny_llama, tmp_path, capsys):
    import shutil

    cases = []
    missing = tmp_path / "missing"
    cases.append((missing, "no such file"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 7)
    cases.append((corrupt, "corrupt or truncated"))
    gg = write_gguf(tmp_path / "t.gguf")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(gg.read_bytes()[: gg.stat().st_size // 3])
    cases.append((trunc, "trunc.gguf"))
    for model, needle in cases:
        got, _, err = _cli(["build", "--model", str(model), "--quant", "int8", "--out", str(tmp_path / "e"), "--quiet"], capsys)
        assert got == 1 and needle in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.partial-*"))


def test_cli_dispatches_sentence_transformers_folders(tmp_path, monkeypatch, capsys):
    import edge.build.encoder as encoder
    from edge.cli.build_cmd import is_encoder_folder

    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "modules.json").write_text("[]")
    assert is_encoder_folder(folder)
    calls = []

    def fake_build(model_dir, out, *, quant="fp32", progress=True):
        from edge.bundle import BundleWriter, Manifest, Quant

        calls.append((model_dir, quant))
        w = BundleWriter(out, "embedder")
        return w.commit(Manifest(kind="embedder", model={}, quant=Quant("fp32")))

    monkeypatch.setattr(encoder, "build_embedder_bundle", fake_build)
    code, _, err = _cli(["build", "--model", str(folder), "--out", str(tmp_path / "emb"), "--quiet"], capsys)
    assert code == 0, err
    assert calls == [(folder, "fp32")]
    code, _, err = _cli(["build", "--model", str(folder), "--rtn", "--out", str(tmp_path / "emb")], capsys)
    assert code == 2 and "generator builds only" in err
