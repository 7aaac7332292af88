"""The cuda backend on every architecture of edge.models.arch, against transformers (fp32) and the
numpy reference: Qwen3 (q/k RMSNorm), Gemma 3 ((1 + w) sandwich norms, embedding scale, GeLU-tanh,
a sliding and a global layer with their own RoPE bases, final logit soft-capping), Phi-3 (fused
qkv / gate_up, LongRoPE) and Mistral (sliding window on every layer).

head_dim 16 (hidden 64) runs the generic decode kernel and cuBLAS prefill attention; head_dim 64
(hidden 256) the split-sequence decode kernel and the flash prefill kernel (and, forced, cuBLAS).
The tiny window is 8, so 24 tokens cross it. The engine runs fp16 (weights and activations):
logits are held to 1e-2 relative (norm) like the rest of the cuda tests; the figures are printed
by `python3 bench/arch_parity.py --lowering cuda`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

pytestmark = pytest.mark.gpu

ARCHS = ("qwen3", "gemma3_text", "phi3", "mistral")
TOL = 1e-2


def rel(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def _hf_logits(hf, ids):
    import torch

    with torch.no_grad():
        return hf(torch.from_numpy(np.asarray(ids, np.int64))[None]).logits[0].float().numpy()


def _hf_greedy(hf, prompt, n):
    import torch

    with torch.no_grad():
        out = hf.generate(torch.from_numpy(np.asarray(prompt, np.int64))[None], max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy_agrees(got: list[int], want: list[int], hf, prompt, tol: float) -> int:
    """Tokens equal to transformers' greedy ones before the first difference; a difference is
    only accepted at a near tie (the two tokens' fp32 logits closer than tol * max |logit|)."""
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    if same < len(want):
        lg = _hf_logits(hf, [*prompt, *want[:same]])[-1]
        gap = abs(lg[want[same]] - lg[got[same]])
        assert gap < tol * np.abs(lg).max(), f"greedy differs at {same} with a margin {gap:.3e}: {got} vs {want}"
    return same


@pytest.mark.parametrize("hidden", [64, 256])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_match_transformers(tmp_path, arch, hidden):
    from helpers_tiny import make_tiny_bundle, tiny_hf_model

    from edge.runtime.cuda.session import CudaDecoderSession

    hf = tiny_hf_model(arch, hidden=hidden)
    path = make_tiny_bundle(tmp_path / arch, hf, "fp32", forms=())
    ids = np.random.default_rng(1).integers(0, 256, 24)
    want = _hf_logits(hf, ids)
    sess = CudaDecoderSession(path, max_batch=2, max_context=128, block_size=8)
    sess.attn_min_split = 4  # several decode splits at these contexts (head_dim 64)
    for flash in ((True, False) if hidden == 256 else (True,)):
        sess.flash_prefill = flash
        sess.add_sequence(0)
        errs = [rel(sess.prefill(0, ids[:16]), want[15])]
        errs += [rel(sess.decode([0], ids[t : t + 1])[0], want[t]) for t in range(16, 24)]
        sess.release(0)
        assert max(errs) < TOL, f"{arch} h{hidden} flash={flash}: rel errors {np.round(errs, 5)}"
        # chunked prefill: a chunk over a cached prefix that already crosses the window
        sess.add_sequence(1)
        sess.prefill(1, ids[:11])
        e = rel(sess.prefill(1, ids[11:24]), want[23])
        sess.release(1)
        assert e < TOL, f"{arch} h{hidden} flash={flash}: chunked prefill rel error {e:.2e}"
    prompt = np.random.default_rng(2).integers(0, 256, 6)
    got = sess.generate_greedy(prompt, 32)
    greedy_agrees(got, _hf_greedy(hf, prompt, 32), hf, prompt, TOL)
    assert sess.blocks.num_free == sess.blocks.num_blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_fused_and_unfused_match_reference(tmp_path, arch):
    """int4 (the M = 1 block-K kernels, with the fused epilogues the features allow) against the
    numpy reference on the same weights, graphs on."""
    from helpers_tiny import bundle_weights, hf_spec, make_tiny_bundle, tiny_hf_model

    from edge.runtime.cuda.reference import reference_logits
    from edge.runtime.cuda.session import CudaDecoderSession

    hf = tiny_hf_model(arch, hidden=256)
    spec, w = hf_spec(hf), bundle_weights(hf, "int4", 32)
    path = make_tiny_bundle(tmp_path / arch, hf, "int4", forms=())
    ids = np.random.default_rng(3).integers(0, 256, 24)
    ref = reference_logits(spec, w, ids)
    sess = CudaDecoderSession(path, max_batch=2, max_context=128, block_size=8)
    bk = next(v for v in sess.INT4_M1_VARIANTS if sess.is_bk(v))
    for fused in (True, False):
        sess.set_int4_m1(bk, fused)
        sess.add_sequence(0)
        sess.prefill(0, ids[:16])
        got = np.stack([sess.decode([0], ids[t : t + 1])[0] for t in range(16, 24)])
        sess.release(0)
        e = rel(got, ref[16:24])
        assert e < TOL, f"{arch} int4 fused={fused}: rel error {e:.2e}"


def test_engine_steps_mixed_prefill_and_decode_gemma3(tmp_path):
    """The engine backend's mixed steps (prompt chunks and decode rows together) on Gemma 3."""
    from helpers_tiny import bundle_weights, hf_spec, make_tiny_bundle, tiny_hf_model
    from test_cuda_backend import Pool

    from edge.runtime.cuda.backend import CudaBackend
    from edge.runtime.cuda.reference import reference_logits

    hf = tiny_hf_model("gemma3_text", hidden=256)
    spec, w = hf_spec(hf), bundle_weights(hf, "fp32")
    be = CudaBackend.open(make_tiny_bundle(tmp_path / "g", hf, "fp32", forms=()), max_context=128)
    pool = Pool(be.caps.num_blocks, be.caps.block_size, be.caps.blocks_per_seq)
    rng = np.random.default_rng(4)
    seqs = {0: rng.integers(0, 256, 30), 1: rng.integers(0, 256, 26)}
    ref = {i: reference_logits(spec, w, s) for i, s in seqs.items()}
    for rows in ([(0, 0, 12), (1, 0, 5)], [(0, 12, 13), (1, 5, 20)], [(0, 13, 14), (1, 20, 21)], [(0, 14, 30), (1, 21, 22)]):
        out = be.execute(pool.batch([(sid, seqs[sid][a:z].tolist()) for sid, a, z in rows], host=1))
        for r, (sid, a, z) in enumerate(rows):
            e = rel(out.logits[r], ref[sid][z - 1])
            assert e < TOL, f"seq {sid} tokens [{a}, {z}): rel error {e:.2e}"


@pytest.mark.parametrize("hidden", [64, 256])
def test_attention_softcap_matches_reference(tmp_path, hidden):
    """Score soft-capping (no registered architecture sets it today; the kernels take it) on a
    Llama block, against the numpy reference, which it changes."""
    from helpers_tiny import bundle_weights, hf_spec, tiny_hf_model

    from bench.random_bundle import write_bundle
    from edge.runtime.cuda.reference import reference_logits
    from edge.runtime.cuda.session import CudaDecoderSession

    hf = tiny_hf_model("llama", hidden=hidden)
    plain = hf_spec(hf)
    spec = dataclasses.replace(plain, features=dataclasses.replace(plain.features, attn_softcap=0.5))
    w = bundle_weights(hf, "fp32")
    ids = np.random.default_rng(5).integers(0, 256, 24)
    ref = reference_logits(spec, w, ids)
    assert rel(reference_logits(plain, w, ids)[-1], ref[-1]) > 1e-2  # the cap matters here
    sess = CudaDecoderSession(write_bundle(tmp_path / "cap", spec, w, "fp32", 0, max_context=128, max_batch=2),
                              max_batch=2, max_context=128, block_size=8)
    sess.attn_min_split = 4
    for flash in (True, False):
        sess.flash_prefill = flash
        sess.add_sequence(0)
        errs = [rel(sess.prefill(0, ids[:16]), ref[15])] + [rel(sess.decode([0], ids[t : t + 1])[0], ref[t]) for t in range(16, 24)]
        sess.release(0)
        assert max(errs) < TOL, f"softcap h{hidden} flash={flash}: {np.round(errs, 5)}"
