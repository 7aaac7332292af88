"""A deterministic hashing embedder for the RAG tests (no model needed), and its own checks.

Bag of words (lower-cased word tokens and their 4-char prefixes) hashed into `dim` buckets with
a sign, L2-normalized: texts that share words get a positive cosine, unrelated texts ~0.
Imported by the ingest subprocess of the crash test too (by adding tests/ to sys.path).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"\w+")


class HashEmbedder:
    """Implements the Embedder surface the rag package uses."""

    max_seq_length = 256
    # its own relevance gate (a real embedder's comes from its bundle manifest, calibrated at build)
    relevance_gate = {"min_cosine": 0.30, "min_cosine_with_keywords": 0.20, "min_keyword_coverage": 0.5}

    def __init__(self, dim: int = 64, name: str = "hash"):
        self.dim = dim
        self.embedder_id = f"{name}-bow-{dim}"

    def tokens(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def count_tokens(self, text: str) -> int:
        return len(self.tokens(text)) + 2  # like [CLS] ... [SEP]

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, np.float32)
        for w in self.tokens(text):
            for feat in (w, w[:4] + "#"):
                h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
                v[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        n = np.linalg.norm(v)
        return v / n if n else v

    def embed(self, texts, batch_size: int = 32, progress: bool = False, max_tokens: int | None = None) -> np.ndarray:
        """`max_tokens`: read at most that many tokens of a text ([CLS] and [SEP] counted), as Embedder."""
        if max_tokens is not None:
            texts = [" ".join(self.tokens(t)[:max(0, max_tokens - 2)]) for t in texts]
        return np.stack([self._vec(t) for t in texts]).astype(np.float32) if texts else np.zeros((0, self.dim), np.float32)

    def embed_counted(self, texts, batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, int]:
        return self.embed(texts), sum(self.count_tokens(t) for t in texts)

    def embed_query(self, text: str) -> np.ndarray:
        return self._vec(text)


def test_hash_embedder_is_normalized_and_deterministic():
    e = HashEmbedder(64)
    a = e.embed(["the pump overheats", "the pump overheats", "completely unrelated words here"])
    assert a.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert float(a[0] @ a[1]) > 0.999
    assert float(a[0] @ a[2]) < 0.6
