"""The operator's API client (``agent_operator.kube.Kube``) as an API server sees it: a real HTTP
server on loopback records what arrives and answers as kube-apiserver would."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

import kopf
import pytest
import yaml
from aiohttp import web

from agent_operator import kube
from agent_operator.kube import Kube, KubeError

DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "agent", "namespace": "team"},
    "spec": {"replicas": 1},
}


class FakeApiServer:
    def __init__(self) -> None:
        self.valid_token = "token-1"
        self.seen: list[dict[str, Any]] = []
        self.answer: tuple[int, dict[str, Any]] | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": list(request.query.items()),
                "headers": dict(request.headers),
                "body": json.loads(body) if body else None,
            }
        )
        if request.headers.get("Authorization") != f"Bearer {self.valid_token}":
            return web.json_response({"kind": "Status", "message": "Unauthorized", "code": 401}, status=401)
        if self.answer is not None:
            status, answer = self.answer
            return web.json_response(answer, status=status)
        return web.json_response({**(json.loads(body) if body else {}), "served": True})


@pytest.fixture
async def api_server() -> AsyncIterator[tuple[FakeApiServer, str]]:
    server = FakeApiServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield server, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def credentials(server: str, tokens: list[str]) -> Any:
    """A login that hands out the next token each time it is asked (a rotated ServiceAccount token)."""

    def connect() -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=server, scheme="Bearer", token=tokens[0] if len(tokens) == 1 else tokens.pop(0)
        )

    return connect


async def test_an_apply_is_a_server_side_apply_patch_as_our_field_manager(
    api_server: tuple[FakeApiServer, str],
) -> None:
    server, url = api_server
    client = Kube(credentials(url, ["token-1"]))
    client.identify("replica-a")
    try:
        answer = await client.apply(DEPLOYMENT)
    finally:
        await client.close()
    (request,) = server.seen
    assert request["method"] == "PATCH"
    assert request["path"] == "/apis/apps/v1/namespaces/team/deployments/agent"
    assert request["query"] == [("fieldManager", "enterprise-agent-operator"), ("force", "true")]
    assert request["headers"]["Content-Type"] == "application/apply-patch+yaml"
    assert request["headers"]["Authorization"] == "Bearer token-1"
    assert request["headers"]["User-Agent"] == "enterprise-agent-operator/0.1.0 (replica-a)"
    assert request["body"] == DEPLOYMENT
    assert answer["served"] is True


async def test_a_rotated_token_is_read_again_after_a_401_and_the_request_retried_once(
    api_server: tuple[FakeApiServer, str],
) -> None:
    server, url = api_server
    tokens = ["token-1", "token-2", "token-3"]
    client = Kube(credentials(url, tokens))  # starts with token-1
    server.valid_token = "token-2"  # the kubelet rotated it
    try:
        found = await client.get("v1", "ConfigMap", "team", "settings")
        assert [r["headers"]["Authorization"] for r in server.seen] == ["Bearer token-1", "Bearer token-2"]
        server.valid_token = "never-given"
        with pytest.raises(KubeError) as refused:
            await client.get("v1", "ConfigMap", "team", "settings")
    finally:
        await client.close()
    assert found["served"] is True
    assert refused.value.status == 401  # one retry with fresh credentials, then the error, not a loop
    assert len(server.seen) == 4


async def test_credentials_that_cannot_be_read_again_or_name_another_server_are_not_switched_to(
    api_server: tuple[FakeApiServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A kubeconfig being rewritten (the reader raises) or switched to another cluster's context:
    requests go on with the credentials in use, to the server in use, and say so in the log."""
    server, url = api_server
    answers: list[Any] = [kopf.ConnectionInfo(server=url, scheme="Bearer", token="token-1")]

    def connect() -> kopf.ConnectionInfo:
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return cast(kopf.ConnectionInfo, answer)

    client = Kube(connect)
    answers[:] = [
        yaml.YAMLError("the kubeconfig is half written"),
        kopf.ConnectionInfo(server="https://other-cluster.example:6443", scheme="Bearer", token="other-token"),
    ]
    try:
        await client._reauthorize()  # what a 401 or the minute's refresh does
        await client._reauthorize()
        found = await client.get("v1", "ConfigMap", "team", "settings")
    finally:
        await client.close()
    assert found["served"] is True
    assert [r["headers"]["Authorization"] for r in server.seen] == ["Bearer token-1"]
    assert "the kubeconfig is half written" in caplog.text
    assert "other-cluster.example" in caplog.text


async def test_a_refusal_keeps_the_api_servers_status_and_message(api_server: tuple[FakeApiServer, str]) -> None:
    server, url = api_server
    server.answer = (422, {"kind": "Status", "message": "spec.replicas: Invalid value: -1", "code": 422})
    client = Kube(credentials(url, ["token-1"]))
    try:
        with pytest.raises(KubeError) as refused:
            await client.create(DEPLOYMENT)
    finally:
        await client.close()
    assert refused.value.status == 422
    assert "spec.replicas: Invalid value: -1" in str(refused.value)


async def test_no_answer_is_status_zero() -> None:
    client = Kube(credentials("http://127.0.0.1:9", ["token-1"]))  # the discard port: nothing listens
    try:
        with pytest.raises(KubeError) as failed:
            await client.get("v1", "ConfigMap", "team", "settings")
    finally:
        await client.close()
    assert failed.value.status == 0


async def test_a_watch_that_goes_silent_fails_instead_of_seeming_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """A half-open connection or a stuck proxy sends nothing, not even the bookmark the API server
    sends every minute: the watch must end with an error (its users then read instead), not wait
    until its own end."""
    monkeypatch.setattr(kube, "WATCH_IDLE_SECONDS", 1)
    hang = web.Application()
    silent = asyncio.Event()

    async def one_bookmark_then_nothing(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b'{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"7"}}}\n')
        await silent.wait()  # never set: the connection stays open and says nothing
        return response

    hang.router.add_get("/{tail:.*}", one_bookmark_then_nothing)
    runner = web.AppRunner(hang)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = Kube(credentials(f"http://127.0.0.1:{runner.addresses[0][1]}", ["token-1"]))
    seen: list[str] = []

    async def follow() -> None:
        async for event_type, _ in client.watch_metadata("v1", "Service", None, "1", 300):
            seen.append(event_type)

    try:
        with pytest.raises(KubeError) as failed:
            await asyncio.wait_for(follow(), 10)  # TimeoutError instead: the silence went unnoticed
    finally:
        await client.close()
        silent.set()
        await runner.cleanup()
    assert seen == ["BOOKMARK"]
    assert failed.value.status == 0


def test_without_a_pod_or_a_kubeconfig_the_error_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubeError, match=re.escape("no KUBECONFIG or ~/.kube/config")):
        kube.login()


def test_the_operator_process_loads_no_generated_kubernetes_client() -> None:
    """kopf would import them if it could (they are installed: the plugin uses one); the operator's
    entry point keeps them out, and everything `agent-operator run` imports still loads."""
    program = (
        "import sys\n"
        "from agent_operator.cli import keep_generated_clients_out\n"
        "keep_generated_clients_out()\n"
        "import agent_operator.main, kopf\n"
        "print(sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in"
        " ('kubernetes', 'kubernetes_asyncio')))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
    plain = subprocess.run(
        [sys.executable, "-c", "import sys, kopf; print('kubernetes' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert plain.stdout.strip() == "True"  # without it, kopf does load the sync client
