"""SmolLM2 greedy reference: CPU engine tokens here, the same bundle rebuilt on the GPU machine.

The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB) is too big to travel to the
device machine with its bundle (int4 weights.safetensors ~141 MB, the tree limit is 64 MiB a
call), so the comparison goes in two steps:

    # here (CPU): build the bundle, record greedy tokens (CPU engine at accuracy_level 4 and 0,
    # fp32 numpy reference) + per-tensor hashes
    edge-rag build --model default --quant int4 --rtn --group-size 64 --out /tmp/smol-int4-rtn
    python bench/smollm2_reference.py cpu /tmp/smol-int4-rtn --out bench/smollm2_cpu_greedy.json
    python bench/smollm2_reference.py skeleton /tmp/smol-int4-rtn .carry2/bundle   # bundle minus weights/ONNX
    split -n 2 -d $GGUF /tmp/p && mv /tmp/p00 .carry1/part1 && mv /tmp/p01 .carry2/part2   # 49 MB each
    pip download --no-deps --only-binary=:all: --python-version 3.12 -d .carry2/whl gguf==0.19.0
    # (.carry1/ and .carry2/ listed in .git/info/exclude; one device call carries .carry1 and
    #  copies part1 to /tmp, the next, while the machine is warm, carries .carry2)

    # device: GGUF (carried in two halves) -> the same RTN quantizer -> weights.safetensors,
    # every tensor checked bit-for-bit against the CPU build's hashes, then the GPU test
    python bench/smollm2_reference.py rebuild --gguf /tmp/smol.gguf --skeleton .carry2/bundle \
        --ref bench/smollm2_cpu_greedy.json --out /tmp/smolb
    EDGE_RAG_SMOLLM2_BUNDLE=/tmp/smolb python -m pytest tests/test_cuda_smollm2.py -m gpu

RTN int4 is elementwise (per-group max / 7, round, clip), so the rebuilt tensors must be
byte-identical to the CPU build's; `rebuild` fails if any tensor hash differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Prompts fed through the model's chat template (Tokenizer.encode_chat, generation prompt added).
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a GPU is in two sentences.",
    "List three uses of a paperclip.",
    "def fibonacci(n):",
]
NEW_TOKENS = 64
BUILD_CMD = "edge-rag build --model default --quant int4 --rtn --group-size 64 --out /tmp/smol-int4-rtn"
SKIP_SUFFIXES = (".onnx", ".onnx.data", ".data")


def tensor_hashes(tensors: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 over dtype, shape and bytes of each tensor (file-format independent)."""
    out = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[name] = h.hexdigest()
    return out


def _greedy_session(sess, tok, ids: list[int], sid: int) -> tuple[list[int], list[float]]:
    """NEW_TOKENS greedy tokens (no stop tokens) and the top-1 minus top-2 logit gap at each."""
    sess.add_sequence(sid)
    logits = sess.prefill(sid, np.asarray(ids, dtype=np.int64))
    out, gaps = [], []
    for _ in range(NEW_TOKENS):
        top2 = np.argsort(-logits)[:2]
        gaps.append(round(float(logits[top2[0]] - logits[top2[1]]), 5))
        out.append(int(top2[0]))
        if len(out) < NEW_TOKENS:
            logits = sess.decode([sid], np.array([out[-1]], dtype=np.int64))[0]
    sess.release(sid)
    return out, gaps


def _greedy_fp32(spec, weights, ids: list[int]) -> tuple[list[int], list[float]]:
    """The same with the float32 numpy reference forward (edge.runtime.cuda.reference; no cache)."""
    from edge.runtime.cuda.reference import reference_logits

    seq, out, gaps = list(ids), [], []
    for _ in range(NEW_TOKENS):
        logits = reference_logits(spec, weights, np.asarray(seq))[-1]
        top2 = np.argsort(-logits)[:2]
        gaps.append(round(float(logits[top2[0]] - logits[top2[1]]), 5))
        out.append(int(top2[0]))
        seq.append(out[-1])
    return out, gaps


def _acc0_bundle(bundle_dir: Path, work: Path):
    """A copy of the bundle whose ORT graph runs MatMulNBits at accuracy_level 0 (fp32 activations)."""
    from edge.bundle import Bundle
    from edge.build.onnx_decoder import build_decoder_onnx
    from safetensors.numpy import load_file

    b = Bundle.open(bundle_dir, kind="generator")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for p in bundle_dir.iterdir():
        if p.is_file() and p.name != "model.ort.onnx" and not p.name.endswith(SKIP_SUFFIXES):
            (work / p.name).symlink_to(p.resolve())
    w = load_file(str(b.file("weights.safetensors")))
    build_decoder_onnx(b.spec, w, b.manifest.quant, work, "ort", max_context=b.limits.max_context, accuracy_level=0)
    return Bundle.open(work, kind="generator", verify=False)


def greedy_cpu(bundle_dir: Path, work: Path) -> dict:
    """Greedy NEW_TOKENS tokens of each prompt on the onnxruntime engine as built (MatMulNBits
    accuracy_level 4: int8-quantized activations), on the same engine at accuracy_level 0 (fp32
    activations) and with the float32 numpy reference forward."""
    from edge.bundle import Bundle
    from edge.runtime.generator import Generator
    from edge.runtime.ort_session import OrtDecoderSession
    from safetensors.numpy import load_file

    gen = Generator.from_bundle(bundle_dir, backend="onnxruntime")
    sess, tok = gen.session, gen.tokenizer
    b = Bundle.open(bundle_dir, kind="generator")
    sess0 = OrtDecoderSession(_acc0_bundle(bundle_dir, work), max_batch=1)
    weights = load_file(str(b.file("weights.safetensors")))
    runs = []
    for i, text in enumerate(PROMPTS):
        ids = tok.encode_chat([{"role": "user", "content": text}])
        out, gaps = _greedy_session(sess, tok, ids, i)
        out0, gaps0 = _greedy_session(sess0, tok, ids, i)
        out32, gaps32 = _greedy_fp32(b.spec, weights, ids)
        runs.append({"prompt": text, "prompt_ids": [int(x) for x in ids], "tokens": out, "top2_gap": gaps,
                     "tokens_acc0": out0, "top2_gap_acc0": gaps0, "tokens_fp32": out32, "top2_gap_fp32": gaps32,
                     "text": tok.decode(out)})
        agree = [sum(a == c for a, c in zip(x, out32)) for x in (out, out0)]
        print(f"{i}: {len(ids)} prompt tokens -> {tok.decode(out)[:60]!r}; tokens equal to fp32 greedy: acc4 {agree[0]}, acc0 {agree[1]}", flush=True)
    q = b.manifest.quant
    return {
        "what": "greedy tokens of the CPU (onnxruntime) engine; reference for tests/test_cuda_smollm2.py",
        "build": BUILD_CMD,
        "engine": "onnxruntime " + __import__("onnxruntime").__version__,
        "tokens": "the engine as built (MatMulNBits accuracy_level %s: int8 activations)" % q.accuracy_level,
        "tokens_acc0": "the same ORT graph rebuilt with accuracy_level 0 (fp32 activations)",
        "tokens_fp32": "float32 numpy reference forward (edge.runtime.cuda.reference), no KV cache",
        "quant": {k: getattr(q, k) for k in ("recipe", "group_size", "method")},
        "prompt_format": "chat template: Tokenizer.encode_chat([{'role': 'user', 'content': prompt}]), generation prompt added",
        "new_tokens": NEW_TOKENS,
        "stop_tokens": "ignored (always NEW_TOKENS tokens)",
        "weights_file_sha256": b.manifest.artifacts["weights.safetensors"].sha256,
        "tensor_sha256": tensor_hashes(weights),
        "runs": runs,
    }


def skeleton(bundle_dir: Path, dst: Path) -> None:
    """Copy the bundle without weights.safetensors and ONNX files (small enough to carry)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for p in bundle_dir.iterdir():
        if p.is_file() and p.name != "weights.safetensors" and not p.name.endswith(SKIP_SUFFIXES):
            shutil.copyfile(p, dst / p.name)


def rebuild(gguf: Path, skel: Path, ref: dict, out: Path) -> dict:
    """Weights from the GGUF through the build's RTN quantizer; checked against the CPU hashes."""
    from safetensors.numpy import save_file

    from dataclasses import replace

    from edge.bundle import Artifact, read_manifest, sha256_file
    from edge.models.checkpoint import load_checkpoint
    from edge.quant.quantize import quantize_model

    q = ref["quant"]
    spec, weights = load_checkpoint(gguf)
    res = quantize_model(spec, weights, q["recipe"], q["group_size"], calib=None, awq=False)
    tensors = {k: np.ascontiguousarray(v) for k, v in res.tensors.items()}
    got = tensor_hashes(tensors)
    want = ref["tensor_sha256"]
    differ = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(skel, out)
    save_file(tensors, str(out / "weights.safetensors"))
    manifest = read_manifest(out)
    arts = {k: v for k, v in manifest.artifacts.items() if (out / k).is_file()}
    w = out / "weights.safetensors"
    file_sha = sha256_file(w)
    arts["weights.safetensors"] = Artifact(file_sha, w.stat().st_size)
    (out / "manifest.json").write_text(replace(manifest, artifacts=arts).to_json())
    return {"figure": "smollm2_rebuild", "tensors": len(got), "tensors_differing": differ[:20], "n_differing": len(differ),
            "weights_file_identical": file_sha == ref["weights_file_sha256"], "numpy": np.__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("bundle", type=Path)
    c.add_argument("--out", type=Path, default=Path("bench/smollm2_cpu_greedy.json"))
    c.add_argument("--work", type=Path, default=Path("/tmp/smol-acc0"))
    s = sub.add_parser("skeleton")
    s.add_argument("bundle", type=Path)
    s.add_argument("dst", type=Path)
    r = sub.add_parser("rebuild")
    r.add_argument("--gguf", type=Path, required=True)
    r.add_argument("--skeleton", type=Path, required=True)
    r.add_argument("--ref", type=Path, default=Path("bench/smollm2_cpu_greedy.json"))
    r.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "cpu":
        a.out.write_text(json.dumps(greedy_cpu(a.bundle, a.work), indent=1) + "\n")
    elif a.cmd == "skeleton":
        skeleton(a.bundle, a.dst)
    else:
        info = rebuild(a.gguf, a.skeleton, json.loads(a.ref.read_text()), a.out)
        print(json.dumps(info), flush=True)
        if info["n_differing"]:
            sys.exit(f"{info['n_differing']} tensors differ from the CPU build: {info['tensors_differing']}")


if __name__ == "__main__":
    main()
