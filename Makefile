# fogline — two commands to get going: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FOGLINE := $(VENV)/bin/fogline
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PKGS := fogline edge_agent cloud_service sync compression residency messaging

.PHONY: demo test lint typecheck unit install-demo install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PIP) install -q -e ".[demo]"
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $@ $(VENV)/.demo-installed

install-demo: $(VENV)/.demo-installed
install-dev: $(VENV)/.dev-installed

demo: install-demo
	$(FOGLINE) demo

lint: install-dev
	$(VENV)/bin/ruff check $(PKGS) tests
	$(VENV)/bin/ruff format --check $(PKGS) tests

# mypy cannot follow setuptools' package-dir mapping, so it checks a symlinked
# view of the tree laid out as installed (fogline/<package>).
typecheck: install-dev
	@rm -rf build/typecheck && mkdir -p build/typecheck/fogline
	@for f in fogline/*; do ln -s ../../../$$f build/typecheck/fogline/$$(basename $$f); done
	@for p in edge_agent cloud_service sync compression residency messaging; do ln -s ../../../$$p build/typecheck/fogline/$$p; done
	cd build/typecheck && ../../$(VENV)/bin/mypy -p fogline --config-file ../../pyproject.toml

unit: install-dev
	$(PY) -m pytest -q

test: lint typecheck unit

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache
