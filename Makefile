# Two commands for a newcomer: `make up` (stack + service + demo data) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STACK := $(PYTHON) infra/stack.py

.PHONY: help venv up down status logs test test-unit test-integration test-stack lint bench clean

help:
	@echo "make up      start Kafka, OpenSearch, PostgreSQL, Redis, Connect, Prometheus, Alertmanager and the service"
	@echo "make down    stop everything make up started"
	@echo "make status  health of every process"
	@echo "make test    install, start the stack, run the whole suite"
	@echo "make bench   run the benchmarks, write bench/results/latest.json"
	@echo "make lint    ruff + mypy"

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

up: venv
	$(STACK) up
	$(BIN)/cqrs auth init
	@# Alertmanager calls the API's alert webhook as an operator of the demo tenant
	$(BIN)/cqrs auth token --sub alertmanager --role operator --tenant acme --ttl 31536000 \
		> $${STACK_DIR:-.stack}/alertmanager/token
	$(STACK) up-apps
	$(BIN)/cqrs demo
	@$(STACK) urls

down:
	$(STACK) down-apps
	$(STACK) down

status:
	@$(STACK) status

logs:
	@$(STACK) logs

test: venv
	$(STACK) up
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy .
	$(BIN)/python -m pytest -m "not stack"
	$(BIN)/python -m pytest -m stack

test-unit: venv
	$(BIN)/python -m pytest tests/unit

lint: venv
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/python -m mypy .

bench: venv
	$(STACK) up
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
