# Set-up and everyday commands. `make test` and `make demo` install everything they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# The suite compile-checks the CUDA kernels; without a system nvcc, take CUDA 13's from pip.
	@command -v nvcc >/dev/null || $(BIN)/python -m pip install --quiet nvidia-cuda-nvcc
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q -ra

demo: $(STAMP)
	$(BIN)/hps demo

bench: $(STAMP)
	$(BIN)/hps bench host-tier
	$(BIN)/hps bench cache

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
