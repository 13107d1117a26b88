"""Tracing: W3C context is continued, spans follow the HTTP and GenAI conventions, and the
trace id reaches the response and the audit record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from agent_contract.config import ObservabilityConfig, Permission, SecurityLevel
from agent_runtime.app import create_app
from agent_runtime.operations import BUILTINS, Operation
from agent_runtime.settings import Settings
from agent_runtime.state import AUDIT
from agent_runtime.tracing import make_tracer_provider
from tests.runtime.conftest import login, make_layout

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


async def _client(
    aiohttp_client: Any, tmp_path: Path, ratio: float, extra: dict[str, Operation] | None = None
) -> tuple[Any, InMemorySpanExporter]:
    config_file = make_layout(
        tmp_path / "agent", extra_names=list(extra or {}), observability={"traceSampleRatio": ratio}
    )
    settings = Settings.load(str(config_file))
    exporter = InMemorySpanExporter()
    provider = make_tracer_provider(ObservabilityConfig(service_name="test-agent", trace_sample_ratio=ratio), "test")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    operations = {**BUILTINS, **(extra or {})}
    return await aiohttp_client(create_app(settings, operations, tracer_provider=provider)), exporter


async def test_incoming_traceparent_is_continued(aiohttp_client: Any, tmp_path: Path) -> None:
    client, exporter = await _client(aiohttp_client, tmp_path, ratio=0.0)  # the caller's "sampled" flag wins
    token = (await login(client, "ada"))["access_token"]
    exporter.clear()
    response = await client.post(
        "/v1/operations/ping",
        json={},
        headers={"Authorization": f"Bearer {token}", "traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"},
    )
    assert response.status == 200
    assert response.headers["X-Trace-ID"] == PARENT_TRACE
    assert (await response.json())["trace_id"] == PARENT_TRACE
    spans = {span.name: span for span in exporter.get_finished_spans()}
    server = spans["POST /v1/operations/{name}"]
    assert f"{server.context.trace_id:032x}" == PARENT_TRACE
    assert server.parent is not None
    assert f"{server.parent.span_id:016x}" == PARENT_SPAN
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/v1/operations/{name}"
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.response.status_code"] == 200
    tool = spans["execute_tool ping"]
    assert tool.attributes is not None
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool.attributes["gen_ai.tool.name"] == "ping"
    assert tool.parent is not None
    assert tool.parent.span_id == server.context.span_id
    record = next(r for r in reversed(client.app[AUDIT].recent) if r["action"] == "ping")
    assert record["trace_id"] == PARENT_TRACE


async def test_sampling_ratio_comes_from_config(aiohttp_client: Any, tmp_path: Path) -> None:
    client, exporter = await _client(aiohttp_client, tmp_path, ratio=0.0)
    response = await client.get("/healthz")
    assert len(response.headers["X-Trace-ID"]) == 32  # a trace id even when not sampled
    assert exporter.get_finished_spans() == ()


async def test_spans_and_metrics_name_route_templates_never_identifiers(aiohttp_client: Any, tmp_path: Path) -> None:
    """A GDPR export names its subject in the path: spans (names and attributes) and metric labels
    carry the route template instead, for answered, refused and unmatched requests alike."""
    client, exporter = await _client(aiohttp_client, tmp_path, ratio=1.0)
    token = (await login(client, "ada"))["access_token"]
    exporter.clear()
    subject = "alice@example.com"
    await client.get(f"/v1/gdpr/subjects/{subject}/export", headers={"Authorization": f"Bearer {token}"})
    await client.delete(f"/v1/gdpr/subjects/{subject}")  # no token: 401
    await client.get(f"/v1/nothing-here/{subject}")  # no route: 404
    spans = exporter.get_finished_spans()
    server_spans = [span for span in spans if span.kind is SpanKind.SERVER]
    assert [span.name for span in server_spans] == [
        "GET /v1/gdpr/subjects/{subject}/export",
        "DELETE /v1/gdpr/subjects/{subject}",
        "GET",
    ]
    assert server_spans[0].attributes is not None
    assert server_spans[0].attributes["http.route"] == "/v1/gdpr/subjects/{subject}/export"
    for span in spans:
        assert "alice" not in span.name
        assert not any("alice" in str(value) for value in (span.attributes or {}).values()), span.name
    metrics = await (await client.get("/metrics")).text()
    assert 'route="/v1/gdpr/subjects/{subject}/export"' in metrics
    assert "alice" not in metrics


async def test_an_operation_that_fails_leaves_error_spans_and_its_own_spans_nest_in_its_span(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """Inside an operation its execute_tool span is the current one (a span the operation makes is
    its child); an exception out of it sets that span's status to ERROR with the exception as an
    event, and the server span of the 500 answer is an ERROR too."""
    seen: list[int] = []

    async def fails(_: object) -> dict[str, Any]:
        seen.append(trace.get_current_span().get_span_context().span_id)
        raise RuntimeError("the operation broke")

    failing = {"fails": Operation("fails", Permission.EXECUTE, SecurityLevel.PUBLIC, fails, "raises")}
    client, exporter = await _client(aiohttp_client, tmp_path, ratio=1.0, extra=failing)
    token = (await login(client, "ada"))["access_token"]
    exporter.clear()
    response = await client.post("/v1/operations/fails", json={}, headers={"Authorization": f"Bearer {token}"})
    assert response.status == 500
    spans = {span.name: span for span in exporter.get_finished_spans()}
    tool, server = spans["execute_tool fails"], spans["POST /v1/operations/{name}"]
    assert seen == [tool.context.span_id]
    assert tool.parent is not None
    assert tool.parent.span_id == server.context.span_id
    assert tool.status.status_code is StatusCode.ERROR
    assert tool.status.description == "RuntimeError: the operation broke"
    assert [event.name for event in tool.events] == ["exception"]
    assert tool.attributes is not None
    assert tool.attributes["agent.security_level"] == "public"
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 500
    assert server.attributes["client.address"] == "127.0.0.1"
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left current after the request
