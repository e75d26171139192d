# Two commands matter: `make run` (the main job) and `make test` (the tests).
# Both create .venv and install everything on first use (CPU torch from a pinned
# release; a CUDA machine can pre-install its own torch build into .venv).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Flower starts its own executables (flower-superlink, flwr-clientapp) by name.
export PATH := $(abspath $(BIN)):$(PATH)
TORCH  ?= torch==2.13.0
CONFIG ?= configs/default.toml

.PHONY: install run test test-slow test-all quality format bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install  ## the default experiment: MiniLM + LoRA on Rotten Tomatoes, 10 clients
	$(BIN)/python run_simulation.py --config $(CONFIG) $(ARGS)

test: install quality  ## lint, types and the fast test suite
	$(BIN)/python -m pytest -q

test-slow: install  ## integration tests: real model, real text, real Flower engine
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

quality: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/bench_lora_step.py

clean:
	rm -rf $(VENV) results .pytest_cache .mypy_cache .ruff_cache
