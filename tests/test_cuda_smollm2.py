"""Real SmolLM2-135M-Instruct on the cuda backend: greedy tokens against the CPU side.

Reference: bench/smollm2_cpu_greedy.json, 64 greedy tokens per prompt of the bundle
`edge-rag build --model default --quant int4 --rtn --group-size 64` from three CPU computations:
the onnxruntime engine as built (MatMulNBits accuracy_level 4, int8 activations), the same graph
at accuracy_level 0 (fp32 activations) and the float32 numpy reference forward. The bundle is too big
for the repository, so the test runs only where EDGE_RAG_SMOLLM2_BUNDLE points at that bundle
(bench/smollm2_reference.py says how it is rebuilt on the GPU machine, bit-identical).
EDGE_RAG_SMOLLM2_REPORT=file appends one JSON line per comparison (first differing position,
top-2 logit gaps there on both sides).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

REF = Path(__file__).resolve().parent.parent / "bench" / "smollm2_cpu_greedy.json"


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads(REF.read_text())


@pytest.fixture(scope="module")
def session(ref):
    path = os.environ.get("EDGE_RAG_SMOLLM2_BUNDLE")
    if not path:
        pytest.skip(f"set EDGE_RAG_SMOLLM2_BUNDLE to a bundle built with `{ref['build']}` (see bench/smollm2_reference.py)")
    from edge.bundle import Bundle
    from edge.runtime.cuda.session import CudaDecoderSession

    b = Bundle.open(path, kind="generator")
    q = b.manifest.quant
    got = {k: getattr(q, k) for k in ref["quant"]}
    assert got == ref["quant"], f"bundle quant {got} is not the reference's {ref['quant']}: rebuild with `{ref['build']}`"
    return CudaDecoderSession(b, max_batch=8, max_context=512)


def _gap(logits: np.ndarray) -> tuple[int, float, int]:
    """(argmax, top1 - top2 logit, runner-up id)."""
    o = np.argsort(-logits)[:2]
    return int(o[0]), float(logits[o[0]] - logits[o[1]]), int(o[1])


NEAR_TIE = 0.05  # logits; fp16 vs fp32 arithmetic moves SmolLM2's logits (~20) by a few 1e-2


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _cuda_gap(session, run: dict, pos: int) -> tuple[int, float, int]:
    seq = np.asarray(run["prompt_ids"] + run["tokens_fp32"][:pos], dtype=np.int32)
    session.add_sequence(999)
    try:
        return _gap(session.prefill(999, seq))
    finally:
        session.release(999)


def _report(**row) -> None:
    path = os.environ.get("EDGE_RAG_SMOLLM2_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _check(session, run: dict, got: list[int], what: str) -> list[str]:
    """Problems of one prompt's CUDA tokens against the three CPU-side references."""
    fp32, acc0, acc4 = run["tokens_fp32"], run["tokens_acc0"], run["tokens"]
    d32 = _first_diff(got, fp32)
    bad = []
    if d32 < len(fp32):
        top, gap, second = _cuda_gap(session, run, d32)
        _report(what=what, prompt=run["prompt"], vs="fp32", pos=d32, cuda=got[d32], fp32=fp32[d32],
                fp32_gap=run["top2_gap_fp32"][d32], cuda_gap=gap)
        if run["top2_gap_fp32"][d32] >= NEAR_TIE:
            bad.append(f"{what} {run['prompt']!r}: token {d32} cuda {got[d32]} vs fp32 reference {fp32[d32]} (fp32 top-2 gap "
                       f"{run['top2_gap_fp32'][d32]:.4f}, cuda top-2 gap {gap:.4f}: not a near-tie)")
    # the CPU engines: equal wherever they still follow the fp32 reference (and cuda does too)
    for name, toks in (("cpu engine accuracy_level 0", acc0), ("cpu engine as built (accuracy_level 4)", acc4)):
        k = min(_first_diff(toks, fp32), d32)
        _report(what=what, prompt=run["prompt"], vs=name, equal_tokens=_first_diff(got, toks), engine_follows_fp32_for=_first_diff(toks, fp32))
        if got[:k] != toks[:k]:
            bad.append(f"{what} {run['prompt']!r}: differs from the {name} at token {_first_diff(got, toks)}, before either leaves the fp32 reference ({k})")
    return bad


def test_greedy_matches_cpu_engine(session, ref):
    """Each prompt alone: 64 greedy tokens (prefill + 63 decode steps through the CUDA graph).

    Identical to the float32 reference's greedy tokens (a first difference is allowed only at a
    near-tie of the fp32 logits), hence to the CPU engine at accuracy_level 0 wherever that one
    follows the fp32 reference, and to the CPU engine as built (int8 activations) up to where it
    leaves it."""
    bad = []
    for run in ref["runs"]:
        got = session.generate_greedy(np.asarray(run["prompt_ids"], dtype=np.int32), ref["new_tokens"])
        _report(what="alone", prompt=run["prompt"], tokens=got)
        bad += _check(session, run, got, "alone")
    assert not bad, "\n".join(bad)


def test_greedy_batched_matches_cpu_engine(session, ref):
    """All prompts (different lengths) decoded together in one batch: the same criteria."""
    runs = ref["runs"]
    ids = list(range(len(runs)))
    toks = []
    for sid, run in zip(ids, runs):
        session.add_sequence(sid)
        toks.append(session.prefill_greedy(sid, np.asarray(run["prompt_ids"], dtype=np.int32)))
    outs = [[t] for t in toks]
    try:
        for _ in range(ref["new_tokens"] - 1):
            nxt = session.decode_greedy(ids, np.asarray([o[-1] for o in outs]))
            for o, t in zip(outs, nxt):
                o.append(int(t))
    finally:
        for sid in ids:
            session.release(sid)
    bad = []
    for run, got in zip(runs, outs):
        bad += _check(session, run, got, "batched")
    assert not bad, "\n".join(bad)
