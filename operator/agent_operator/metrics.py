"""The operator's own Prometheus metrics, served on /metrics (port 8000 by default)."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_DURATION = Histogram(
    "agent_operator_reconcile_duration_seconds",
    "Time one reconcile of an EnterpriseAgent took, by result.",
    ["result"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "agent_operator_reconcile_errors_total", "Reconciles that did not complete, by reason.", ["reason"]
)
AGENTS_MANAGED = Gauge("agent_operator_agents_managed", "EnterpriseAgents the operator currently watches.")
APPLY_TO_READY = Histogram(
    "agent_operator_apply_to_ready_seconds",
    "Seconds from a new generation of an agent being observed until it is Ready.",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
API_WRITES = Counter(
    "agent_operator_api_writes_total", "Write requests the operator sent to the API server.", ["verb", "resource"]
)
QUEUE_DEPTH = Gauge("agent_operator_workqueue_depth", "Agents waiting to be reconciled.")
# client-go's workqueue_queue_duration_seconds and rest_client_request_duration_seconds: with the
# reconcile durations, they tell where the time to Ready goes (waiting for a worker, the API, us).
QUEUE_WAIT = Histogram(
    "agent_operator_workqueue_wait_seconds",
    "Time an agent waited in the work queue before a worker took it.",
    buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
API_REQUEST_DURATION = Histogram(
    "agent_operator_api_request_duration_seconds",
    "Time one request to the API server took (watch streams excluded), by verb.",
    ["verb"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LEADER = Gauge("agent_operator_leader", "1 while this replica holds the leader Lease, else 0.")
RESYNCS = Counter("agent_operator_resyncs_total", "Periodic resyncs that queued every agent.")
ROLLOUTS = Counter(
    "agent_operator_rollouts_total",
    "Blue-green rollouts that ended, by result: promoted, aborted, analysis_failed, deadline_exceeded, rolled_back.",
    ["result"],
)
PROMOTION_DURATION = Histogram(
    "agent_operator_promotion_duration_seconds",
    "Seconds from the start of a rollout until traffic switched to the new colour.",
    buckets=(5, 10, 20, 30, 45, 60, 90, 120, 300, 600, 1800, 3600),
)
AGENT_PHASE = Gauge(
    "agent_operator_agent_phase",
    "1 for the phase each agent is in (Pending, Progressing, Paused, Ready, Degraded, Stalled), for alerts.",
    ["namespace", "name", "phase"],
)
PHASES = ("Pending", "Progressing", "Paused", "Ready", "Degraded", "Stalled")


def set_phase(namespace: str, name: str, phase: str) -> None:
    for known in PHASES:
        if known == phase:
            AGENT_PHASE.labels(namespace, name, known).set(1)
        else:
            forget_phase(namespace, name, known)


def forget_phase(namespace: str, name: str, phase: str | None = None) -> None:
    for known in (phase,) if phase else PHASES:
        with contextlib.suppress(KeyError):  # never set
            AGENT_PHASE.remove(namespace, name, known)
