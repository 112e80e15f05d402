# labkit: `make lab` to learn, `make test` to check everything. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup binaries lab test book sandbox-up sandbox-down bench clean

## setup: virtual environment with labkit (editable) and dev tools, plus the sandbox binaries
setup: $(VENV)/.installed binaries

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "labkit needs Python 3.10+ ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,lab,book]'
	touch $@

## binaries: the pinned control plane (found, built from pinned Go modules, or downloaded)
binaries: $(VENV)/.installed
	$(BIN)/labkit sandbox install

## lab: start the sandbox and open JupyterLab on the course
lab: setup
	$(BIN)/labkit sandbox up
	eval "$$($(BIN)/labkit sandbox env)" && PATH="$(abspath $(BIN)):$$PATH" \
	  $(BIN)/jupyter lab --notebook-dir=. $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

## test: the whole suite against real binaries
test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

## book: build the course book (Jupyter Book 1.x, offline; needs the venv, not the binaries) into book/_build/html; warnings are errors
book: $(VENV)/.installed
	$(BIN)/jupyter-book build book --warningiserror --keep-going

## bench: print the benchmark tables
bench: setup
	$(BIN)/python benchmarks/sandbox_start.py

sandbox-up: setup
	$(BIN)/labkit sandbox up

sandbox-down:
	$(BIN)/labkit sandbox down

clean:
	-$(BIN)/labkit sandbox down 2>/dev/null
	rm -rf $(VENV) .pytest_cache
