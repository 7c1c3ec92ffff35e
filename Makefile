# Shoal — every command a developer or CI needs. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/shoal/v1/*.proto)
GENERATED := libs/shoal/v1/.generated
PYTEST_ARGS ?=

.PHONY: help install protos openapi lint test test-slow chaos fuzz run fresh clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24,<27"

$(STAMP): $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $@

$(GENERATED): $(STAMP) $(PROTOS)
	$(BIN)/python -m shoal.protos
	@touch $@

install: $(STAMP) $(GENERATED) ## create .venv, install pinned dependencies, generate protobuf code

protos: $(STAMP) ## regenerate libs/shoal/v1 from protos/ (also done by install)
	$(BIN)/python -m shoal.protos
	@touch $(GENERATED)

openapi: install ## rewrite docs/openapi.json from the gateway's routes (a test checks it is current)
	$(BIN)/python -m gateway.openapi docs/openapi.json

lint: install ## ruff (check + format), mypy strict on libs/shoal and gateway, buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy libs/shoal gateway
	$(BIN)/buf lint

test: install ## the suite CI runs (real NATS, gRPC, SQLite; PostgreSQL when SHOAL_TEST_POSTGRES_URL is set)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install ## the long suites (crash and scale tests), not part of make test
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

chaos: install ## every fault scenario (slow ones included; make test runs the short profile); rewrites docs/reliability.md
	SHOAL_RELIABILITY_REPORT=docs/reliability.md $(BIN)/python -m pytest tests/chaos $(PYTEST_ARGS)

fuzz: install ## schemathesis over every REST operation with many more cases than make test (FUZZ_EXAMPLES=200)
	SHOAL_FUZZ_EXAMPLES=$(or $(FUZZ_EXAMPLES),200) SHOAL_FUZZ_COVERAGE=1 $(BIN)/python -m pytest tests/integration/test_rest_fuzz.py tests/unit/test_flow_fuzz.py tests/unit/test_segment_filters.py tests/unit/test_template_fuzz.py $(PYTEST_ARGS)

run: install ## start the whole mesh on embedded defaults (Ctrl-C stops it all)
	$(BIN)/python -m shoal.runner $(ARGS)

fresh: install ## like run, starting from an empty .data/
	$(BIN)/python -m shoal.runner --fresh $(ARGS)

clean: ## remove the virtualenv, generated code and local data
	rm -rf $(VENV) .data libs/shoal/v1/*_pb2*.py* $(GENERATED) .pytest_cache .mypy_cache .ruff_cache
