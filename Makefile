# Set-up and everyday commands. `make test` and `make demo` install everything they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint demo bench clean
.PHONY: redis demo-redis

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# The suite compile-checks the CUDA kernels; without a system nvcc, take CUDA 13's from pip.
	@command -v nvcc >/dev/null || $(BIN)/python -m pip install --quiet nvidia-cuda-nvcc
	@touch $(STAMP)

install: $(STAMP)

# The Redis tests and benchmark start real redis-server processes (Debian's redis-server 7).
redis:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y redis-server || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y redis-server; }; }

install: redis
test: redis
bench: redis

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
	$(BIN)/hps bench redis --seconds 60

# The demo on a local 3-node Redis Cluster (the VDB) with online updates from a Redis Stream.
REDIS_DEMO_DIR ?= /tmp/hps-demo-redis
demo-redis: $(STAMP) redis
	deploy/redis/redis-local.sh cluster $(REDIS_DEMO_DIR) 7000 7001 7002
	$(BIN)/hps demo --redis 127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002; \
	  rc=$$?; deploy/redis/redis-local.sh stop $(REDIS_DEMO_DIR); exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
