# The README's two commands are `make run` and `make test`; everything else is a building block.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CRD := crds/enterpriseagents.agents.enterprise.io.yaml

.PHONY: help venv system-packages tools test lint typecheck pytest crds run cluster-up cluster-down cluster-status bench bench-runtime bench-rollout e2e-kind clean

help:
	@echo "make run    - operator against the current cluster, else the local control plane, with an example agent"
	@echo "make test   - ruff, mypy and pytest (unit and cluster tests)"
	@echo "make crds   - regenerate $(CRD) from operator/agent_operator/spec.py"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check pip==25.3
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $(STAMP)

venv: $(STAMP)

# Programs the tests run that come from Debian's packages: Lua 5.1 (Argo CD's dialect) and 5.4 for
# the health check, bubblewrap to run our programs as an unprivileged user with only /tmp writable.
SYSTEM_PACKAGES := lua5.1 lua5.4 bubblewrap
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing from Debian's packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# helm, promtool and kstatus, built once from hack/tools (minutes cold; outside pytest's per-test timeout).
tools: venv
	$(BIN)/python -c "from agent_operator.cluster import ensure_tools; print(ensure_tools())"

pytest: venv system-packages tools
	$(BIN)/pytest

test: lint typecheck pytest

crds: venv
	$(BIN)/agent-operator crd > $(CRD)
	cp $(CRD) charts/enterprise-agent-operator/crds/

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

bench: venv
	$(BIN)/python -m bench.operator --agents 100 1000

bench-rollout: venv
	$(BIN)/python -m bench.rollout --windows 0 5 10 --runs 3

# wrk comes from Debian's packages; FastAPI and uvicorn from the bench extra (installed with the venv,
# so mypy checks the bench servers too).
bench-runtime: venv
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench.runtime

# For users with Docker and kind: the same cluster tests against a kind cluster.
# Not run on this project's machines (no Docker engine there). Pods on kind are real, so the
# agent image must be pullable by the kind nodes: set EAO_TEST_IMAGE to an image you loaded. The
# chart-install test is for kwok's simulated pods (it runs the operator beside them), so it is left out.
e2e-kind: venv
	kind create cluster --name eao-e2e
	kind get kubeconfig --name eao-e2e > .kind-kubeconfig
	KUBECONFIG=$(CURDIR)/.kind-kubeconfig $(BIN)/pytest -m cluster --deselect tests/cluster/test_chart_install.py; status=$$?; kind delete cluster --name eao-e2e; exit $$status
