"""Health, readiness, metrics, load shedding and timeouts, seen over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent_contract.config import Permission, SecurityLevel
from agent_runtime.app import breaker
from agent_runtime.metrics import REQUEST_BUCKETS, RuntimeMetrics
from agent_runtime.operations import Operation
from agent_runtime.state import BULKHEADS
from tests.runtime.conftest import AppFactory, login


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_requests_by_route_template_operations_and_failures(make_client: AppFactory) -> None:
    client = await make_client()
    token = (await login(client, "ada"))["access_token"]
    for _ in range(3):
        assert (
            await client.post("/v1/operations/ping", json={}, headers={"Authorization": f"Bearer {token}"})
        ).status == 200
    assert (await client.post("/v1/operations/ping", json={}, headers={"Authorization": "Bearer nope"})).status == 401
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    found = samples(await response.text())
    route = (("method", "POST"), ("route", "/v1/operations/{name}"), ("status", "200"))
    assert found[("agent_http_requests_total", route)] == 3
    assert (
        found[
            ("agent_http_requests_total", (("method", "POST"), ("route", "/v1/operations/{name}"), ("status", "401")))
        ]
        == 1
    )
    assert found[("agent_operations_total", (("operation", "ping"), ("result", "success")))] == 3
    assert found[("agent_auth_failures_total", (("reason", "malformed token"),))] == 1
    assert found[("agent_audit_records_total", ())] >= 5
    assert found[("agent_audit_write_seconds_count", ())] >= 1
    assert found[("agent_bulkhead_capacity", (("operation", "ping"),))] == 16
    assert ("process_cpu_seconds_total", ()) in found
    assert not any("ada" in str(labels) for _, labels in found)  # no user ids in labels


async def test_health_and_readiness(make_client: AppFactory) -> None:
    client = await make_client()
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    body = await ready.json()
    assert ready.status == 200
    assert set(body["checks"]) == {"config", "keys", "audit", "operations", "dependencies", "state"}
    assert body["checks"]["state"] == {"ok": True, "backend": "sqlite"}
    assert all(check["ok"] for check in body["checks"].values())

    model = breaker(client.app, "model-endpoint")
    for _ in range(10):
        model.allow()
        model.record(False)
    await asyncio.sleep(1.1)  # past the readiness cache, which exists so probes cannot become load
    unready = await client.get("/readyz")
    assert unready.status == 503
    assert (await unready.json())["checks"]["dependencies"] == {"ok": False, "circuits": {"model-endpoint": "open"}}
    found = samples(await (await client.get("/metrics")).text())
    assert found[("agent_circuit_breaker_state", (("dependency", "model-endpoint"),))] == 1


async def test_full_queue_sheds_with_503_and_slow_operations_time_out(make_client: AppFactory) -> None:
    release = asyncio.Event()

    async def slow(payload: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return {"done": True}

    slow_op = Operation("slow", Permission.EXECUTE, SecurityLevel.PUBLIC, slow, "waits for the test")
    client = await make_client(
        extra_operations={"slow": slow_op},
        resilience={"maxConcurrentPerOperation": 1, "maxQueuedPerOperation": 0, "operationTimeoutSeconds": 0.5},
    )
    token = (await login(client, "ada"))["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    first = asyncio.create_task(client.post("/v1/operations/slow", json={}, headers=headers))
    while _in_use(client) < 1:
        await asyncio.sleep(0.01)
    shed = await client.post("/v1/operations/slow", json={}, headers=headers)
    assert shed.status == 503
    assert shed.headers["Retry-After"] == "1"
    assert (await shed.json())["code"] == "overloaded"
    timed_out = await first
    assert timed_out.status == 504
    assert (await timed_out.json())["code"] == "operation_timeout"
    release.set()


def _in_use(client: Any) -> int:
    return int(client.app[BULKHEADS]["slow"].in_use)


def test_request_tallies_expose_what_prometheus_clients_own_counter_and_histogram_would() -> None:
    """The per-request metrics are tallied as plain numbers and made into samples when scraped:
    the exposition is the one prometheus-client's Counter and Histogram give for the same calls,
    bucket bounds included (a duration equal to a bound falls in that bound's bucket)."""
    ours = RuntimeMetrics()
    registry = CollectorRegistry()
    requests = Counter("agent_http_requests_total", "x", ["route", "method", "status"], registry=registry)
    durations = Histogram(
        "agent_http_request_duration_seconds", "x", ["route", "method"], buckets=REQUEST_BUCKETS, registry=registry
    )
    operations = Counter("agent_operations_total", "x", ["operation", "result"], registry=registry)
    calls = [
        ("/v1/operations/{name}", "POST", "200", 0.0),
        ("/v1/operations/{name}", "POST", "200", 0.005),
        ("/v1/operations/{name}", "POST", "503", 0.0051),
        ("/v1/operations/{name}", "POST", "200", 1.0),
        ("/readyz", "GET", "200", 300.0),
        ("/readyz", "GET", "200", 301.5),
        ("unmatched", "GET", "404", 0.02),
    ]
    for route, method, status, seconds in calls:
        ours.observe_request(route, method, status, seconds)
        requests.labels(route, method, status).inc()
        durations.labels(route, method).observe(seconds)
    for operation, result in [("ping", "success"), ("ping", "success"), ("ping", "timeout"), ("chat", "error")]:
        ours.count_operation(operation, result)
        operations.labels(operation, result).inc()
    names = ("agent_http_requests", "agent_http_request_duration_seconds", "agent_operations")

    def exposed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        # _created holds the time of the first call: when, not what, so only its presence is compared.
        return {
            key: 0.0 if key[0].endswith("_created") else value
            for key, value in samples(text).items()
            if key[0].startswith(names)
        }

    expected = exposed(generate_latest(registry).decode())
    assert len(expected) > 40
    assert exposed(ours.exposition().decode()) == expected
