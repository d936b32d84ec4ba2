# modelplane developer commands. `make run` and `make test` work alone on a fresh
# machine: both build .venv first when it is missing or older than pyproject.toml.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := .tools/node_modules/.bin/buf
PROTOS := $(shell find protos -name '*.proto' | sort)
# Code we own (generated stubs are excluded from lint and type checks).
OWN_CODE := libs/modelplane/kernel libs/modelplane/cli libs/modelplane/client libs/modelplane/loadtest libs/modelplane/scoring services tests bench

.DEFAULT_GOAL := help

.PHONY: help run test fuzz proto lint bench chaos browser clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP) ## Start all four services with embedded defaults, demo models and demo features
	$(BIN)/modelplane up

test: $(STAMP) ## Run the whole test suite
	$(BIN)/python -m pytest

# `make test` runs tests/fuzz too, with MODELPLANE_FUZZ_EXAMPLES' short default.
FUZZ_EXAMPLES ?= 12000
fuzz: $(STAMP) ## Fuzz every RPC of every service (FUZZ_EXAMPLES cases per service, default 12000)
	MODELPLANE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/fuzz -q

proto: $(STAMP) ## Regenerate the Python stubs in libs/ from protos/
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=libs --grpc_python_out=libs --mypy_out=libs --mypy_grpc_out=libs $(PROTOS)
	# Every folder between libs/ and a generated module needs an __init__.py.
	for dir in $$(cd protos && find . -name '*.proto' -exec dirname {} \; | sort -u); do \
	  path=libs/$${dir#./}; \
	  while [ "$$path" != libs ]; do [ -f $$path/__init__.py ] || touch $$path/__init__.py; path=$$(dirname $$path); done; \
	done

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1

lint: $(STAMP) $(BUF) ## ruff, ruff format --check, mypy, buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint

# bench/chaos.py kills and overloads services: `make chaos` runs it, apart.
BENCHES := $(filter-out bench/chaos.py,$(sort $(wildcard bench/*.py)))
bench: $(STAMP) ## Print the performance figures the issues ask for
	@set -e; for script in $(BENCHES); do echo "== $$script"; $(BIN)/python $$script; done

chaos: $(STAMP) ## Overload, slow clients, SIGKILL and SIGTERM of the services: one table
	$(BIN)/python bench/chaos.py

browser: ## Install Debian's chromium for the HTML report test (needs root)
	command -v chromium >/dev/null 2>&1 || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }

clean: ## Remove the venv, tool installs, caches and local state
	rm -rf $(VENV) .tools .modelplane .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
