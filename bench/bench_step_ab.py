"""Batch-1 decode step A/B for one device call (#11): this tree's forms of the step against each
other in one process, alternating, on bench_cuda's random int4 g128 bundles.

    # .xfer-gpu = git archive of the branch, .xfer-gpu/old = git archive of main (CONVENTIONS.md)
    cd .xfer-gpu && export PYTHONUNBUFFERED=1
    (cd old && PYTHONPATH=. EDGE_RAG_HOME=/tmp/e0 CUPY_CACHE_DIR=/tmp/c0 python3 ../bench/bench_step_ab.py main)
    PYTHONPATH=. EDGE_RAG_HOME=/tmp/e1 CUPY_CACHE_DIR=/tmp/c1 python3 bench/bench_step_ab.py branch

Run from main's tree (`old/`, with this file from the branch) it times main's step as it is; the
variants a tree lacks are skipped. Bundles are built once under /tmp/bsab (shared by both trees).
Per model (--configs, default Llama-3-8B then Llama-3.2-1B), in --rounds alternating rounds (3), each form's
greedy-stream tok/s (bench_cuda._b1_timing: two streams of 127 tokens) and step-graph replay ms
(ten replays a round; medians printed):
  picked     the tree's defaults
  autotuned  the M = 1 GEMV picks of the per-shape autotuner alone, before they were re-timed in
             the whole step (autotune.refine_int4_m1_in_step)
  before_s12 both: the autotuner's own picks and paged_attn_split_tk0 (main before session 12)
  attn_tk    decode attention by paged_attn_split_tk (256 threads; the default before paged_attn_lr)
  attn_tk0   decode attention as before session 12 (paged_attn_split_tk0)
  attn_tk1   ... with the own token's K row and the merge's parts loaded early, the ticket still
             between two sequentially consistent fences (paged_attn_split_tk1)
  no_attn    the step with no decode attention launch (what attention costs in the graph; its
             logits are meaningless)
and the largest |logit| difference of each form against `picked` after two decode steps (attn_tk0
and attn_tk1 must be 0: the same loads and sums).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
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
    default_attn = sess.split_kernel() if hasattr(sess, "split_kernel") else getattr(sess, "attn_split_kernel", None)
    if getattr(sess, "int4_m1_step_ms", None):
        shapes = bc._int4_shapes(sess)
        saved = {key: (ls[0].m1, ls[0].fused) for key, ls in shapes.items()}

        def set_picks(p):
            for key, ls in shapes.items():
                for lin in ls:
                    lin.m1, lin.fused = p.get(key, (lin.m1, lin.fused))

        forms["autotuned"] = (lambda: set_picks(sess.int4_m1_tuned), lambda: set_picks(saved))
        if hasattr(sess, "attn_split_kernel"):  # both changes undone: main before session 12
            def main_like():
                set_picks(sess.int4_m1_tuned)
                sess.attn_split_kernel = "paged_attn_split_tk0"

            def undo_main_like():
                set_picks(saved)
                sess.attn_split_kernel = default_attn

            forms["before_s12"] = (main_like, undo_main_like)
    if default_attn is not None:
        for old in ("tk", "tk0", "tk1"):
            if f"paged_attn_split_{old}" != default_attn:
                forms[f"attn_{old}"] = (lambda old=old: setattr(sess, "attn_split_kernel", f"paged_attn_split_{old}"),
                                        lambda: setattr(sess, "attn_split_kernel", default_attn))
    # what decode attention still costs inside the step: the step with no attention launch at all
    # (its logits are meaningless; only the replay time counts)
    forms["no_attn"] = (lambda: setattr(sess, "decode_attention", lambda *a, **k: None), lambda: sess.__dict__.pop("decode_attention", None))
    return forms


def run(name: str, tag: str, work: Path, copy_bw: float, rounds: int) -> dict:
    path = work / name
    if not (path / "manifest.json").exists():
        make_random_bundle(name, path, max_context=4096)
    b = Bundle.open(path, kind="generator", verify=False)
    t0 = time.perf_counter()
    sess = CudaDecoderSession(b, max_batch=1, max_context=512)
    init_s = time.perf_counter() - t0  # load, autotune, step refinement (kernels already compiled)
    lin_err = bc.validate_linears(sess)
    spec, q = b.spec, b.manifest.quant
    bpt = bytes_read_per_token(spec, q.recipe, q.group_size or 128) + (bc.PROMPT + bc.NEW / 2) * spec.kv_bytes_per_token(2)
    prompt = np.random.default_rng(1).integers(0, b.spec.vocab_size, size=bc.PROMPT)
    sess.generate_greedy(prompt, 8)
    forms = _forms(sess)
    runs: dict[str, dict] = {}
    logits: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for form, (apply, undo) in forms.items():
            apply()
            try:
                logits[form] = bc.b1_form(sess, prompt, runs.setdefault(form, {}))
            finally:
                undo()
                sess._graphs.clear()
    L0 = sess.layers[0]
    picks = {k: sess._cand_name((L0[k].m1, L0[k].fused)) for k in ("qkv", "o", "gu", "down")}
    step_ms = {k: {c: round(t, 4) for c, t in d.items()} for k, d in getattr(sess, "int4_m1_step_ms", {}).items()}
    out = {"tag": tag, "model": name, "pdl": sess.pdl, "picks": picks, "step_ms": step_ms, "init_s": round(init_s, 1), "copy_gb_s": round(copy_bw / 1e9, 1), "linear_rel_err": lin_err,
           **{f: {"tok_s": round(statistics.median(r["tok_s"]), 1), "replay_ms": round(statistics.median(r["replay_ms"]), 4),
                  "frac": round(bpt * statistics.median(r["tok_s"]) / copy_bw, 4),
                  "replay_frac": round(bpt / (statistics.median(r["replay_ms"]) / 1e3) / copy_bw, 4),
                  "replay_min_max": [round(min(r["replay_ms"]), 4), round(max(r["replay_ms"]), 4)],
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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    a = ap.parse_args()
    import cupy as cp

    copy_bw = bc.copy_bandwidth(cp)
    res = [run(n, a.tag, a.work, copy_bw, a.rounds) for n in a.configs.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"step_ab_{a.tag}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
