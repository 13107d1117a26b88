"""chat against a fake OpenAI-compatible endpoint on loopback: redaction before sending, retries,
the circuit breaker opening, and the egress allow-list."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent_runtime.app import create_app
from agent_runtime.settings import Settings
from tests.runtime.conftest import login, make_layout


class FakeModel:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.fail_with: int | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(body)
        if self.fail_with is not None:
            return web.json_response({"error": "boom"}, status=self.fail_with)
        last = body["messages"][-1]["content"]
        return web.json_response(
            {
                "model": body["model"],
                "choices": [{"message": {"role": "assistant", "content": f"you said: {last}"}}],
                "usage": {"total_tokens": 7},
            }
        )


async def _setup(
    aiohttp_client: Any,
    tmp_path: Path,
    allowed: list[str],
    handler: Callable[[web.Request], Awaitable[web.Response]] | None = None,
) -> tuple[Any, FakeModel, TestServer]:
    fake = FakeModel()
    model_app = web.Application()
    model_app.router.add_post("/v1/chat/completions", handler or fake.handle)
    server = TestServer(model_app, host="127.0.0.1")
    await server.start_server()
    config_file = make_layout(
        tmp_path / "agent",
        securityLevel="confidential",
        operations=["chat"],
        model={"endpoint": str(server.make_url("")).rstrip("/"), "model": "test-model"},
        egress={"allowedHosts": allowed},
        resilience={
            "retry": {"maxAttempts": 2, "baseDelaySeconds": 0.01, "maxDelaySeconds": 0.02},
            "circuitBreaker": {"minimumThroughput": 4, "failureRatio": 0.5},
        },
    )
    try:
        client = await aiohttp_client(create_app(Settings.load(str(config_file))))
    except Exception:
        await server.close()
        raise
    return client, fake, server


async def test_personal_data_is_redacted_before_it_leaves(aiohttp_client: Any, tmp_path: Path) -> None:
    client, fake, server = await _setup(aiohttp_client, tmp_path, ["127.0.0.1"])
    try:
        token = (await login(client, "otto"))["access_token"]
        body = {
            "input": {"messages": [{"role": "user", "content": "I am jane@example.com, call me on +1 415-555-0132"}]}
        }
        response = await client.post("/v1/operations/chat", json=body, headers={"Authorization": f"Bearer {token}"})
        answer = await response.json()
        assert response.status == 200, answer
        sent = fake.received[0]["messages"][0]["content"]
        assert sent == "I am [EMAIL], call me on [PHONE]"
        assert answer["result"] == {
            "reply": f"you said: {sent}",
            "model": "test-model",
            "redactions": 2,
            "usage": {"total_tokens": 7},
        }
    finally:
        await server.close()


async def test_failures_are_retried_then_the_circuit_opens(aiohttp_client: Any, tmp_path: Path) -> None:
    client, fake, server = await _setup(aiohttp_client, tmp_path, ["127.0.0.1"])
    try:
        token = (await login(client, "otto"))["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        body = {"input": {"messages": [{"role": "user", "content": "hello"}]}}
        fake.fail_with = 503
        first = await client.post("/v1/operations/chat", json=body, headers=headers)
        assert (first.status, (await first.json())["code"]) == (502, "dependency_failed")
        assert len(fake.received) == 2  # one retry
        second = await client.post("/v1/operations/chat", json=body, headers=headers)
        assert second.status == 502
        assert len(fake.received) == 4
        third = await client.post("/v1/operations/chat", json=body, headers=headers)
        assert (third.status, (await third.json())["code"]) == (503, "dependency_unavailable")
        assert int(third.headers["Retry-After"]) >= 1
        assert len(fake.received) == 4  # the open circuit spared the endpoint
    finally:
        await server.close()


async def test_endpoint_outside_the_egress_allow_list_is_refused(aiohttp_client: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not in egress\.allowedHosts"):
        await _setup(aiohttp_client, tmp_path, ["api.openai.example"])


async def test_an_empty_allow_list_allows_no_host(aiohttp_client: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"egress\.allowedHosts is empty"):
        await _setup(aiohttp_client, tmp_path, [])


async def test_health_information_is_redacted_before_it_leaves(aiohttp_client: Any, tmp_path: Path) -> None:
    client, fake, server = await _setup(aiohttp_client, tmp_path, ["127.0.0.1"])
    try:
        token = (await login(client, "otto"))["access_token"]
        content = (
            "Patient Jane Doe, MRN 00987654, member id ABC123456, diagnosis E11.9; "
            "seen by Dr. Gregory House, reach her at jane@example.com"
        )
        body = {
            "input": {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]}
        }
        response = await client.post("/v1/operations/chat", json=body, headers={"Authorization": f"Bearer {token}"})
        assert response.status == 200, await response.text()
        sent = fake.received[0]["messages"][1]["content"]
        for identifier in ("Jane", "Doe", "00987654", "ABC123456", "E11.9", "Gregory", "House", "jane@example.com"):
            assert identifier not in sent, (identifier, sent)
        assert "diagnosis" in sent  # the question survives, only the identifiers go
        assert fake.received[0]["messages"][0]["content"] == "be brief"
        assert (await response.json())["result"]["redactions"] == 6
    finally:
        await server.close()


async def test_a_redirect_cannot_take_the_conversation_off_the_allow_list(aiohttp_client: Any, tmp_path: Path) -> None:
    """The allow-list names 127.0.0.1; a 307 to another host name must not be followed."""
    elsewhere = FakeModel()
    outside = web.Application()
    outside.router.add_post("/v1/chat/completions", elsewhere.handle)
    outside_server = TestServer(outside, host="127.0.0.1")
    await outside_server.start_server()
    target = f"http://localhost:{outside_server.port}/v1/chat/completions"

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target)

    client, _, server = await _setup(aiohttp_client, tmp_path, ["127.0.0.1"], handler=redirect)
    try:
        token = (await login(client, "otto"))["access_token"]
        body = {"input": {"messages": [{"role": "user", "content": "the quarterly numbers are 42"}]}}
        response = await client.post("/v1/operations/chat", json=body, headers={"Authorization": f"Bearer {token}"})
        answer = await response.json()
        assert (response.status, answer["code"]) == (502, "dependency_failed"), answer
        assert "redirect" in answer["message"]
        assert elsewhere.received == []  # nothing reached the host outside the list
    finally:
        await server.close()
        await outside_server.close()
