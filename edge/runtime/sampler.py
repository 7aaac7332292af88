"""Sampling parameters and numpy sampling (greedy when temperature is 0).

Order of the logit processors, as in transformers' generate(): repetition penalty, temperature,
top-k, top-p, then a draw from the softmax with a seeded numpy Generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge.errors import UsageError


@dataclass
class SamplingParams:
    """What to generate. Validated on construction; bad values raise UsageError naming the fix."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off (HF semantics: >1 discourages seen tokens)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        def bad(name: str, value, rule: str) -> UsageError:
            return UsageError(f"invalid {name} {value!r}", fix=rule)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, (int, np.integer)) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "use an integer >= 1")
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "use a number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise bad("top_k", self.top_k, "use an integer >= 0 (0 = off)")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "use a number in (0, 1] (1 = off)")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "use a number > 0 (1 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0):
            raise bad("seed", self.seed, "use an integer >= 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", self.stop, "stop strings must be non-empty text")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and np.isfinite(x)


class Sampler:
    """Picks the next token from float32 logits [V]; one instance per sequence (own RNG)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> int:
        return sample(logits, self.params, self.rng, seen)


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF semantics: for each seen token, logit / penalty if > 0 else logit * penalty."""
    if penalty == 1.0 or seen is None or len(seen) == 0:
        return logits
    out = logits.copy()
    idx = np.unique(np.asarray(seen, dtype=np.int64))
    v = out[idx]
    out[idx] = np.where(v > 0, v / penalty, v * penalty)
    return out


def top_k_top_p_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """-inf outside the top-k and outside the smallest set whose probability reaches top_p."""
    out = logits.astype(np.float32, copy=True)
    if 0 < top_k < out.size:
        kth = np.partition(out, -top_k)[-top_k]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out, kind="stable")
        z = out[order] - out[order[0]]
        p = np.exp(z)
        p /= p.sum()
        cum = np.cumsum(p)
        # keep tokens whose preceding mass is < top_p (the first token is always kept)
        drop = (cum - p) >= top_p
        out[order[drop]] = -np.inf
    return out


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray | None = None) -> int:
    """One token id from logits float [V]."""
    x = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), seen, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(x))
    x = top_k_top_p_filter(x / np.float32(params.temperature), params.top_k, params.top_p)
    x = x - x.max()
    p = np.exp(x.astype(np.float64))
    p /= p.sum()
    return int(rng.choice(p.size, p=p))
