# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test lint

install:
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m lmforge.cli demo

test: install-test
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check src tests benchmarks
