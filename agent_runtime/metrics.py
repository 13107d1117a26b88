"""Prometheus metrics of one runtime, on a registry of its own (no module globals), so several
apps in one process (tests) never share counters. Names follow the Prometheus conventions: a
unit suffix, ``_total`` for counters, and labels without user ids or other unbounded values."""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from agent_runtime.genai import GenAIMetrics

# Agent work can take minutes (a model call, a long report): buckets go that far.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        # What every request counts: plain numbers here, samples only when scraped (_RequestTallies).
        self._tallies = _RequestTallies()
        self.registry.register(self._tallies)
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

    def observe_request(self, route: str, method: str, status: str, seconds: float) -> None:
        self._tallies.observe_request(route, method, status, seconds)

    def count_operation(self, operation: str, result: str) -> None:
        self._tallies.count_operation(operation, result)

    def observe_audit_batch(self, seconds: float, records: int) -> None:
        self.audit_write.observe(seconds)
        self.audit_records.inc(records)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RequestTallies(Collector):
    """``agent_http_requests_total``, ``agent_http_request_duration_seconds`` and
    ``agent_operations_total``: counted on the event loop as plain numbers, made into samples by
    prometheus-client when scraped. Its Counter and Histogram take a lock, and the three calls
    every request made ran about 270 opcodes: 6 % of the loop's Python work on ping (counted). The loop is the only writer and the only reader (/metrics
    is answered on it), so nothing here needs a lock."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, str], list[float]] = {}  # labels -> [count, created]
        # (route, method) -> [count in each bucket (not cumulative; the last is +Inf), sum, created]
        self._durations: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        self._operations: dict[tuple[str, str], list[float]] = {}  # labels -> [count, created]

    def observe_request(self, route: str, method: str, status: str, seconds: float) -> None:
        counted = self._requests.get((route, method, status))
        if counted is None:
            counted = self._requests[(route, method, status)] = [0, time.time()]
        counted[0] += 1
        timed = self._durations.get((route, method))
        if timed is None:
            timed = self._durations[(route, method)] = ([0] * (len(REQUEST_BUCKETS) + 1), [0.0, time.time()])
        timed[0][bisect.bisect_left(REQUEST_BUCKETS, seconds)] += 1  # the first bound >= seconds: le
        timed[1][0] += seconds

    def count_operation(self, operation: str, result: str) -> None:
        counted = self._operations.get((operation, result))
        if counted is None:
            counted = self._operations[(operation, result)] = [0, time.time()]
        counted[0] += 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "agent_http_requests_total", "HTTP requests answered, by route template, method and status.",
            labels=["route", "method", "status"],
        )  # fmt: skip
        for labels, (count, created) in self._requests.items():
            requests.add_metric(labels, count, created=created)
        yield requests
        durations = HistogramMetricFamily(
            "agent_http_request_duration_seconds", "Time to answer an HTTP request, by route template and method.",
            labels=["route", "method"],
        )  # fmt: skip
        for (route, method), (counts, (total, created)) in self._durations.items():
            cumulative = itertools.accumulate(counts)
            durations.add_metric([route, method], list(zip(_BUCKET_NAMES, cumulative, strict=True)), total)
            durations.samples.append(
                Sample("agent_http_request_duration_seconds_created", {"route": route, "method": method}, created)
            )
        yield durations
        operations = CounterMetricFamily(
            "agent_operations_total", "Operations run, by operation and result.", labels=["operation", "result"]
        )
        for operation_labels, (count, created) in self._operations.items():
            operations.add_metric(operation_labels, count, created=created)
        yield operations


# The "le" label of each bucket, as prometheus-client's own Histogram writes it ("1.0", "+Inf").
_BUCKET_NAMES = [floatToGoString(bound) for bound in (*REQUEST_BUCKETS, math.inf)]  # type: ignore[no-untyped-call]
