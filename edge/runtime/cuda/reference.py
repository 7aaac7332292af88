"""The cuda backend's slow reference is the one numpy forward (edge.models.reference), re-exported.

Every CUDA kernel and the whole decoder step are checked against it (and it against transformers
in tests/test_cuda_reference.py); the RoPE tables the GPU path uploads come from edge.models.rope,
the one definition of rope scaling.
"""

from __future__ import annotations

from edge.models.reference import forward as reference_logits
from edge.models.rope import rope_tables

__all__ = ["reference_logits", "rope_tables"]
