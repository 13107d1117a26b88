"""The operator's defaults, written once: the CLI flags, RunOptions and ControllerSettings read them."""

from __future__ import annotations

# Where the chart installs the operator; agents' NetworkPolicies admit it from there.
OPERATOR_NAMESPACE = "enterprise-agent-system"
LEASE_NAME = "enterprise-agent-operator"
LEASE_SECONDS = 15
WORKERS = 8  # agents reconciled concurrently
RESYNC_SECONDS = 300.0  # the level-based resync of every agent
