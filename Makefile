# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Everything installs into a project virtual environment (.venv), so a stock Debian/Ubuntu python3,
# which refuses system-wide pip installs (PEP 668), works as is. PYTHON picks the interpreter that makes it.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
# The CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv install install-test demo test lint

# Without Debian's python3-venv there is no ensurepip: make the venv bare and let the system pip fill it.
$(VPY):
	$(PYTHON) -m venv $(VENV) || ( rm -rf $(VENV) && $(PYTHON) -m venv --without-pip $(VENV) && \
		$(PYTHON) -m pip --python $(VPY) install -q pip )

venv: $(VPY)

install: venv
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .

install-test: venv
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"

demo: install
	$(VPY) -m lmforge.cli demo

test: install-test
	$(VPY) -m pytest

lint:
	$(VPY) -m ruff check src tests benchmarks
