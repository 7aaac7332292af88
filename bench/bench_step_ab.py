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
  attn_lr    paged_attn_lr (the b1 default before session 13's paged_attn_lc8)
  lc8_s64 / lc8_s16  paged_attn_lc8 with splits of 64 (lr's, session 13's first form) / 16 tokens at least
             (32 by default with lc8 at head_dim 128)
  no_fold    the RMSNorms after o / down as add_rmsnorm launches (main before session 15's fold; picked
             folds them into the next GEMV where layers.fold_pair allows)
  fold_o / fold_down  only the norms after o / after down folded
  --pin FORM=role:candidate,...  a form with these M = 1 picks in every layer (roles qkv / o / gu / down;
             candidates as printed in "picks", e.g. gemv_int4_bk_r8_t128_u2_p1_b8+fused), the first model only:
             a fixed set of picks timed beside the step refinement's (which differ from call to call);
             carve:PCT in the list also sets every programmatic kernel's preferred shared-memory carveout
             (percent: one L1 / shared split for the whole step, so that no SM reconfigures between kernels;
             session 17: 100 as fast as the driver's own choices, 72 and 0 slower), carve.PART:PCT only those
             whose name holds PART (e.g. carve.paged_attn_lc8:100)
  ab_NAME    (--ab-gemv DIR, repeatable; NAME = DIR's folder name) the picked block-K GEMVs compiled from DIR's
             common.cuh + gemv.cu (another tree's csrc: main's, to time a kernel change against it in one
             process, or several candidates' against each other; the same logits when a change keeps the bits)
  attn_nop   an attention launch that only waits (pdl_nop): the kernel boundary alone, timing only
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


def _forms(sess, pins: dict | None = None, ab_gemv: list[Path] | None = None) -> dict:
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
    if default_attn is not None and default_attn != "paged_attn_lr" and sess.spec.head_dim == 128:
        forms["attn_lr"] = (lambda: setattr(sess, "attn_split_kernel", "paged_attn_lr"),
                            lambda: setattr(sess, "attn_split_kernel", default_attn))
    if default_attn == "paged_attn_lc8":  # ... with splits of 64 / 16 tokens at least (32: attn_min_split_rows(1))
        for tokens in (64, 16):
            forms[f"lc8_s{tokens}"] = (lambda t=tokens: setattr(sess, "attn_min_split_b1", t), lambda: setattr(sess, "attn_min_split_b1", None))
    if getattr(sess, "fold_norms", False):  # session 15: the norms after o / down not folded into the next GEMV
        forms["no_fold"] = (lambda: setattr(sess, "fold_norms", False), lambda: setattr(sess, "fold_norms", True))
        for side in ("o", "down"):  # ... only one side's folded
            forms[f"fold_{side}"] = (lambda side=side: setattr(sess, "fold_sides", (side,)), lambda: sess.__dict__.pop("fold_sides", None))
    names = {sess._cand_name(c): c for v in sess.INT4_M1_VARIANTS for c in ((v, True), (v, False))}
    from edge.runtime.cuda.pdl import PDL_KERNELS

    def carve(pct: int, part: str = "") -> None:  # programmatic kernels' preferred shared-memory carveout (-1: the driver's choice)
        try:
            for fname, fn in sess.k.functions.items():
                if fname in PDL_KERNELS and part in fname:
                    fn.preferred_shared_memory_carveout = pct
        except Exception as e:  # noqa: BLE001 (the form then runs without it; said once per call)
            print(f"carveout {pct}: {type(e).__name__}: {e}", flush=True)

    for form, picks in (pins or {}).items():  # --pin: these candidates for these roles in every layer
        picks = dict(picks)
        # carve:PCT, one carveout for every step kernel; carve.PART:PCT for the kernels whose name holds PART (session 17)
        carves = {k[len("carve"):].lstrip("."): int(picks.pop(k)) for k in [k for k in picks if k.startswith("carve")]}
        unknown = sorted(c for c in picks.values() if c not in names)
        if unknown:
            raise SystemExit(f"--pin {form}: no such candidate {unknown[0]} (e.g. {next(iter(names))})")
        saved_l = [{role: (L[role].m1, L[role].fused) for role in picks} for L in sess.layers]

        def pin(picks=picks, carves=carves):
            for L in sess.layers:
                for role, cand in picks.items():
                    L[role].m1, L[role].fused = names[cand]
            for part, pct in carves.items():
                carve(pct, part)

        def unpin(saved_l=saved_l, carves=carves):
            for L, saved in zip(sess.layers, saved_l):
                for role, (m1, fused) in saved.items():
                    L[role].m1, L[role].fused = m1, fused
            if carves:
                carve(-1)

        forms[form] = (pin, unpin)
    for ab_dir in ab_gemv or []:  # --ab-gemv DIR: the step's block-K GEMVs compiled from another tree's common.cuh + gemv.cu
        import re

        bases = {ls[0].m1[0] for ls in bc._int4_shapes(sess).values() if sess.is_bk(ls[0].m1)}

        def wanted(line: str) -> bool:  # an instance line of gemv.cu that builds one of the picked bases
            m = re.match(r"\s*BK_(PIPE_)?INSTANCES\((\d+), (\d+), (\d+)(?:, (\d+), (\d+))?\)", line)
            if not m:
                return not re.match(r"\s*(BK_\w*INSTANCES|GEMV_INSTANCES)\(", line)
            r, nt, u, p, b = m.group(2, 3, 4, 5, 6)
            return f"gemv_int4_bk_r{r}_t{nt}_u{u}" + (f"_p{p}_b{b}" if p else "") in bases

        src = "".join((ab_dir / f).read_text() for f in ("common.cuh", "gemv.cu"))
        lines = [ln for ln in src.splitlines() if wanted(ln)]
        built = {f"gemv_int4_bk_r{r}_t{nt}_u{u}" + (f"_p{p}_b{b}" if p else "")
                 for r, nt, u, p, b in re.findall(r"^\s*BK_(?:PIPE_)?INSTANCES\((\d+), (\d+), (\d+)(?:, (\d+), (\d+))?\)", src, re.M)}
        for base in sorted(bases - built):  # a picked base DIR's gemv.cu does not instance: DIR's code for it, by its macro
            r, nt, u, p, b = re.fullmatch(r"gemv_int4_bk_r(\d+)_t(\d+)_u(\d+)(?:_p(\d+)_b(\d+))?", base).groups()
            lines.append(f"BK_PIPE_INSTANCES({r}, {nt}, {u}, {p}, {b})" if p else f"BK_INSTANCES({r}, {nt}, {u})")
        mod = sess.cp.RawModule(code="\n".join(lines), options=sess.k.options)
        epilogues = ("st", "glu", "res", "rope", "fold", "gluf", "ropef")  # BK_INSTANCES_P's kernels of a base
        other = {n: mod.get_function(n) for n in sess.k.functions if any(n.startswith(b + "_") and n[len(b) + 1:] in epilogues for b in bases)}
        mine = {n: sess.k.functions[n] for n in other}
        forms[f"ab_{ab_dir.resolve().name}"] = (lambda other=other: sess.k.functions.update(other), lambda mine=mine: sess.k.functions.update(mine))
    if "pdl_nop" in sess.k.functions:  # the attention launch with no work: the kernel boundary alone (timing only)
        def nop(q, kc, vc, bt, ctx, out, rows, *, layer):
            sess.k["pdl_nop"]((sess.spec.n_heads, rows, 8), (64,), ())

        forms["attn_nop"] = (lambda: setattr(sess, "decode_attention", nop), lambda: sess.__dict__.pop("decode_attention", None))
    # what decode attention still costs inside the step: the step with no attention launch at all
    # (its logits are meaningless; only the replay time counts)
    forms["no_attn"] = (lambda: setattr(sess, "decode_attention", lambda *a, **k: None), lambda: sess.__dict__.pop("decode_attention", None))
    return forms


def run(name: str, tag: str, work: Path, copy_bw: float, rounds: int, skip: frozenset = frozenset(), breakdown: bool = False,
        pins: dict | None = None, ab_gemv: list[Path] | None = None) -> dict:
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
    forms = {k: v for k, v in _forms(sess, pins, ab_gemv).items() if k not in skip}
    runs: dict[str, dict] = {}
    logits: dict[str, np.ndarray] = {}
    pdl, dropped = sess.pdl, {}
    for _ in range(rounds):
        for form, (apply, undo) in list(forms.items()):
            apply()
            try:
                logits[form] = bc.b1_form(sess, prompt, runs.setdefault(form, {}))
                runs[form]["folds"] = getattr(sess, "fold_count", 0)  # norms folded in the form's last step pass
            except Exception as e:  # noqa: BLE001 (a form that cannot run is reported, the others go on)
                dropped[form] = f"{type(e).__name__}: {e}"
                for sid in (900, 0, 1):  # b1_form's sequences, left behind by the failed form
                    if sid in sess.blocks:
                        sess.release(sid)
            finally:
                undo()
                sess._graphs.clear()
            if sess.pdl != pdl:  # its capture fell back to a graph without PDL: the form is dropped, PDL restored
                dropped[form] = f"no PDL capture: {sess.pdl_error}"
                sess.pdl = pdl
            if form in dropped:
                forms.pop(form)
                runs.pop(form, None)
                logits.pop(form, None)
    L0 = sess.layers[0]
    picks = {k: sess._cand_name((L0[k].m1, L0[k].fused)) for k in ("qkv", "o", "gu", "down")}
    step_ms = {k: {c: round(t, 4) for c, t in d.items()} for k, d in getattr(sess, "int4_m1_step_ms", {}).items()}
    tuned = {k: dict(sorted(d.items(), key=lambda kv: kv[1])[:6]) for k, d in getattr(sess, "int4_m1_us", {}).items()}  # the autotuner's best, us
    out = {"tag": tag, "model": name, "pdl": sess.pdl, "dropped": dropped, "picks": picks, "step_ms": step_ms, "autotune_us_best6": tuned, "init_s": round(init_s, 1), "copy_gb_s": round(copy_bw / 1e9, 1), "linear_rel_err": lin_err,
           **{f: {"tok_s": round(statistics.median(r["tok_s"]), 1), "replay_ms": round(statistics.median(r["replay_ms"]), 4),
                  "frac": round(bpt * statistics.median(r["tok_s"]) / copy_bw, 4),
                  "replay_frac": round(bpt / (statistics.median(r["replay_ms"]) / 1e3) / copy_bw, 4),
                  "replay_min_max": [round(min(r["replay_ms"]), 4), round(max(r["replay_ms"]), 4)],
                  "folds": r.get("folds", 0),
                  "max_abs_vs_picked": float(np.max(np.abs(logits[f].astype(np.float64) - logits["picked"])))}
              for f, r in runs.items()}}
    print(json.dumps(out), flush=True)
    if breakdown:  # each kernel type's launches of one step alone in a graph (no PDL), picked and each other form that runs
        from edge.runtime.cuda.kernels import gpu_name

        dev = gpu_name()
        for form, (apply, undo) in forms.items():
            if form in ("picked", "no_fold", *(pins or {})):
                apply()
                try:
                    sess._graphs.clear()
                    sess.add_sequence(901)  # one real step first: the step's inputs and residual (the
                    tok = sess.prefill_greedy(901, prompt)  # breakdown replays each kind's launches alone, so
                    sess.decode([901], np.array([tok]))  # a form's last breakdown leaves them advanced)
                    bc.step_kernel_breakdown(sess, f"{name}:{form}", dev)
                    sess.release(901)
                finally:
                    undo()
                    sess._graphs.clear()
    del sess
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tag")
    ap.add_argument("--configs", default="llama-3-8b,llama-3.2-1b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bsab"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", default="", help="forms left out, comma-separated (e.g. attn_tk,no_attn)")
    ap.add_argument("--breakdown", action="store_true", help="also each kernel type's share of the picked / no_fold step (bench_cuda.step_kernel_breakdown)")
    ap.add_argument("--pin", action="append", default=[], help="FORM=role:candidate,... (the first model; see the docstring)")
    ap.add_argument("--ab-gemv", type=Path, action="append", default=[], help="a csrc folder (another tree's common.cuh + gemv.cu): form ab_NAME (the folder's name) runs the picked block-K GEMVs built from it; repeatable")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    a = ap.parse_args()
    import cupy as cp

    copy_bw = bc.copy_bandwidth(cp)
    skip = frozenset(f for f in a.skip.split(",") if f)
    pins = {f: dict(rc.split(":", 1) for rc in spec.split(",")) for f, spec in (p.split("=", 1) for p in a.pin)}
    res = [run(n, a.tag, a.work, copy_bw, a.rounds, skip, a.breakdown, pins if i == 0 else None, a.ab_gemv) for i, n in enumerate(a.configs.split(","))]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"step_ab_{a.tag}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
