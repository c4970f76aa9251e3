# Set-up and everyday commands. `make test` and `make demo` install everything they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
REPO   ?= model_repository

.PHONY: install test lint demo serve perf bench clean redis demo-redis

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# The suite compile-checks the CUDA kernels; without a system nvcc, take CUDA 13's from pip.
	@command -v nvcc >/dev/null || $(BIN)/python -m pip install --quiet nvidia-cuda-nvcc
	@# Triton's Python-backend stub loads the shared libpython of this Python version.
	@$(BIN)/python -c 'import ctypes, sys; ctypes.CDLL("libpython%d.%d.so.1.0" % sys.version_info[:2])' 2>/dev/null \
		|| $(SUDO) apt-get install -y -q libpython$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
	@touch $(STAMP)

install: $(STAMP)

# The Redis tests and benchmark start real redis-server processes (Debian's redis-server 7);
# the TLS test makes its certificates with openssl.
redis:
	@{ command -v redis-server && command -v openssl; } >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y redis-server openssl || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y redis-server openssl; }; }

install: redis
test: redis
bench: redis

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q -ra

# Triton with the example ensemble on the embedded tiers; real requests over HTTP and gRPC.
demo: $(STAMP)
	$(BIN)/hps-client demo --repo $(REPO)

# The same server, left running until Ctrl-C.
serve: $(STAMP)
	$(BIN)/hps serve $(REPO)

bench: $(STAMP)
	$(BIN)/hps bench host-tier
	$(BIN)/hps bench cache
	$(BIN)/hps bench e2e
	$(BIN)/hps bench redis --seconds 60
	$(BIN)/hps bench warmup

# The demo on a local 3-node Redis Cluster (the VDB) with online updates from a Redis Stream.
REDIS_DEMO_DIR ?= /tmp/hps-demo-redis
demo-redis: $(STAMP) redis
	deploy/redis/redis-local.sh cluster $(REDIS_DEMO_DIR) 7000 7001 7002
	$(BIN)/hps demo --redis 127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002; \
	  rc=$$?; deploy/redis/redis-local.sh stop $(REDIS_DEMO_DIR); exit $$rc

clean:
	rm -rf $(VENV) $(PERF_VENV) build *.egg-info .pytest_cache .ruff_cache

# perf_analyzer lives only in tritonclient 2.50.0's wheel: its own venv, libb64 and a CUDA 12
# runtime library from pip. Results: benchmarks/results/perf.json and perf.png.
PERF_VENV := .venv-perf
$(PERF_VENV)/.installed:
	@test -x $(PERF_VENV)/bin/python || $(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/python -m pip install --quiet 'tritonclient==2.50.0' nvidia-cuda-runtime-cu12
	@ldconfig -p | grep -q libb64.so.0d || $(SUDO) apt-get install -y -q libb64-0d
	@touch $@

perf: $(STAMP) $(PERF_VENV)/.installed
	$(BIN)/python -m hps_client.perf
