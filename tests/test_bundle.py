"""The typed manifest: round trip, version-1 manifests read, anything else refused in one line."""

from __future__ import annotations

import json

import pytest

from edge.bundle import SCHEMA_VERSION, Bundle, BundleWriter, Limits, Manifest, Quant, TokenizerInfo, read_manifest
from edge.errors import BundleError

SPEC = {"arch": "llama", "n_layers": 2, "hidden_size": 64, "intermediate_size": 128, "n_heads": 4, "n_kv_heads": 2,
        "head_dim": 16, "vocab_size": 256, "max_position": 512}

# what edge-rag wrote before the typed manifest (schema 1), trimmed to the keys it had
V1 = {
    "schema_version": 1, "kind": "generator", "created": "2026-11-01T00:00:00Z", "tools": {"numpy": "2.0"},
    "model": SPEC,
    "quant": {"recipe": "int4", "group_size": 32, "awq": True, "method": "awq+gptq", "gptq": True, "requested": "int4",
              "policy": {"lm_head": "int8"}, "report": {"layers": []}, "awq_alphas": [0.5], "accuracy_level": 4},
    "profile": "orin-nano-8gb",
    "plan": {"options": [{"quant": "int4", "group_size": 64, "weight_bytes": 1}, {"quant": "int4", "group_size": 32, "weight_bytes": 777}]},
    "limits": {"max_context": 100, "max_batch": 3, "plan_max_batch": 40, "kv_dtype": "fp16"},
    "source": {"format": "hf"}, "calibration": None,
    "tokenizer": {"files": ["tokenizer.json"], "source": "hf", "eos_token_ids": [2], "bos_token_id": 1},
    "onnx": {"ort": "model.ort.onnx"}, "build_seconds": 1.0, "notes": [],
    "artifacts": {"weights.safetensors": {"sha256": "0" * 64, "bytes": 3}},
}


def _write(tmp_path, d) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "manifest.json").write_text(json.dumps(d))


def test_manifest_round_trips_through_a_bundle(tmp_path):
    w = BundleWriter(tmp_path / "b", "generator")
    w.path("weights.safetensors").write_bytes(b"abc")
    m = Manifest(kind="generator", model=SPEC, quant=Quant("int4", 32, "awq+gptq"), limits=Limits(max_context=100, max_batch=3),
                 tokenizer=TokenizerInfo(eos_token_ids=(2, 5)), notes=("n",))
    out = w.commit(m)
    b = Bundle.open(out)
    got = b.manifest
    assert got.schema_version == SCHEMA_VERSION and got.tools and got.created
    assert got.quant == m.quant and got.quant.awq and got.quant.gptq and got.tokenizer == m.tokenizer
    assert got.artifacts["weights.safetensors"].bytes == 3
    # derived KV pool: max_batch sequences of max_context tokens in 16-token blocks
    assert (b.limits.kv_blocks, b.limits.kv_block_size, b.limits.blocks_per_sequence) == (3 * 7, 16, 7)
    assert Manifest.from_dict(json.loads((out / "manifest.json").read_text())) == got


def test_version_1_manifest_is_read(tmp_path):
    _write(tmp_path, V1)
    m = read_manifest(tmp_path)
    assert m.limits == Limits(max_context=100, max_batch=3, kv_blocks=21, kv_dtype="fp16", plan_max_batch=40)
    assert (m.quant.method, m.quant.awq, m.quant.accuracy_level, m.planned_weight_bytes) == ("awq+gptq", True, 4, 777)
    assert m.tokenizer.eos_token_ids == (2,)


@pytest.mark.parametrize("change, needle", [
    ({"schema_version": 99}, "bundle schema version 99, this edge-rag reads 1, 2"),
    ({"schema_version": None}, "bundle schema version None"),
    ({"kind": "vocoder"}, "kind 'vocoder'"),
    ({"schema_version": 2, "mystery": 1}, "unknown manifest keys mystery"),
    ({"limits": {"max_context": 0, "max_batch": 1}}, "must all be >= 1"),
    ({"schema_version": 2, "quant": {"recipe": "int4"}, "limits": {"max_context": 64, "kv_blocks": 2}}, "2 KV blocks cannot hold one 64-token sequence"),
    ({"limits": {"max_context": 64, "kv_dtype": "fp8"}}, "kv_dtype 'fp8'"),
    ({"quant": {"group_size": 32}}, "malformed manifest"),
])
def test_bad_manifests_are_refused_in_one_line(tmp_path, change, needle):
    _write(tmp_path, {**V1, **change})
    with pytest.raises(BundleError, match=needle) as e:
        Bundle.open(tmp_path, verify=False)
    assert "\n" not in str(e.value) and e.value.fix


def test_not_json_and_wrong_kind(tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2")
    with pytest.raises(BundleError, match="corrupt manifest"):
        Bundle.open(tmp_path)
    _write(tmp_path, V1)
    with pytest.raises(BundleError, match="is a 'generator' bundle, expected 'embedder'"):
        Bundle.open(tmp_path, kind="embedder", verify=False)


def test_runtime_does_not_import_the_build_package():
    import subprocess
    import sys

    code = "import sys, edge.bundle, edge.runtime.generator, edge.runtime.ort_session; print(any(m.startswith('edge.build') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_streamed_weights_file_is_safetensors(tmp_path):
    import numpy as np
    from safetensors.numpy import load_file

    from edge.bundle import weights_index, write_safetensors

    t = {"b.w": np.arange(6, dtype=np.float16).reshape(2, 3), "a.qweight": np.arange(-4, 4, dtype=np.int8),
         "c": np.ones(3, np.uint8), "empty": np.zeros((0, 4), np.float32)}
    write_safetensors(t, tmp_path / "w.safetensors")
    back = load_file(str(tmp_path / "w.safetensors"))
    assert all(np.array_equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)
    idx = weights_index(tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    assert raw[idx["b.w"].offset: idx["b.w"].offset + idx["b.w"].nbytes] == t["b.w"].tobytes() and idx["b.w"].dtype == "F16"


def test_an_artifact_hashed_before_and_not_written_since_is_not_hashed_again(tmp_path, monkeypatch):
    """Bundle.verify remembers a good hash per file (size, mtime, ctime, inode): a cold `ask` of a 2 GB engine
    hashed it every time. An edit, even one that puts the size and mtime back, is hashed and caught;
    `remembered=False` (`edge-rag verify`) hashes every byte."""
    import os
    import time

    import edge.bundle as bundle_mod

    w = BundleWriter(tmp_path / "b", "generator")
    w.path("weights.safetensors").write_bytes(b"abcdef")
    out = w.commit(Manifest(kind="generator", model=SPEC, quant=Quant("int4", 32, "rtn"), limits=Limits(max_context=100, max_batch=3)))
    hashed = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    Bundle.open(out)
    Bundle.open(out)
    assert hashed == ["weights.safetensors"]  # the second open remembered it
    Bundle.open(out, verify=False).verify(remembered=False)
    assert hashed == ["weights.safetensors"] * 2
    p = out / "weights.safetensors"
    st = p.stat()
    time.sleep(1.1)  # past the timestamp tick of any file system (ext3, some overlays: 1 s)
    p.write_bytes(b"abcdeX")  # same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime: the ctime still moved
    with pytest.raises(BundleError, match="checksum mismatch for weights.safetensors"):
        Bundle.open(out)
    assert hashed == ["weights.safetensors"] * 3
