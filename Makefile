# The README's two commands are `make run` and `make test`; everything else is a building block.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CRD := crds/enterpriseagents.agents.enterprise.io.yaml

.PHONY: help venv system-packages tools test lint typecheck pytest crds run cluster-up cluster-down cluster-status bench bench-runtime bench-rollout bench-watch-memory bench-write-cost bench-operations e2e-kind clean

help:
	@echo "make run    - operator against the current cluster, else the local control plane, with an example agent"
	@echo "make test   - ruff, import-linter contracts, mypy and pytest (unit and cluster tests)"
	@echo "make crds   - regenerate $(CRD) from operator/agent_operator/spec.py"

# devtools/ (eao-dev: the local control plane, `make run`, the test kit) is a distribution of its own,
# never in the product wheel or the images; it goes into the same venv, after the product it drives.
$(STAMP): pyproject.toml devtools/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check pip==25.3
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(BIN)/pip install --quiet --disable-pip-version-check -e ./devtools
	touch $(STAMP)

venv: $(STAMP)

# Programs the tests run that come from Debian's packages: Lua 5.1 (Argo CD's dialect) and 5.4 for
# the health check, bubblewrap to run our programs as an unprivileged user with only /tmp writable,
# and the real node's container runtime, CNI plugins and netfilter tools (eao_devtools.node).
SYSTEM_PACKAGES := lua5.1 lua5.4 bubblewrap containerd runc containernetworking-plugins iptables nftables conntrack ipset buildah mmdebstrap postgresql-15
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing from Debian's packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo

typecheck: venv
	$(BIN)/mypy

# The control plane binaries and helm, promtool and kstatus, built once from hack/ (minutes cold:
# done before pytest, outside its per-test timeout). In CI, Go's caches (about 15 GB) are deleted
# once the programs are built: CI machines' disks can be nearly full.
tools: venv system-packages
	$(BIN)/eao-dev tools --images $(if $(CI),--release-go-caches,)

pytest: venv system-packages tools
	$(BIN)/pytest

test: lint typecheck pytest

crds: venv
	$(BIN)/agent-operator crd > $(CRD)
	cp $(CRD) charts/enterprise-agent-operator/crds/

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

run: venv
	$(BIN)/eao-dev run

cluster-up: venv
	$(BIN)/eao-dev cluster up

cluster-down: venv
	$(BIN)/eao-dev cluster down

cluster-status: venv
	$(BIN)/eao-dev cluster status

bench: venv
	$(BIN)/eao-dev bench operator --agents 100 1000

bench-rollout: venv
	$(BIN)/eao-dev bench rollout --windows 0 5 10 --runs 3 $(ARGS)

# The operator's memory beside 5,000 unrelated 100 KiB Secrets: server-side selectors vs none.
bench-watch-memory: venv
	$(BIN)/eao-dev bench watch_memory --secrets 5000 --size-kib 100

# What one write costs the API server and etcd: a ConfigMap, an agent, its status (bench/write_cost.py).
bench-write-cost: venv
	$(BIN)/eao-dev bench write_cost --writes 300

# wrk comes from Debian's packages; FastAPI, uvicorn and py-spy from the bench extra (installed with
# the venv, so mypy checks the bench servers too). ARGS="--profile flame.svg" adds a flame graph.
# Then the Python work a request costs each server, counted rather than timed (bench/request_work.py):
# a figure this machine's noise cannot move.
bench-runtime: venv
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/eao-dev bench runtime --connections 16 64 256 $(ARGS)
	$(BIN)/eao-dev bench request_work --top 20

# analyze_data against pandas and process_document's MB/s at 0.1, 1 and 5 MB (issue 19); pandas and
# numpy come from the bench extra, installed with the venv. ARGS passes options (--profile, --rows ...).
bench-operations: venv
	$(BIN)/eao-dev bench operations $(ARGS)

# For users with Docker and kind: the same cluster tests against a kind cluster.
# Not run on this project's machines (no Docker engine there). Pods on kind are real, so the
# agent image must be pullable by the kind nodes: set EAO_TEST_IMAGE to an image you loaded. The
# chart-install test is for kwok's simulated pods (it runs the operator beside them), so it is left out.
e2e-kind: venv
	kind create cluster --name eao-e2e
	kind get kubeconfig --name eao-e2e > .kind-kubeconfig
	KUBECONFIG=$(CURDIR)/.kind-kubeconfig $(BIN)/pytest -m cluster --deselect tests/cluster/test_chart_install.py; status=$$?; kind delete cluster --name eao-e2e; exit $$status
