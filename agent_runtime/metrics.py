"""Prometheus metrics of one runtime, on a registry of its own (no module globals), so several
apps in one process (tests) never share counters. Names follow the Prometheus conventions: a
unit suffix, ``_total`` for counters, and labels without user ids or other unbounded values."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from agent_runtime.genai import GenAIMetrics

# Agent work can take minutes (a model call, a long report): buckets go that far.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter(
            "agent_http_requests_total", "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"], registry=self.registry,
        )  # fmt: skip
        self.request_duration = Histogram(
            "agent_http_request_duration_seconds", "Time to answer an HTTP request, by route template and method.",
            ["route", "method"], buckets=REQUEST_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.operations = Counter(
            "agent_operations_total",
            "Operations run, by operation and result.",
            ["operation", "result"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "agent_auth_failures_total",
            "Failed logins and refused tokens, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.audit_write = Histogram(
            "agent_audit_write_seconds", "Time to append and fsync one batch of audit records.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=self.registry,
        )  # fmt: skip
        self.audit_records = Counter("agent_audit_records_total", "Audit records written.", registry=self.registry)
        self.circuit_state = Gauge(
            "agent_circuit_breaker_state", "Circuit breaker state by dependency: 0 closed, 1 open, 2 half-open.",
            ["dependency"], registry=self.registry,
        )  # fmt: skip
        self.bulkhead_in_use = Gauge(
            "agent_bulkhead_in_use", "Calls running in an operation's bulkhead.", ["operation"], registry=self.registry
        )
        self.bulkhead_queued = Gauge(
            "agent_bulkhead_queued",
            "Calls waiting for a place in an operation's bulkhead.",
            ["operation"],
            registry=self.registry,
        )
        self.bulkhead_capacity = Gauge(
            "agent_bulkhead_capacity",
            "Concurrent calls an operation's bulkhead allows.",
            ["operation"],
            registry=self.registry,
        )
        self.shed = Counter(
            "agent_requests_shed_total",
            "Requests refused with 503 because an operation's queue was full.",
            ["operation"],
            registry=self.registry,
        )
        # spec.limits (agent_runtime/limits.py). No per-caller series: callers are unbounded.
        self.limit = Gauge(
            "agent_limit", "Configured rate limits and token budgets (spec.limits), by scope (agent or caller) and"
            " limit (requests_per_minute, tokens_per_hour, tokens_per_day); absent when unlimited.",
            ["scope", "limit"], registry=self.registry,
        )  # fmt: skip
        self.tokens_spent = Gauge(
            "agent_tokens_spent", "The agent's model tokens over the sliding hour or day, as its budget counts them"
            " (every replica together when they share state).",
            ["window"], registry=self.registry,
        )  # fmt: skip
        self.limit_exceeded = Counter(
            "agent_limit_exceeded_total", "Requests refused with 429 by a rate limit or token budget, by scope and limit.",
            ["scope", "limit"], registry=self.registry,
        )  # fmt: skip
        self.genai = GenAIMetrics(self.registry)  # token usage and model call duration (GenAI conventions)

        # Labelled children looked up once: .labels() takes a lock and builds a key on every call.
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._operation_children: dict[tuple[str, str], Any] = {}

    def observe_request(self, route: str, method: str, status: str, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, status), self.request_duration.labels(route, method))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_operation(self, operation: str, result: str) -> None:
        child = self._operation_children.get((operation, result))
        if child is None:
            child = self._operation_children[(operation, result)] = self.operations.labels(operation, result)
        child.inc()

    def observe_audit_batch(self, seconds: float, records: int) -> None:
        self.audit_write.observe(seconds)
        self.audit_records.inc(records)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
