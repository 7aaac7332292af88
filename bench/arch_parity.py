"""Parity of every lowering of the one model definition against transformers, tiny random configs.

    python bench/arch_parity.py [--arch qwen3 gemma3_text phi3 mistral llama qwen2] [--lowering numpy ort trt cuda]
                                [--hidden 64|256]

One JSON line per (architecture, lowering): max relative logit error over 24 tokens (prefill 16,
then 8 decode steps through the KV cache; the tiny sliding window is 8, so Gemma 3's local and
global layers and Mistral's window all matter) and how many of 32 greedy tokens equal
transformers' greedy output. Lowerings: the numpy reference, the ORT form, the TRT form (run in
ONNX Runtime: TensorRT is not installable here), and the cuda backend on a GPU, three rows: an fp32
bundle in the fp32 compute mode (what it opens in; precision "fp32"), the same bundle on the fast
fp16 engine (precision "fp16": fp16 weights, activations and KV cache) and an fp16 bundle; at the
first greedy token that differs, the fp32 logit margin between the two tokens is given. --hidden 256 gives head_dim 64 (the cuda flash
prefill and split decode kernels). The same checks are tests/test_architectures.py and, on a
GPU, tests/test_cuda_arch.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers_tiny import bundle_weights, greedy_decode, hf_spec, tiny_hf_model  # noqa: E402
from test_onnx_decoder import reference_logits, run_ort_form, run_trt_form  # noqa: E402

from edge.build.onnx_decoder import build_decoder_onnx  # noqa: E402
from edge.bundle import Quant  # noqa: E402
from edge.models.reference import forward  # noqa: E402


def cuda_rows(model, spec, ids, prompt, greedy, rel, tmp: Path):
    """The cuda lowering's figures: an fp32 bundle in fp32 and fp16 compute, an fp16 bundle."""
    from helpers_tiny import make_tiny_bundle

    from edge.runtime.cuda import open_session

    paths = {r: make_tiny_bundle(tmp / r, model, r, forms=()) for r in ("fp32", "fp16")}
    for recipe, precision in (("fp32", "fp32"), ("fp32", "fp16"), ("fp16", "fp16")):
        sess = open_session(paths[recipe], precision=precision, max_batch=2, max_context=128, block_size=8)
        sess.attn_min_split = 4  # several decode splits at these contexts
        sess.add_sequence(0)
        got = [sess.prefill(0, ids[:16])] + [sess.decode([0], ids[t : t + 1])[0] for t in range(16, 24)]
        sess.release(0)
        toks = sess.generate_greedy(prompt, 32)
        same = next((i for i, (a, b) in enumerate(zip(toks, greedy)) if a != b), 32)
        row = {"bench": "arch_parity", "arch": spec.arch, "lowering": "cuda", "recipe": recipe, "precision": precision, "head_dim": spec.head_dim,
               "max_rel_err": rel(np.stack(got)), "greedy_equal": sum(a == b for a, b in zip(toks, greedy)),
               "greedy_prefix_equal": same, "greedy_of": 32}
        if same < 32:
            import torch

            with torch.no_grad():
                lg = model(torch.from_numpy(np.asarray([*prompt, *greedy[:same]]))[None]).logits[0, -1].numpy()
            row["margin_at_first_diff"] = float(abs(lg[greedy[same]] - lg[toks[same]]) / np.abs(lg).max())
        print(json.dumps(row), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="*", default=["qwen3", "gemma3_text", "phi3", "mistral", "llama", "qwen2"])
    ap.add_argument("--lowering", nargs="*", default=["numpy", "ort", "trt"], choices=["numpy", "ort", "trt", "cuda"])
    ap.add_argument("--hidden", type=int, default=64, help="hidden size (head_dim = hidden / 4)")
    args = ap.parse_args()
    import torch

    for arch in args.arch:
        model = tiny_hf_model(arch, hidden=args.hidden)
        spec = hf_spec(model)
        w = bundle_weights(model, "fp32")
        ids = np.random.default_rng(1).integers(0, spec.vocab_size, 24)
        want = reference_logits(model, ids, 16)
        prompt = np.random.default_rng(2).integers(0, spec.vocab_size, 6)
        with torch.no_grad():
            greedy = model.generate(torch.from_numpy(prompt[None]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        rel = lambda got: float(np.abs(got - want).max() / np.abs(want).max())  # noqa: E731
        if "numpy" in args.lowering:
            print(json.dumps({"bench": "arch_parity", "arch": arch, "lowering": "numpy", "max_rel_err": rel(forward(spec, w, ids)[15:])}))
        if "cuda" in args.lowering:
            with tempfile.TemporaryDirectory() as td:
                cuda_rows(model, spec, ids, prompt, greedy, rel, Path(td))
        for form in [f for f in ("ort", "trt") if f in args.lowering]:
            with tempfile.TemporaryDirectory() as td:
                path = build_decoder_onnx(spec, w, Quant("fp32"), Path(td), form)
                got = (run_ort_form if form == "ort" else run_trt_form)(path, spec, ids, 16)
                toks = greedy_decode(path, spec, form, prompt, 32, 64)
            print(json.dumps({"bench": "arch_parity", "arch": arch, "lowering": form, "max_rel_err": rel(got),
                              "greedy_equal": sum(a == b for a, b in zip(toks, greedy)), "greedy_of": 32}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
