# One-command set-up: `make serve` runs the daemon, `make test` runs every check.
# Both create .venv (CPU-only torch) on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: serve test test-slow test-gpu lint typecheck proto bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/kvstore serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy kvstore loader kernels
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu

proto: $(STAMP)
	$(PY) -m kvstore._proto.generate

bench-quick: $(STAMP)
	$(PY) -m bench.kv_throughput --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
