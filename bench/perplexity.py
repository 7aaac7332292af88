"""Perplexity of SmolLM2-135M-Instruct engines on held-out text: fp16, int8, int4-RTN, int4-AWQ, int4-AWQ+GPTQ.

Held-out text: the last 20% of pydoc_data.topics by sorted key (edge.quant.calib.heldout_text),
never seen by calibration (which uses the first 80%). The first `--tokens` tokens are cut into
non-overlapping windows of `--window` tokens; each window is scored from its start (the first
token of a window is context only).

Scoring backend:
  onnxruntime  the engine itself (edge.runtime.ort_session: model.ort.onnx, the accuracy level
               the bundle was built with), one window per batch slot, token by token through
               decode so that every position's logits are seen;
  reference    the numpy fp32 reference forward (edge.models.reference) on the bundle's
               dequantized weights (what the quantization alone costs).
Default: onnxruntime when the bundle has model.ort.onnx and the runtime imports, else reference.

    python bench/perplexity.py [--model default] [--group-size 64] [--tokens 4096] [--window 512]
                               [--backend auto|onnxruntime|reference|both] [--workdir DIR] [--rebuild]

Prints a markdown table, then one JSON line per figure. Targets: int8 within 2% of fp16,
int4-AWQ within 10%, AWQ better than RTN at the same group size. int4-awq-gptq is the default
`edge-rag build` int4 method (AWQ scales, then GPTQ rounding, 64 x 128 calibration tokens).
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

from edge.bundle import Bundle  # noqa: E402
from edge.quant.calib import CALIB_FRACTION, heldout_text  # noqa: E402

VARIANTS = (  # label, quant, method
    ("fp16", "fp16", "none"),
    ("int8", "int8", "rtn"),
    ("int4-rtn", "int4", "rtn"),
    ("int4-awq", "int4", "awq"),
    ("int4-awq-gptq", "int4", "awq+gptq"),
)


def build_variants(model: str, workdir: Path, group_size: int, rebuild: bool) -> dict[str, Path]:
    from edge.build.generator import build_generator_bundle

    out = {}
    for label, quant, method in VARIANTS:
        path = workdir / label
        ok = False
        if path.is_dir() and not rebuild:
            try:
                q = Bundle.open(path, verify=False).manifest.quant
                ok = q.recipe == quant and q.method == method and (quant != "int4" or q.group_size == group_size)
            except Exception:  # noqa: BLE001 - rebuild anything unreadable
                ok = False
        if not ok:
            t = time.time()
            build_generator_bundle(model, path, profile="orin-nano-8gb", quant=quant, group_size=group_size if quant == "int4" else None,
                                   awq=method.startswith("awq"), gptq=method == "awq+gptq", context=2048, progress=False)
            print(f"built {label} in {time.time() - t:.0f}s", file=sys.stderr)
        out[label] = path
    return out


def heldout_windows(bundle: Path, n_tokens: int, window: int) -> list[np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ids = np.asarray(tok.encode(heldout_text(), add_special_tokens=False).ids[:n_tokens], dtype=np.int64)
    return [ids[s : s + window] for s in range(0, len(ids) - window + 1, window)]


def _nll_from_logits(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    lg = logits.astype(np.float64)
    m = lg.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(axis=-1, keepdims=True)))[:, 0]
    return lse - lg[np.arange(len(targets)), targets]


def nll_onnxruntime(bundle: Path, windows: list[np.ndarray], threads: int | None) -> np.ndarray:
    """All windows at once, one batch slot each: prefill token 0, then decode tokens 1..W-2."""
    from edge.runtime.ort_session import OrtDecoderSession

    b = Bundle.open(bundle)
    w = len(windows[0])
    sess = OrtDecoderSession(b, max_batch=len(windows), max_context=w, threads=threads)
    seqs = list(range(len(windows)))
    arr = np.stack(windows)  # [B, W]
    out = []
    first = []
    for s in seqs:
        sess.add_sequence(s)
        first.append(sess.prefill(s, arr[s, :1]))
    out.append(_nll_from_logits(np.stack(first), arr[:, 1]))
    for t in range(1, w - 1):
        logits = sess.decode(seqs, arr[:, t])
        out.append(_nll_from_logits(np.asarray(logits), arr[:, t + 1]))
    return np.concatenate(out)


def nll_reference(bundle: Path, windows: list[np.ndarray]) -> np.ndarray:
    from edge.models.reference import token_nll
    from edge.quant.rtn import dequantize_tensors

    b = Bundle.open(bundle)
    weights = dequantize_tensors(b.load_weights())
    return np.concatenate([token_nll(b.spec, weights, win) for win in windows])


def _ort_available(bundle: Path) -> bool:
    try:
        import edge.runtime.ort_session  # noqa: F401
    except ImportError:
        return False
    return Bundle.open(bundle, verify=False).has("model.ort.onnx")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "reference", "both"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="where the four bundles are built (default $EDGE_RAG_HOME/bench/ppl)")
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args(argv)

    from edge.paths import home

    workdir = args.workdir or home() / "bench" / "ppl"
    workdir.mkdir(parents=True, exist_ok=True)
    bundles = build_variants(args.model, workdir, args.group_size, args.rebuild)
    windows = heldout_windows(bundles["fp16"], args.tokens, args.window)
    n_scored = sum(len(w) - 1 for w in windows)
    if args.backend == "auto":
        backends = ["onnxruntime" if _ort_available(bundles["fp16"]) else "reference"]
    elif args.backend == "both":
        backends = ["onnxruntime", "reference"]
    else:
        backends = [args.backend]

    rows = []
    for backend in backends:
        for label, quant, _ in VARIANTS:
            t = time.time()
            nll = nll_onnxruntime(bundles[label], windows, args.threads) if backend == "onnxruntime" else nll_reference(bundles[label], windows)
            m = Bundle.open(bundles[label], verify=False).manifest
            rows.append({
                "bench": "perplexity",
                "model": m.model["name"],
                "variant": label,
                "recipe": quant,
                "group_size": m.quant.group_size,
                "method": m.quant.method,
                "accuracy_level": m.quant.accuracy_level,
                "backend": backend,
                "heldout": f"pydoc_data.topics, last {100 - int(CALIB_FRACTION * 100)}% of sorted keys",
                "tokens_scored": int(nll.size),
                "window": args.window,
                "ppl": round(float(math.exp(nll.mean())), 4),
                "seconds": round(time.time() - t, 1),
            })
            print(f"{backend} {label}: ppl {rows[-1]['ppl']} ({rows[-1]['seconds']}s)", file=sys.stderr)

    for backend in backends:
        base = next(r["ppl"] for r in rows if r["backend"] == backend and r["variant"] == "fp16")
        for r in rows:
            if r["backend"] == backend:
                r["ratio_vs_fp16"] = round(r["ppl"] / base, 4)
    print(f"\nPerplexity, {rows[0]['model']}, {n_scored} held-out tokens ({rows[0]['heldout']}), windows of {args.window}\n")
    print("| backend | variant | group | method | perplexity | vs fp16 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        g = r["group_size"] or "-"
        print(f"| {r['backend']} | {r['variant']} | {g} | {r['method']} | {r['ppl']:.3f} | {100 * (r['ratio_vs_fp16'] - 1):+.2f}% |")
    print()
    for r in rows:
        print(json.dumps(r))
    for backend in backends:
        by = {r["variant"]: r for r in rows if r["backend"] == backend}
        checks = {
            "int8_within_2pct": by["int8"]["ratio_vs_fp16"] <= 1.02,
            "int4_awq_within_10pct": by["int4-awq"]["ratio_vs_fp16"] <= 1.10,
            "awq_better_than_rtn": by["int4-awq"]["ppl"] < by["int4-rtn"]["ppl"],
            "int4_awq_gptq_within_10pct": by["int4-awq-gptq"]["ratio_vs_fp16"] <= 1.10,
            "awq_gptq_better_than_awq": by["int4-awq-gptq"]["ppl"] < by["int4-awq"]["ppl"],
        }
        print(json.dumps({"bench": "perplexity_targets", "backend": backend, **checks}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
