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

.PHONY: demo test lint typecheck unit install-demo install-dev clean gpu-check

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

# The check for a lent GPU machine (docs/gpu.md): build/gpu-check/ holds the cp312 wheels
# that machine lacks and the script it runs with its own python3. Here, without a GPU, the
# script says so and exits 0. The device tool carries 64 MiB a call: the folder must stay
# well below that beside the checkout.
GPU_CHECK_DIR := build/gpu-check
GPU_CHECK_MAX_MIB := 50
GPU_WHEEL_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(p)_x86_64)

$(GPU_CHECK_DIR)/.wheels: deploy/gpu-check/wheels.txt | $(PY)
	rm -rf $(GPU_CHECK_DIR)/wheels && mkdir -p $(GPU_CHECK_DIR)/wheels
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_WHEEL_PLATFORMS) -d $(GPU_CHECK_DIR)/wheels -r deploy/gpu-check/wheels.txt
	touch $@

gpu-check: $(GPU_CHECK_DIR)/.wheels
	cp deploy/gpu-check/gpu_check.py $(GPU_CHECK_DIR)/gpu_check.py
	@mib=$$(du -sm $(GPU_CHECK_DIR) | cut -f1); \
	echo "$(GPU_CHECK_DIR): $$mib MiB, $$(ls $(GPU_CHECK_DIR)/wheels | wc -l) wheels"; \
	if [ "$$mib" -ge $(GPU_CHECK_MAX_MIB) ]; then echo "over $(GPU_CHECK_MAX_MIB) MiB"; exit 1; fi
	timeout 480 $(PYTHON) $(GPU_CHECK_DIR)/gpu_check.py

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache
