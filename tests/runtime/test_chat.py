"""chat against a fake OpenAI-compatible endpoint on loopback (tests/fake_model.py), through the
runtime's HTTP API: redaction before sending, retries and the circuit breaker, the egress
allow-list, the API key and a private CA, max_tokens capped, token accounting (GenAI metrics,
spans, the audit record, the budget) and streaming as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from agent_contract.config import ObservabilityConfig
from agent_runtime import operation_routes
from agent_runtime.app import create_app
from agent_runtime.settings import Settings
from agent_runtime.state import AUDIT
from agent_runtime.tracing import make_tracer_provider
from tests.fake_model import FakeModel, count_tokens, make_tls
from tests.runtime.conftest import login, make_layout

Client = TestClient[web.Request, web.Application]
CHAT = "/v1/operations/chat"
SSE = {"Accept": "text/event-stream"}
LABELS = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai", "gen_ai_request_model": "test-model"}


class ProductionServer(TestServer):
    """Served as ``web.run_app`` (the runtime's CLI) serves: a handler is not cancelled when its
    client leaves (aiohttp's test server cancels it)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        kwargs["handler_cancellation"] = False
        return web.AppRunner(self.app, **kwargs)


async def _client(
    aiohttp_client: Any,
    tmp_path: Path,
    fake: FakeModel,
    allowed: list[str] | None = None,
    model: dict[str, Any] | None = None,
    production: bool = False,
    exporter: InMemorySpanExporter | None = None,
    **config: Any,
) -> Client:
    config_file = make_layout(
        tmp_path / f"agent-{len(list(tmp_path.iterdir()))}",
        securityLevel="confidential",
        operations=["chat", "ping"],
        model={"baseUrl": fake.base_url, "model": "test-model", "apiKeyEnv": None, **(model or {})},
        egress={"allowedHosts": ["127.0.0.1"] if allowed is None else allowed},
        resilience={
            "retry": {"maxAttempts": 2, "baseDelaySeconds": 0.01, "maxDelaySeconds": 0.02},
            "circuitBreaker": {"minimumThroughput": 4, "failureRatio": 0.5},
            **config.pop("resilience", {}),
        },
        observability={"traceSampleRatio": 1.0 if exporter else 0.0},
        **config,
    )
    provider = None
    if exporter is not None:
        provider = make_tracer_provider(ObservabilityConfig(service_name="test-agent"), "test")
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(Settings.load(str(config_file)), tracer_provider=provider)
    client: Client = await aiohttp_client(ProductionServer(app) if production else app)
    return client


async def _headers(client: Client, user: str = "otto") -> dict[str, str]:
    return {"Authorization": f"Bearer {(await login(client, user))['access_token']}"}


def _ask(content: str = "hello there", **changes: Any) -> dict[str, Any]:
    return {"input": {"messages": [{"role": "user", "content": content}], **changes}}


async def _events(response: ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Server-Sent Events as a client parses them: (event name, JSON data); comments skipped."""
    name, data = "message", list[str]()
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())


async def _all_events(response: ClientResponse) -> list[tuple[str, dict[str, Any]]]:
    return [event async for event in _events(response)]


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _metrics(client: Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return _samples(await (await client.get("/metrics")).text())


def _sample(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset({**LABELS, **labels}.items())))


def _chat_records(client: Client) -> list[dict[str, Any]]:
    return [r for r in client.app[AUDIT].recent if r.get("type") == "operation" and r.get("action") == "chat"]


async def _until(condition: Callable[[], Awaitable[bool] | bool], what: str, seconds: float = 10) -> None:
    """Waits for a condition the runtime reaches on its own (after the answer, say)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        outcome = condition()
        if outcome if isinstance(outcome, bool) else await outcome:
            return
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


# --- the request the model gets ---


async def test_personal_data_is_redacted_before_it_leaves(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    client = await _client(aiohttp_client, tmp_path, fake_model)
    body = _ask("I am jane@example.com, call me on +1 415-555-0132")
    response = await client.post(CHAT, json=body, headers=await _headers(client))
    answer = await response.json()
    assert response.status == 200, answer
    sent = fake_model.received[0].body["messages"][0]["content"]
    assert sent == "I am [EMAIL], call me on [PHONE]"
    words = count_tokens(sent)
    assert answer["result"] == {
        "reply": f"you said: {sent}",
        "model": "test-model",
        "redactions": 2,
        "finish_reason": "stop",
        "max_tokens": 4096,
        "usage": {"input_tokens": words, "output_tokens": words + 2, "estimated": False},
    }
    assert fake_model.received[0].body["model"] == "test-model"


async def test_health_information_is_redacted_before_it_leaves(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    client = await _client(aiohttp_client, tmp_path, fake_model)
    content = (
        "Patient Jane Doe, MRN 00987654, member id ABC123456, diagnosis E11.9; "
        "seen by Dr. Gregory House, reach her at jane@example.com"
    )
    body = {"input": {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]}}
    response = await client.post(CHAT, json=body, headers=await _headers(client))
    assert response.status == 200, await response.text()
    sent = fake_model.received[0].body["messages"][1]["content"]
    for identifier in ("Jane", "Doe", "00987654", "ABC123456", "E11.9", "Gregory", "House", "jane@example.com"):
        assert identifier not in sent, (identifier, sent)
    assert "diagnosis" in sent  # the question survives, only the identifiers go
    assert fake_model.received[0].body["messages"][0]["content"] == "be brief"
    assert (await response.json())["result"]["redactions"] == 6


async def test_the_key_is_sent_only_when_configured_and_set(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_API_KEY", "sk-default-variable")  # present, but not this endpoint's
    monkeypatch.setenv("TEST_MODEL_KEY", "sk-test-123")
    keyed = await _client(aiohttp_client, tmp_path, fake_model, model={"apiKeyEnv": "TEST_MODEL_KEY"})
    keyless = await _client(aiohttp_client, tmp_path, fake_model)  # apiKeyEnv: null
    for client in (keyed, keyless):
        response = await client.post(CHAT, json=_ask(), headers=await _headers(client))
        assert response.status == 200, await response.text()
    assert fake_model.received[0].authorization == "Bearer sk-test-123"
    assert fake_model.received[1].authorization is None
    monkeypatch.setenv("TEST_MODEL_KEY", "")  # an empty Secret key: no header, rather than "Bearer "
    response = await keyed.post(CHAT, json=_ask(), headers=await _headers(keyed))
    assert response.status == 200
    assert fake_model.received[2].authorization is None


async def test_max_tokens_is_capped_at_the_configured_maximum(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    client = await _client(aiohttp_client, tmp_path, fake_model, model={"maxOutputTokens": 3})
    headers = await _headers(client)
    asked = await client.post(CHAT, json=_ask("one two three four", max_tokens=1_000_000), headers=headers)
    result = (await asked.json())["result"]
    assert fake_model.received[-1].body["max_tokens"] == 3
    assert (result["max_tokens"], result["finish_reason"], result["reply"]) == (3, "length", "you said: one")
    default = await client.post(CHAT, json=_ask(), headers=headers)
    assert (await default.json())["result"]["max_tokens"] == 3
    assert fake_model.received[-1].body["max_tokens"] == 3
    below = await client.post(CHAT, json=_ask(max_tokens=2), headers=headers)
    assert (await below.json())["result"]["max_tokens"] == 2
    assert fake_model.received[-1].body["max_tokens"] == 2


HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"input": {"messages": [{"role": "user", "content": "x"}] * 101}}, "input.messages"),
    ({"input": {"messages": "hello"}}, "input.messages"),
    ({"input": {"messages": []}}, "input.messages"),
    ({"input": {"messages": [{"role": "root", "content": "x"}]}}, "input.messages.0.role"),
    ({"input": {"messages": [{"role": "user", "content": 42}]}}, "input.messages.0.content"),
    ({"input": {"messages": [{"role": "user", "content": "x", "name": "n"}]}}, "input.messages.0.name"),
    ({"input": {"messages": [{"role": "user", "content": "x" * 100_001}]}}, "input.messages.0.content"),
    (_ask(max_tokens="lots"), "input.max_tokens"),
    (_ask(max_tokens=0), "input.max_tokens"),
    (_ask(temperature=9), "input.temperature"),
    (_ask(model="gpt-expensive"), "input.model"),  # the model is the agent's, never the caller's
    (_ask(stream=True), "input.stream"),  # streaming is asked for with Accept, not in the input
]


async def test_hostile_input_is_refused_naming_the_field(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    """Schema violations answer 422 invalid_input (the runtime's convention for every operation;
    400 is for a body that is not a JSON object) naming the field, streamed or not, and nothing
    reaches the model."""
    client = await _client(aiohttp_client, tmp_path, fake_model)
    headers = await _headers(client)
    for body, field in HOSTILE:
        for extra in ({}, SSE):
            response = await client.post(CHAT, json=body, headers={**headers, **extra})
            answer = await response.json()
            assert (response.status, answer["code"]) == (422, "invalid_input"), (field, answer)
            assert answer["message"].startswith(f"{field}:") or f"; {field}:" in answer["message"], (field, answer)
    not_json = await client.post(CHAT, data=b"[1, 2", headers=headers)
    assert (not_json.status, (await not_json.json())["code"]) == (400, "invalid_json")
    assert fake_model.received == []


# --- failures of the endpoint ---


async def test_failures_are_retried_then_the_circuit_opens(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    client = await _client(aiohttp_client, tmp_path, fake_model)
    headers = await _headers(client)
    fake_model.fail_with = 503
    first = await client.post(CHAT, json=_ask(), headers=headers)
    assert (first.status, (await first.json())["code"]) == (502, "dependency_failed")
    assert len(fake_model.received) == 2  # one retry
    second = await client.post(CHAT, json=_ask(), headers=headers)
    assert second.status == 502
    assert len(fake_model.received) == 4
    third = await client.post(CHAT, json=_ask(), headers=headers)
    assert (third.status, (await third.json())["code"]) == (503, "dependency_unavailable")
    assert int(third.headers["Retry-After"]) >= 1
    assert len(fake_model.received) == 4  # the open circuit spared the endpoint


async def test_a_refusal_of_the_callers_input_is_422_and_not_retried(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    client = await _client(aiohttp_client, tmp_path, fake_model)
    headers = await _headers(client)
    fake_model.fail_with = 400
    for _ in range(5):  # more than the circuit's minimum throughput: it must stay closed
        refused = await client.post(CHAT, json=_ask(), headers=headers)
        answer = await refused.json()
        assert (refused.status, answer["code"]) == (422, "invalid_input"), answer
        assert "fake failure 400" in answer["message"]  # what the endpoint said
    assert len(fake_model.received) == 5
    fake_model.fail_with = 401  # the agent's key, not the caller's input: a dependency failure
    wrong_key = await client.post(CHAT, json=_ask(), headers=headers)
    assert (wrong_key.status, (await wrong_key.json())["code"]) == (502, "dependency_failed")
    assert len(fake_model.received) == 6  # not retried either


async def test_endpoint_outside_the_egress_allow_list_is_refused(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    with pytest.raises(ValueError, match=r"model\.baseUrl .* is not in egress\.allowedHosts"):
        await _client(aiohttp_client, tmp_path, fake_model, allowed=["api.openai.example"])


async def test_an_empty_allow_list_allows_no_host(aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel) -> None:
    with pytest.raises(ValueError, match=r"egress\.allowedHosts is empty"):
        await _client(aiohttp_client, tmp_path, fake_model, allowed=[])


async def test_a_redirect_cannot_take_the_conversation_off_the_allow_list(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    """The allow-list names 127.0.0.1; a 307 to another host name must not be followed."""
    async with FakeModel() as elsewhere:
        fake_model.redirect_to = f"http://localhost:{elsewhere.port}/v1/chat/completions"
        client = await _client(aiohttp_client, tmp_path, fake_model)
        headers = await _headers(client)
        for extra in ({}, SSE):
            response = await client.post(CHAT, json=_ask("the quarterly numbers are 42"), headers={**headers, **extra})
            answer = await response.json()
            assert (response.status, answer["code"]) == (502, "dependency_failed"), answer
            assert "redirect" in answer["message"]
        assert elsewhere.received == []  # nothing reached the host outside the list


async def test_a_private_ca_is_trusted_only_through_the_bundle(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = make_tls(tmp_path / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))  # trusted only where the bundle is given
    async with FakeModel(tls=tls) as fake:
        assert fake.base_url.startswith("https://")
        trusting = await _client(aiohttp_client, tmp_path, fake, model={"caBundleFile": str(tls.ca_file)})
        response = await trusting.post(CHAT, json=_ask(), headers=await _headers(trusting))
        assert response.status == 200, await response.text()
        assert (await response.json())["result"]["reply"] == "you said: hello there"

        monkeypatch.delenv("SSL_CERT_FILE")
        system_trust = await _client(aiohttp_client, tmp_path, fake)
        refused = await system_trust.post(CHAT, json=_ask(), headers=await _headers(system_trust))
        answer = await refused.json()
        assert (refused.status, answer["code"]) == (502, "dependency_failed"), answer
        assert "model.caBundleFile" in answer["message"]
        assert len(fake.received) == 1  # the conversation was not sent to an unverified server

    with pytest.raises(ValueError, match=r"model\.caBundleFile .* cannot be read"):
        await _client(aiohttp_client, tmp_path, fake, model={"caBundleFile": str(tmp_path / "missing.pem")})
    (tmp_path / "garbage.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"model\.caBundleFile .* cannot be read"):
        await _client(aiohttp_client, tmp_path, fake, model={"caBundleFile": str(tmp_path / "garbage.pem")})


# --- token accounting ---


async def test_tokens_are_counted_in_metrics_the_audit_record_and_the_budget(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    client = await _client(aiohttp_client, tmp_path, fake_model)
    headers = await _headers(client)
    response = await client.post(CHAT, json=_ask("one two three"), headers=headers)  # 3 in, 5 out
    assert response.status == 200
    fake_model.fail_with = 500
    failed = await client.post(CHAT, json=_ask("four"), headers=headers)
    assert failed.status == 502

    found = await _metrics(client)
    usage = "gen_ai_client_token_usage"
    assert _sample(found, f"{usage}_count", gen_ai_token_type="input") == 1  # the failed call used none
    assert _sample(found, f"{usage}_sum", gen_ai_token_type="input") == 3
    assert _sample(found, f"{usage}_sum", gen_ai_token_type="output") == 5
    assert _sample(found, f"{usage}_bucket", gen_ai_token_type="output", le="4.0") == 0  # the conventions' buckets
    assert _sample(found, f"{usage}_bucket", gen_ai_token_type="output", le="16.0") == 1
    duration = "gen_ai_client_operation_duration_seconds"
    assert _sample(found, f"{duration}_count", error_type="") == 1
    assert _sample(found, f"{duration}_count", error_type="500") == 1  # one failed call, its retry inside it
    assert _sample(found, f"{duration}_bucket", error_type="", le="81.92") == 1
    # Bounded labels: the configured model, the token type or the error type, nothing else.
    label_sets = [dict(labels) for name, labels in found if name.startswith("gen_ai_")]
    assert label_sets
    for labels in label_sets:
        assert labels["gen_ai_request_model"] == "test-model"
        assert set(labels) - {"le"} in ({*LABELS, "gen_ai_token_type"}, {*LABELS, "error_type"}), labels
    assert found[("agent_tokens_spent", frozenset({("window", "hour")}))] == 8  # charged to the budget

    records = _chat_records(client)
    assert [r["result"] for r in records] == ["success", "unavailable"]
    details = records[0]["details"]
    assert (details["input_tokens"], details["output_tokens"], details["estimated"]) == (3, 5, False)
    assert (details["model"], details["max_tokens"], details["finish_reason"]) == ("test-model", 4096, "stop")
    assert "input_tokens" not in records[1]["details"]


async def test_usage_is_estimated_when_the_endpoint_reports_none(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    fake_model.report_usage = False
    client = await _client(aiohttp_client, tmp_path, fake_model)
    response = await client.post(CHAT, json=_ask("abcdefgh"), headers=await _headers(client))
    usage = (await response.json())["result"]["usage"]
    # Four characters a token: "abcdefgh" is 2; "you said: abcdefgh" (18 characters) is 5.
    assert usage == {"input_tokens": 2, "output_tokens": 5, "estimated": True}
    assert _chat_records(client)[-1]["details"]["estimated"] is True


async def test_the_model_call_has_a_genai_client_span(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    exporter = InMemorySpanExporter()
    fake_model.response_model = "test-model-2026-01-01"
    client = await _client(aiohttp_client, tmp_path, fake_model, exporter=exporter, model={"maxOutputTokens": 64})
    response = await client.post(CHAT, json=_ask("one two three"), headers=await _headers(client))
    assert response.status == 200
    spans = {span.name: span for span in exporter.get_finished_spans()}
    model_span, tool = spans["chat test-model"], spans["execute_tool chat"]
    assert model_span.kind is SpanKind.CLIENT
    assert model_span.parent is not None
    assert model_span.parent.span_id == tool.context.span_id
    assert dict(model_span.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "test-model",
        "gen_ai.request.max_tokens": 64,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.response.model": "test-model-2026-01-01",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 3,
        "gen_ai.usage.output_tokens": 5,
        "server.address": "127.0.0.1",
        "server.port": fake_model.port,
    }
    fake_model.fail_with = 429
    await client.post(CHAT, json=_ask(), headers=await _headers(client))
    failed = [span for span in exporter.get_finished_spans() if span.name == "chat test-model"][-1]
    assert (failed.attributes or {})["error.type"] == "429"
    assert not failed.status.is_ok


# --- streaming ---


async def test_a_stream_relays_the_tokens_in_order_then_the_usage(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    client = await _client(aiohttp_client, tmp_path, fake_model)
    response = await client.post(CHAT, json=_ask("alpha beta gamma"), headers={**await _headers(client), **SSE})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert len(response.headers["X-Request-ID"]) == 16
    events = await _all_events(response)
    deltas = [data["delta"] for name, data in events if name == "message"]
    assert deltas == ["you", " said:", " alpha", " beta", " gamma"]
    assert events[-1] == (
        "done",
        {
            "finish_reason": "stop",
            "model": "test-model",
            "redactions": 0,
            "max_tokens": 4096,
            "usage": {"input_tokens": 3, "output_tokens": 5, "estimated": False},
        },
    )
    sent = fake_model.received[0].body
    assert (sent["stream"], sent["stream_options"]) == (True, {"include_usage": True})

    records = _chat_records(client)
    assert len(records) == 1
    assert records[0]["result"] == "success"
    details = records[0]["details"]
    assert (details["stream"], details["events"], details["input_tokens"], details["output_tokens"]) == (
        True, 6, 3, 5,
    )  # fmt: skip
    found = await _metrics(client)
    assert _sample(found, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == 5
    assert _sample(found, "gen_ai_client_operation_duration_seconds_count", error_type="") == 1
    assert found[("agent_tokens_spent", frozenset({("window", "hour")}))] == 8
    assert found[("agent_operations_total", frozenset({("operation", "chat"), ("result", "success")}))] == 1

    plain = await client.post(CHAT, json=_ask("alpha"), headers=await _headers(client))  # unchanged without SSE
    assert (await plain.json())["result"]["reply"] == "you said: alpha"


@pytest.mark.parametrize("production", [False, True], ids=["handler-cancelled", "handler-not-cancelled"])
async def test_a_client_that_leaves_mid_stream_stops_the_model_and_is_audited(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch, production: bool
) -> None:
    """The model goes silent after two tokens and the client leaves: the runtime closes its
    request to the model (the fake sees it), audits once with the tokens used, and charges them.
    Without handler cancellation (how the runtime is served) the keep-alive notices."""
    monkeypatch.setattr(operation_routes, "SSE_PING_SECONDS", 0.05)
    fake_model.stall_after = 2
    client = await _client(aiohttp_client, tmp_path, fake_model, production=production)
    response = await client.post(CHAT, json=_ask("alpha beta gamma"), headers={**await _headers(client), **SSE})
    deltas = []
    async for _, data in _events(response):
        deltas.append(data["delta"])
        if len(deltas) == 2:
            break
    assert deltas == ["you", " said:"]
    await asyncio.wait_for(fake_model.stalled.wait(), 10)
    response.close()
    await asyncio.wait_for(fake_model.client_left.wait(), 10)  # the upstream request was closed
    await _until(lambda: bool(_chat_records(client)), "no audit record of the stream")
    [record] = _chat_records(client)
    assert record["result"] == "client_disconnected"
    details = record["details"]
    # Cut off before the usage chunk: estimated at 4 characters a token ("you said:" is 9: 3), and
    # never less than a token a chunk.
    assert (details["input_tokens"], details["output_tokens"], details["estimated"]) == (4, 3, True)
    found = await _metrics(client)
    assert found[("agent_tokens_spent", frozenset({("window", "hour")}))] == 7
    assert _sample(found, "gen_ai_client_operation_duration_seconds_count", error_type="cancelled") == 1
    fake_model.stall_after = None
    after = await client.post(CHAT, json=_ask(), headers=await _headers(client))
    assert after.status == 200


async def test_a_model_failing_mid_stream_ends_it_with_an_error_event(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    fake_model.break_after = 3
    client = await _client(aiohttp_client, tmp_path, fake_model)
    response = await client.post(CHAT, json=_ask("alpha beta gamma"), headers={**await _headers(client), **SSE})
    assert response.status == 200
    events = await _all_events(response)
    assert [data.get("delta") for _, data in events[:-1]] == ["you", " said:", " alpha"]
    name, error = events[-1]
    assert (name, error["code"]) == ("error", "dependency_failed")
    assert "model stream broke off" in error["message"]
    assert len(fake_model.received) == 1  # nothing is retried once tokens were relayed
    [record] = _chat_records(client)
    assert record["result"] == "unavailable"
    assert (record["details"]["output_tokens"], record["details"]["estimated"]) == (4, True)  # "you said: alpha"
    found = await _metrics(client)
    assert _sample(found, "gen_ai_client_operation_duration_seconds_count", error_type="ClientPayloadError") == 1


async def test_a_stream_is_retried_only_before_its_first_byte(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    # A circuit that stays closed through the failures below.
    client = await _client(
        aiohttp_client, tmp_path, fake_model, resilience={"circuitBreaker": {"minimumThroughput": 10}}
    )
    headers = {**await _headers(client), **SSE}
    fake_model.fail_next(503)
    retried = await client.post(CHAT, json=_ask(), headers=headers)
    assert [name for name, _ in await _all_events(retried)][-1] == "done"
    assert len(fake_model.received) == 2
    fake_model.fail_with = 400
    refused = await client.post(CHAT, json=_ask(), headers=headers)
    assert (refused.status, (await refused.json())["code"]) == (422, "invalid_input")
    fake_model.fail_with = 500  # every attempt: an HTTP error, no stream begun
    failed = await client.post(CHAT, json=_ask(), headers=headers)
    assert (failed.status, (await failed.json())["code"]) == (502, "dependency_failed")
    assert failed.headers["Content-Type"].startswith("application/json")
    assert [r["result"] for r in _chat_records(client)] == ["success", "unavailable"]  # 422s are only counted


async def test_the_operation_timeout_ends_a_stream_with_an_error_event(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    fake_model.stall_after = 1
    client = await _client(aiohttp_client, tmp_path, fake_model, resilience={"operationTimeoutSeconds": 0.5})
    response = await client.post(CHAT, json=_ask(), headers={**await _headers(client), **SSE})
    events = await _all_events(response)
    assert events[0] == ("message", {"delta": "you"})
    assert (events[-1][0], events[-1][1]["code"]) == ("error", "operation_timeout")
    await asyncio.wait_for(fake_model.client_left.wait(), 10)
    [record] = _chat_records(client)
    assert (record["result"], record["details"]["output_tokens"]) == ("timeout", 1)


async def test_streams_pass_the_same_checks_as_any_operation(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Authentication, authorisation, GDPR consent and the bulkhead apply before a byte is streamed."""
    fake_model.stall_after = 0
    client = await _client(
        aiohttp_client,
        tmp_path,
        fake_model,
        compliance={"frameworks": ["GDPR"]},
        resilience={"maxConcurrentPerOperation": 1, "maxQueuedPerOperation": 0},
    )
    body = {**_ask(), "subject": "jane@example.com", "purpose": "support"}
    anonymous = await client.post(CHAT, json=body, headers=SSE)
    assert anonymous.status == 401
    viewer = await client.post(CHAT, json=body, headers={**await _headers(client, "vic"), **SSE})
    assert (viewer.status, (await viewer.json())["code"]) == (403, "forbidden")
    operator = {**await _headers(client), **SSE}
    no_consent = await client.post(CHAT, json=body, headers=operator)
    assert (no_consent.status, (await no_consent.json())["code"]) == (403, "consent_required")
    assert fake_model.received == []
    granted = await client.post(
        "/v1/gdpr/consents",
        json={"subject": "jane@example.com", "purpose": "support", "granted": True},
        headers=operator,
    )
    assert granted.status == 201

    first = asyncio.create_task(client.post(CHAT, json=body, headers=operator))
    await asyncio.wait_for(fake_model.stalled.wait(), 10)  # holds the one place in the bulkhead
    shed = await client.post(CHAT, json=body, headers=operator)
    assert (shed.status, (await shed.json())["code"]) == (503, "overloaded")
    fake_model.released.set()
    streamed = await first
    assert [name for name, _ in await _all_events(streamed)][-1] == "done"


async def test_an_operation_that_does_not_stream_answers_json_or_406(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    client = await _client(aiohttp_client, tmp_path, fake_model)
    headers = await _headers(client)
    only_sse = await client.post("/v1/operations/ping", json={}, headers={**headers, **SSE})
    assert (only_sse.status, (await only_sse.json())["code"]) == (406, "not_acceptable")
    either = {"Accept": "text/event-stream, application/json;q=0.5"}
    answered = await client.post("/v1/operations/ping", json={}, headers={**headers, **either})
    assert (answered.status, (await answered.json())["result"]) == (200, {"pong": True})
    refused_sse = {"Accept": "text/event-stream;q=0, application/json"}
    plain = await client.post(CHAT, json=_ask(), headers={**headers, **refused_sse})
    assert (await plain.json())["result"]["reply"] == "you said: hello there"
    paths = (await (await client.get("/openapi.json")).json())["paths"]
    assert "text/event-stream" in paths[CHAT]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" not in paths["/v1/operations/ping"]["post"]["responses"]["200"]["content"]
    assert "406" in paths["/v1/operations/ping"]["post"]["responses"]


async def test_the_callers_budget_is_charged_what_chat_used_streamed_or_not(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    """perCaller.tokensPerHour of 12: a chat of 8 tokens, then a stream of 8, then no more."""
    client = await _client(aiohttp_client, tmp_path, fake_model, limits={"perCaller": {"tokensPerHour": 12}})
    headers = await _headers(client)
    assert (await client.post(CHAT, json=_ask("one two three"), headers=headers)).status == 200
    streamed = await client.post(CHAT, json=_ask("one two three"), headers={**headers, **SSE})
    assert [name for name, _ in await _all_events(streamed)][-1] == "done"  # 8 of 12 spent: admitted
    refused = await client.post(CHAT, json=_ask(), headers={**headers, **SSE})
    answer = await refused.json()
    assert (refused.status, answer["code"], answer["limit"]) == (429, "limit_exceeded", "perCaller.tokensPerHour")
    assert len(fake_model.received) == 2
    other = await client.post(CHAT, json=_ask(), headers=await _headers(client, "ana"))  # another caller's budget
    assert other.status == 200


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_chats_in_flight_hold_the_budget_so_parallel_calls_cannot_overspend_it(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel, stream: bool
) -> None:
    """perCaller.tokensPerHour of 100, nothing spent yet, and five chats sent at once while the model
    holds its answers: the first holds its most (its input and maxOutputTokens) until it has been
    charged, so the other four are refused at once instead of all five being admitted on a budget
    none of them has been charged to yet (each could spend maxOutputTokens)."""
    fake_model.stall_after = 0
    client = await _client(aiohttp_client, tmp_path, fake_model, limits={"perCaller": {"tokensPerHour": 100}})
    headers = {**await _headers(client), **(SSE if stream else {})}
    calls = [asyncio.create_task(client.post(CHAT, json=_ask(), headers=headers)) for _ in range(5)]
    await asyncio.wait_for(fake_model.stalled.wait(), 10)
    await _until(
        lambda: sum(call.done() for call in calls) == 4 or len(fake_model.received) == 5, "no call refused or sent"
    )
    fake_model.released.set()
    answers = await asyncio.gather(*calls)
    assert len(fake_model.received) == 1
    assert sorted(answer.status for answer in answers) == [200] + [429] * 4
    for refused in (answer for answer in answers if answer.status == 429):
        body = await refused.json()
        assert (body["code"], body["limit"]) == ("limit_exceeded", "perCaller.tokensPerHour")
        assert "in progress" in body["message"], body
        assert refused.headers["Retry-After"] == "1"  # the calls in progress end soon, not in an hour
    [admitted] = [answer for answer in answers if answer.status == 200]
    if stream:
        assert [name for name, _ in await _all_events(admitted)][-1] == "done"
    # Charged what it used (6 tokens of the fake's count), its hold given back: the next is admitted.
    fake_model.stall_after = None
    assert (await client.post(CHAT, json=_ask(), headers=headers)).status == 200


async def test_an_approved_chat_is_held_to_the_requesters_budget_and_stays_pending_when_refused(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    """SOX: otto asks for two chats while his budget is untouched (both wait for approval); the first,
    approved, spends it all; approving the second is refused with a 429 (his budget, not the
    approver's), leaves it pending to approve once the budget allows, and never reaches the model."""
    client = await _client(
        aiohttp_client,
        tmp_path,
        fake_model,
        compliance={"frameworks": ["SOX"], "financialOperations": ["chat"]},
        limits={"perCaller": {"tokensPerHour": 5}},
    )
    maker, checker = await _headers(client, "otto"), await _headers(client, "ada")
    first, second = [
        (await (await client.post(CHAT, json=_ask(), headers=maker)).json())["approval_id"] for _ in range(2)
    ]
    approved = await client.post(f"/v1/approvals/{first}", json={"decision": "approve"}, headers=checker)
    assert approved.status == 200, await approved.text()
    assert (await approved.json())["result"]["usage"]["input_tokens"] == 2  # and 4 output: 6 of otto's 5
    refused = await client.post(f"/v1/approvals/{second}", json={"decision": "approve"}, headers=checker)
    body = await refused.json()
    assert (refused.status, body["code"], body["limit"]) == (429, "limit_exceeded", "perCaller.tokensPerHour")
    assert int(refused.headers["Retry-After"]) > 60
    assert len(fake_model.received) == 1
    pending = (await (await client.get("/v1/approvals", headers=checker)).json())["pending"]
    assert [approval["id"] for approval in pending] == [second]
    # The approver's own budget is untouched: ada chats at once.
    assert (await client.post(CHAT, json=_ask(), headers=checker)).status == 202


async def test_the_agents_key_never_reaches_the_caller_or_the_audit_trail_in_what_the_endpoint_says(
    aiohttp_client: Any,
    tmp_path: Path,
    fake_model: FakeModel,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Gateways echo the key they refuse (OpenAI's 401 shows part of it, some proxies all of it):
    a refusal of the agent's key says nothing of the endpoint's answer to the caller (it goes to the
    agent's log, the key scrubbed); what a caller is told of its own refusal, or of an error inside a
    stream, never holds the key."""
    key = "sk-test-0123456789abcdef"
    monkeypatch.setenv("TEST_MODEL_KEY", key)
    client = await _client(aiohttp_client, tmp_path, fake_model, model={"apiKeyEnv": "TEST_MODEL_KEY"})
    headers = await _headers(client)
    fake_model.error_message = f"Incorrect API key provided: {key}. Find yours at https://platform.example/keys"
    fake_model.fail_with = 401
    wrong_key = await client.post(CHAT, json=_ask(), headers=headers)
    answer = await wrong_key.json()
    assert (wrong_key.status, answer["code"]) == (502, "dependency_failed")
    assert "(401)" in answer["message"]
    assert "Incorrect API key" not in answer["message"], answer
    assert "(401): Incorrect API key provided: [redacted]." in caplog.text  # for the agent's operators
    fake_model.fail_with = 400
    refused = await client.post(CHAT, json=_ask(), headers=headers)
    answer = await refused.json()
    assert (refused.status, answer["code"]) == (422, "invalid_input")
    assert "Incorrect API key provided: [redacted]." in answer["message"], answer
    fake_model.fail_with, fake_model.error_after = None, 1
    streamed = await client.post(CHAT, json=_ask(), headers={**headers, **SSE})
    name, error = (await _all_events(streamed))[-1]
    assert (name, error["code"]) == ("error", "dependency_failed")
    assert error["message"].startswith("model endpoint failed mid-stream: Incorrect API key provided: [redacted]")
    records = _chat_records(client)
    assert [r["result"] for r in records] == ["unavailable", "unavailable"]  # the 422 is only counted
    assert key not in json.dumps(records)
    assert "Incorrect API key provided: sk" not in json.dumps(records)
    assert key not in caplog.text


async def test_a_streamed_event_that_never_ends_is_cut_off_not_held_in_memory(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel
) -> None:
    """An endpoint that sends data lines and never the blank line ending the event: the runtime
    stops at MAX_EVENT_BYTES (a failure of the endpoint), long before the call's timeout."""
    fake_model.endless_after = 1
    client = await _client(aiohttp_client, tmp_path, fake_model, model={"timeoutSeconds": 600})
    response = await client.post(CHAT, json=_ask(), headers={**await _headers(client), **SSE})
    events = await asyncio.wait_for(_all_events(response), 60)
    assert events[0] == ("message", {"delta": "you"})
    name, error = events[-1]
    assert (name, error["code"]) == ("error", "dependency_failed")
    assert error["message"] == "model endpoint streamed an event of more than 1048576 bytes"
    await asyncio.wait_for(fake_model.client_left.wait(), 10)  # and the endpoint was let go


async def test_a_client_that_stops_reading_loses_its_stream_and_its_bulkhead_place_at_the_deadline(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that keeps its connection open but reads nothing: once the socket's buffers are
    full the server's transport pauses writing (asyncio's pause_writing, done here at once rather
    than by pushing megabytes through loopback's buffers). Past the operation's timeout the stream
    ends; its last bytes get a short grace and then the connection is dropped, so the call's
    bulkhead place is free for the next caller instead of held for as long as that client likes."""
    monkeypatch.setattr(operation_routes, "SSE_CLOSE_SECONDS", 0.2)
    fake_model.stall_after = 1
    client = await _client(
        aiohttp_client,
        tmp_path,
        fake_model,
        production=True,
        resilience={"operationTimeoutSeconds": 1, "maxConcurrentPerOperation": 1, "maxQueuedPerOperation": 0},
    )
    headers = await _headers(client)
    async with aiohttp.ClientSession() as own:  # its own connection, apart from the test client's pool
        stream = await own.post(client.make_url(CHAT), json=_ask(), headers={**headers, **SSE})
        assert await anext(_events(stream)) == ("message", {"delta": "you"})
        assert not await _bulkhead_free(client)  # the gauge, read when scraped, shows the place held
        assert client.server.runner is not None
        server = client.server.runner.server
        assert server is not None
        [connection] = [c for c in server.connections if c._current_request is not None]
        connection.pause_writing()  # what asyncio does when the client stops reading: its buffers are full
        await _until(lambda: bool(_chat_records(client)), "no audit record of the stream")
        assert _chat_records(client)[0]["result"] == "timeout"
        await _until(lambda: _bulkhead_free(client), "the stream still holds its bulkhead place")
        fake_model.stall_after = None
        answered = await client.post(CHAT, json=_ask(), headers=headers)
        assert answered.status == 200, await answered.text()
        stream.close()


async def _bulkhead_free(client: Client) -> bool:
    return (await _metrics(client))[("agent_bulkhead_in_use", frozenset({("operation", "chat")}))] == 0


async def test_a_stream_cut_off_before_its_usage_is_charged_at_least_its_text_not_a_token_a_chunk(
    aiohttp_client: Any, tmp_path: Path, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some endpoints send many tokens a chunk (Azure's content filter buffers them). A caller that
    leaves before the usage chunk must not be charged a token a chunk for what was many: the estimate
    is at least the text received at four characters a token."""
    monkeypatch.setattr(operation_routes, "SSE_PING_SECONDS", 0.05)
    word = "supercalifragilisticexpialidocious" * 4  # 136 characters in one chunk
    fake_model.reply = lambda _: f"{word} {word} {word}"
    fake_model.stall_after = 2
    client = await _client(aiohttp_client, tmp_path, fake_model, production=True)
    response = await client.post(CHAT, json=_ask(), headers={**await _headers(client), **SSE})
    received = ""
    async for _, data in _events(response):
        received += data["delta"]
        if len(received) > len(word):
            break
    await asyncio.wait_for(fake_model.stalled.wait(), 10)
    response.close()
    await _until(lambda: bool(_chat_records(client)), "no audit record of the stream")
    [record] = _chat_records(client)
    assert record["result"] == "client_disconnected"
    assert (record["details"]["output_tokens"], record["details"]["estimated"]) == (-(-(2 * 136 + 1) // 4), True)
