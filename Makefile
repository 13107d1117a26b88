# The README's two commands are `make run` and `make test`; everything else is a building block.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CRD := crds/enterpriseagents.agents.enterprise.io.yaml

.PHONY: help venv test lint typecheck unit pytest crds check-crds run cluster-up cluster-down cluster-status clean

help:
	@echo "make run    - operator against the current cluster, else the local control plane, with an example agent"
	@echo "make test   - ruff, mypy and pytest (unit and cluster tests)"
	@echo "make crds   - regenerate $(CRD) from operator/agent_operator/spec.py"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check pip==25.3
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest

test: lint typecheck pytest

crds: venv
	$(BIN)/agent-operator crd > $(CRD)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

run: venv
	$(BIN)/agent-operator dev

cluster-up: venv
	$(BIN)/agent-operator cluster up

cluster-down: venv
	$(BIN)/agent-operator cluster down

cluster-status: venv
	$(BIN)/agent-operator cluster status
