"""Sampling: validation messages, greedy, top-k / top-p / repetition penalty against hand-made
distributions and transformers' logits processors, seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import UsageError
from edge.runtime.sampler import SamplingParams, apply_repetition_penalty, sample, top_k_top_p_filter


@pytest.mark.parametrize("field,value,fix", [
    ("max_tokens", 0, ">= 1"), ("max_tokens", 2.5, "integer"), ("temperature", -0.1, ">= 0"),
    ("temperature", float("nan"), ">= 0"), ("top_k", -1, ">= 0"), ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"), ("repetition_penalty", 0.0, "> 0"), ("seed", -3, ">= 0"), ("stop", [""], "non-empty"),
])
def test_invalid_values_raise_usage_error(field, value, fix):
    with pytest.raises(UsageError) as e:
        SamplingParams(**{field: value})
    msg = str(e.value)
    assert field in msg and fix in msg and "\n" not in msg


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=100).astype(np.float32)
    p = SamplingParams(temperature=0)
    assert sample(logits, p, np.random.default_rng(1)) == int(np.argmax(logits))


def test_top_k_keeps_k():
    logits = np.arange(10, dtype=np.float32)
    out = top_k_top_p_filter(logits, 3, 1.0)
    assert np.isfinite(out).sum() == 3 and set(np.flatnonzero(np.isfinite(out))) == {7, 8, 9}


def test_top_p_keeps_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    out = top_k_top_p_filter(np.log(probs).astype(np.float32), 0, 0.75)
    assert set(np.flatnonzero(np.isfinite(out))) == {0, 1}  # 0.5 < 0.75 -> 0.8 reaches it
    out = top_k_top_p_filter(np.log(probs).astype(np.float32), 0, 0.5)
    assert set(np.flatnonzero(np.isfinite(out))) == {0}


def test_filters_match_transformers():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(4)
    logits = rng.normal(size=64).astype(np.float32) * 3
    seen = rng.integers(0, 64, 10)
    t = torch.from_numpy(logits[None].copy())
    ids = torch.from_numpy(seen[None])
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids, t.clone())[0].numpy()
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 1.3), want, rtol=1e-6)
    want = TopPLogitsWarper(0.8)(ids, TopKLogitsWarper(20)(ids, t.clone()))[0].numpy()
    got = top_k_top_p_filter(logits, 20, 0.8)
    assert (np.isfinite(got) == np.isfinite(want)).all()


def test_sampling_follows_distribution_and_seed():
    logits = np.log(np.array([0.6, 0.3, 0.1])).astype(np.float32)
    p = SamplingParams(temperature=1.0, seed=7)
    rng = np.random.default_rng(p.seed)
    draws = np.array([sample(logits, p, rng) for _ in range(4000)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.03)
    a = [sample(logits, p, np.random.default_rng(3)) for _ in range(5)]
    b = [sample(logits, p, np.random.default_rng(3)) for _ in range(5)]
    assert a == b


def test_low_temperature_sharpens():
    logits = np.log(np.array([0.4, 0.35, 0.25])).astype(np.float32)
    rng = np.random.default_rng(0)
    draws = np.array([sample(logits, SamplingParams(temperature=0.05), rng) for _ in range(2000)])
    z = np.exp((logits - logits.max()) / 0.05)
    p0 = z[0] / z.sum()  # ~0.93 at T=0.05 vs 0.4 at T=1
    assert abs(np.mean(draws == 0) - p0) < 0.03 and p0 > 0.9
