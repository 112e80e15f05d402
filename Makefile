# labkit: `make lab` to learn, `make test` to check everything. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

BROWSER := tests/browser

.PHONY: setup system binaries browser lab test test-rootless book sandbox-up sandbox-down bench clean

## setup: virtual environment with labkit (editable) and dev tools, plus the sandbox binaries. labkit's
## bytecode is compiled here, as pip does for an ordinary install: every lab kernel imports labkit, and
## where PYTHONDONTWRITEBYTECODE is set (many images set it) each would compile it again.
setup: $(VENV)/.installed binaries system
	$(BIN)/python -m compileall -q labkit

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "labkit needs Python 3.10+ ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,lab,book]'
	touch $@

## system: the Debian packages the sandbox's pod network needs (iproute2, nftables, util-linux), the one that
## gives a rootless node agent its user's subordinate ids (uidmap), and the one that confines a trainee's
## kernel while it is graded (bubblewrap), where missing
SYSTEM_TOOLS := ip:iproute2 nft:nftables unshare:util-linux setpriv:util-linux newuidmap:uidmap
GRADING_TOOLS := bwrap:bubblewrap
system:
	@bash tests/apt-missing.sh "The sandbox's pod network needs" "until then pods share this machine's network" $(SYSTEM_TOOLS)
	@bash tests/apt-missing.sh "Grading needs" "until then trainees' kernels are graded unconfined" $(GRADING_TOOLS)

## browser: what the browser tests need (tests/browser): headless Chromium and Node.js 20+ from Debian, where
## missing, and Playwright from the lock file (again when that changes)
BROWSER_TOOLS := chromium:chromium node:nodejs npm:npm
browser: $(BROWSER)/node_modules/.installed

$(BROWSER)/node_modules/.installed: $(BROWSER)/package.json $(BROWSER)/package-lock.json
	@bash tests/apt-missing.sh "The browser tests need" "until then they fail" $(BROWSER_TOOLS)
	@if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null; then \
	  echo "The browser tests need Node.js 20 or newer (here: $$(node --version 2>/dev/null || echo none)); until then they fail."; \
	  exit 0; fi; \
	cd $(BROWSER) && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed

## binaries: the pinned control plane (found, built from pinned Go modules, or downloaded)
binaries: $(VENV)/.installed
	$(BIN)/labkit sandbox install

## lab: start the sandbox and open JupyterLab on the course
lab: setup
	$(BIN)/labkit sandbox up
	eval "$$($(BIN)/labkit sandbox env)" && PATH="$(abspath $(BIN)):$$PATH" \
	  $(BIN)/jupyter lab --notebook-dir=. $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

## test: the whole suite against real binaries; as root, the pod network's tests again as an ordinary user
test: setup browser
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)
	@if [ "$$(id -u)" = 0 ] && [ -z "$(PYTEST_ARGS)" ]; then bash tests/rootless.sh; fi

## test-rootless: (as root) the pod network's tests as an ordinary user, whose sandbox runs in a user namespace
test-rootless: setup
	bash tests/rootless.sh

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
