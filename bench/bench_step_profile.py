"""Where the batch-1 decode step's time goes under programmatic launch: edge-rag alone.

    PYTHONPATH=. python3 bench/bench_step_profile.py --configs llama-3-8b,llama-3.2-1b --out $OUT/p

Per config (random int4 g128 bundle, bench_cuda's prompt 128 / 128 new tokens), after every linear
shape is checked against dequantize + fp32 matmul (bench_cuda.validate_linears): `leave_out`, the
step graph (PDL launches as the session captures them) replayed with one kind of launch left out:
what that kind costs inside the PDL graph, where kernels overlap and per-kernel events cannot
separate them (argmax and the input advance are left out of every variant, so each replay
repeats the same step); and `step_b1`, greedy-stream tok/s, graph replay ms and the fraction of copy
bandwidth (bytes read per token x tok/s / copy bandwidth, as bench_cuda).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.bench_cuda as bc  # noqa: E402
from bench.random_bundle import make_random_bundle  # noqa: E402
from edge.bundle import Bundle  # noqa: E402
from edge.quant.policy import bytes_read_per_token  # noqa: E402



def _labels(sess) -> dict[str, callable]:
    """Leave-out predicates on bench_cuda._launch_label, for this model's shapes."""
    s = sess.spec
    qkv_n, hid, gu_n, vocab = s.q_size + 2 * s.kv_size, s.hidden_size, 2 * s.intermediate_size, s.vocab_size
    L0 = sess.layers[0]
    o_name, down_name = L0["o"].m1[0] if L0["o"].m1 else "gemv_", L0["down"].m1[0] if L0["down"].m1 else "gemv_"

    def is_lin(lab, n, prefix=None):
        return lab.startswith("gemv_") and lab.endswith(f"[n={n}]") and (prefix is None or lab.startswith(prefix))

    out = {
        "attention": lambda lab: lab.startswith("paged_attn"),
        "add_rmsnorm": lambda lab: lab.startswith("add_rmsnorm"),
        "qkv": lambda lab: is_lin(lab, qkv_n),
        "gate_up": lambda lab: is_lin(lab, gu_n),
        "head": lambda lab: is_lin(lab, vocab),
        "all_linears": lambda lab: lab.startswith("gemv_"),
    }
    if o_name != down_name:  # o and down both write [n = hidden]: told apart by their variants only
        out["o"] = lambda lab: is_lin(lab, hid, o_name)
        out["down"] = lambda lab: is_lin(lab, hid, down_name)
    else:
        out["o_and_down"] = lambda lab: is_lin(lab, hid)
    return out


def _replay_ms(sess, g, n: int = 20) -> float:
    cp, st = sess.cp, sess.stream
    s0, e0 = cp.cuda.Event(), cp.cuda.Event()
    g.launch(st)
    ts = []
    for _ in range(n):
        s0.record(st)
        g.launch(st)
        e0.record(st)
        e0.synchronize()
        ts.append(cp.cuda.get_elapsed_time(s0, e0))
    return statistics.median(ts)


def leave_out(sess, name: str, device: str, prompt) -> None:
    """The b1 step graph, PDL as the session captures it, with one kind of launch left out."""
    import edge.runtime.cuda.decode as dmod

    orig = dmod.PdlKernels
    preds = _labels(sess)
    fixed = lambda lab: lab.startswith("argmax_rows_mb") or lab.startswith("advance_inputs")  # noqa: E731
    sess.add_sequence(700)
    sess.prefill_greedy(700, prompt)
    sess.decode([700], np.array([1]))
    out: dict = {}
    try:
        for setting in ("default",):
            res = {}
            for kind, pred in [("none", lambda lab: False), *preds.items()]:
                drop = lambda lab, p=pred: fixed(lab) or p(lab)  # noqa: E731

                class Skip(orig):
                    def __getitem__(self, kname, _drop=drop):
                        f = super().__getitem__(kname)

                        def call(grid, block, args, **kw):
                            if not _drop(bc._launch_label(kname, args)):
                                f(grid, block, args, **kw)
                        return call

                dmod.PdlKernels = Skip if sess.pdl else orig
                real = sess.k
                if not sess.pdl:  # plain launches: filter the session's kernels directly
                    class SkipPlain:
                        def __getitem__(self, kname, _drop=drop):
                            f = real[kname]

                            def call(grid, block, args, **kw):
                                if not _drop(bc._launch_label(kname, args)):
                                    f(grid, block, args, **kw)
                            return call

                        def __getattr__(self, a):
                            return getattr(real, a)
                    sess.k = SkipPlain()
                try:
                    sess._graphs.clear()
                    with sess.stream:
                        g = sess._capture(1)
                        res[kind] = round(_replay_ms(sess, g), 4)
                finally:
                    sess.k = real
                    dmod.PdlKernels = orig
            base = res["none"]
            out[setting] = {"replay_ms": res, "cost_us": {k: round(1e3 * (base - v), 1) for k, v in res.items() if k != "none"}}
    finally:
        dmod.PdlKernels = orig
        sess._graphs.clear()
        sess.release(700)
    bc.emit(figure="leave_out", device=device, model=name, pdl=sess.pdl, **out)


def bench(name: str, path: Path, copy_bw: float, device: str) -> None:
    from edge.runtime.cuda.session import CudaDecoderSession

    b = Bundle.open(path, kind="generator", verify=False)
    spec = b.spec
    t0 = time.perf_counter()
    sess = CudaDecoderSession(b, max_batch=1, max_context=512)
    load_s = time.perf_counter() - t0
    lin_err = bc.validate_linears(sess)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, spec.vocab_size, size=bc.PROMPT)
    sess.generate_greedy(prompt, 8)
    leave_out(sess, name, device, prompt)
    recipe, group = b.manifest.quant.recipe, b.manifest.quant.group_size or 128
    bpt = bytes_read_per_token(spec, recipe, group) + (bc.PROMPT + bc.NEW / 2) * spec.kv_bytes_per_token(2)
    runs: dict = {}
    for _ in range(2):
        bc._b1_timing(sess, prompt, runs)
    tps, rep = statistics.median(runs["tok_s"]), statistics.median(runs["replay_ms"])
    bc.emit(figure="step_b1", device=device, model=name, copy_gb_s=round(copy_bw / 1e9, 1), bytes_per_token=int(bpt), linear_rel_err=lin_err,
            load_s=round(load_s, 1), tok_s=round(tps, 1), replay_ms=round(rep, 4), roofline_frac=round(bpt * tps / copy_bw, 3),
            replay_frac=round(bpt / (rep / 1e3) / copy_bw, 3),
            int4_m1_pick={k: sess._cand_name((v[0].m1, v[0].fused)) for k, v in bc._int4_shapes(sess).items()},
            int4_m1_us={k: {n: round(t, 1) for n, t in d.items()} for k, d in sess.int4_m1_us.items()})
    del sess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="llama-3-8b,llama-3.2-1b")
    ap.add_argument("--out", type=Path, default=Path("/tmp/edge-step-profile"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-bench-bundles"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bc.LOG = args.out / "figures.jsonl"
    import cupy as cp

    from edge.runtime.cuda import probe

    device = probe().get("gpu")
    bw = bc.copy_bandwidth(cp)
    bc.emit(figure="copy_bandwidth", device=device, gb_s=round(bw / 1e9, 1))
    for name in args.configs.split(","):
        path = args.work / f"{name}-int4"
        if not (path / "manifest.json").exists():
            t0 = time.perf_counter()
            make_random_bundle(name, path, recipe="int4", group_size=128, max_context=4096)
            bc.emit(figure="bundle_built", model=name, seconds=round(time.perf_counter() - t0, 1))
        bench(name, path, bw, device)
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
