"""Batch-1 decode step A/B for one device call (#11): this tree's forms of the step against each
other in one process, alternating, on bench_cuda's random int4 g128 bundles.

    # .xfer-gpu = git archive of the branch, .xfer-gpu/old = git archive of main (CONVENTIONS.md)
    cd .xfer-gpu && export PYTHONUNBUFFERED=1
    (cd old && PYTHONPATH=. EDGE_RAG_HOME=/tmp/e0 CUPY_CACHE_DIR=/tmp/c0 python3 ../bench/bench_step_ab.py main)
    PYTHONPATH=. EDGE_RAG_HOME=/tmp/e1 CUPY_CACHE_DIR=/tmp/c1 python3 bench/bench_step_ab.py branch

Run from main's tree (`old/`, with this file from the branch) it times main's step as it is; the
variants a tree lacks are skipped. Bundles are built once under /tmp/bsab (shared by both trees).
Per model (--configs, default Llama-3-8B then Llama-3.2-1B), in two alternating rounds, each form's
greedy-stream tok/s (bench_cuda._b1_timing: two streams of 127 tokens) and step-graph replay ms
(ten replays a round; medians printed):
  picked     the tree's defaults (the autotuner's picks, folded RMSNorms where picked)
  nofold     the best unfolded pick per shape by the autotuner's own times (every norm its own launch)
  attn_tk0   decode attention with the own token's K row and the merge's parts loaded after the
             barrier / the weights (paged_attn_split_tk0: the kernel before session 12)
  split32    one row's attention splits of 32 tokens instead of 64 (head_dim 128)
and the largest |logit| difference of each form against `picked` after two decode steps (attn_tk0
must be 0: the same loads and sums in another order of issue).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, ".")
import bench.bench_cuda as bc  # noqa: E402
from bench.random_bundle import make_random_bundle  # noqa: E402
from edge.bundle import Bundle  # noqa: E402
from edge.quant.policy import bytes_read_per_token  # noqa: E402
from edge.runtime.cuda.session import CudaDecoderSession  # noqa: E402


def _forms(sess) -> dict:
    """name -> (apply, undo) for the forms this tree has."""
    forms = {"picked": (lambda: None, lambda: None)}
    lins = [L[k] for L in sess.layers for k in ("qkv", "o", "gu", "down")]
    if hasattr(sess, "fold_norms") and getattr(sess, "int4_m1_us", None):
        saved = {id(lin): (lin.m1, lin.fused, lin.fold) for lin in lins}
        cands = {sess._cand_name(c): c for v in sess.INT4_M1_VARIANTS for c in ((v, True, False), (v, False, False))}
        best = {}
        for key, times in sess.int4_m1_us.items():
            nf = {n: t for n, t in times.items() if not n.endswith("+fold") and n in cands}
            if nf:
                best[key] = cands[min(nf, key=nf.get)]
        shapes_by_key = bc._int4_shapes(sess)

        def nofold():
            for key, ls in shapes_by_key.items():
                if key in best:
                    for lin in ls:
                        lin.m1, lin.fused, lin.fold = best[key]

        def restore():
            for lin in lins:
                lin.m1, lin.fused, lin.fold = saved[id(lin)]

        if any(lin.fold for lin in lins):
            forms["nofold"] = (nofold, restore)
    if hasattr(sess, "attn_split_kernel"):
        forms["attn_tk0"] = (lambda: setattr(sess, "attn_split_kernel", "paged_attn_split_tk0"),
                             lambda: setattr(sess, "attn_split_kernel", "paged_attn_split_tk"))
    if sess.spec.head_dim == 128:
        forms["split32"] = (lambda: setattr(sess, "attn_min_split_b1", 32), lambda: setattr(sess, "attn_min_split_b1", None))
    return forms


def run(name: str, tag: str, work: Path, copy_bw: float) -> dict:
    path = work / name
    if not (path / "manifest.json").exists():
        make_random_bundle(name, path, max_context=4096)
    b = Bundle.open(path, kind="generator", verify=False)
    sess = CudaDecoderSession(b, max_batch=1, max_context=512)
    lin_err = bc.validate_linears(sess)
    spec, q = b.spec, b.manifest.quant
    bpt = bytes_read_per_token(spec, q.recipe, q.group_size or 128) + (bc.PROMPT + bc.NEW / 2) * spec.kv_bytes_per_token(2)
    prompt = np.random.default_rng(1).integers(0, b.spec.vocab_size, size=bc.PROMPT)
    sess.generate_greedy(prompt, 8)
    forms = _forms(sess)
    runs: dict[str, dict] = {}
    logits: dict[str, np.ndarray] = {}
    for _ in range(2):
        for form, (apply, undo) in forms.items():
            apply()
            try:
                sess._graphs.clear()
                sess.add_sequence(900)
                tok = sess.prefill_greedy(900, prompt)
                sess.decode([900], np.array([tok]))
                logits[form] = sess.decode([900], np.array([tok]))
                sess.release(900)
                bc._b1_timing(sess, prompt, runs.setdefault(form, {}))
            finally:
                undo()
                sess._graphs.clear()
    L0 = sess.layers[0]
    picks = {k: sess._cand_name((L0[k].m1, L0[k].fused, getattr(L0[k], "fold", False))) for k in ("qkv", "o", "gu", "down")}
    out = {"tag": tag, "model": name, "pdl": sess.pdl, "picks": picks, "copy_gb_s": round(copy_bw / 1e9, 1), "linear_rel_err": lin_err,
           **{f: {"tok_s": round(statistics.median(r["tok_s"]), 1), "replay_ms": round(statistics.median(r["replay_ms"]), 4),
                  "frac": round(bpt * statistics.median(r["tok_s"]) / copy_bw, 4),
                  "replay_frac": round(bpt / (statistics.median(r["replay_ms"]) / 1e3) / copy_bw, 4),
                  "replay_all": [round(x, 4) for x in r["replay_ms"]],
                  "max_abs_vs_picked": float(np.max(np.abs(logits[f].astype(np.float64) - logits["picked"])))}
              for f, r in runs.items()}}
    print(json.dumps(out), flush=True)
    del sess
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tag")
    ap.add_argument("--configs", default="llama-3-8b,llama-3.2-1b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bsab"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    a = ap.parse_args()
    import cupy as cp

    copy_bw = bc.copy_bandwidth(cp)
    res = [run(n, a.tag, a.work, copy_bw) for n in a.configs.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"step_ab_{a.tag}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
