"""The rollout's HTTP analysis checks against a real agent-runtime process on loopback, running
the config and keys the operator would give the agent's pods, and (tokensPerRequest) against pods
on loopback that serve the runtime's token metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from agent_contract import genai
from agent_contract.keyfiles import new_key_files
from agent_operator.analysis import HttpAnalysis, Target, operator_token
from agent_operator.spec import AnalysisResult, EnterpriseAgent
from agent_runtime.app import create_app
from agent_runtime.settings import Settings
from eao_devtools.testkit.operator_process import free_port
from eao_devtools.testkit.runtime import agent_runtime_layout, live_runtime
from tests.fake_model import FakeModel
from tests.helpers import example_document
from tests.runtime.conftest import PASSWORD, make_layout


def _agent(**analysis: Any) -> EnterpriseAgent:
    document = example_document("minimal")
    document["spec"]["operations"] = ["ping", "analyze_data"]
    document["spec"]["rollout"] = {"analysis": analysis}
    return EnterpriseAgent.model_validate(document)


def _secret_data(files: dict[str, bytes]) -> dict[str, str]:
    return {name: base64.b64encode(value).decode() for name, value in files.items()}


def _results(checks: list[Any]) -> dict[str, str]:
    return {check.name: check.result.value for check in checks}


async def test_a_healthy_runtime_passes_every_check_including_a_signed_smoke_call(tmp_path: Path) -> None:
    agent = _agent(smoke={"operation": "ping", "payload": {}})
    files = new_key_files(agent.spec.security.signing_algorithm)
    with live_runtime(agent_runtime_layout(agent, tmp_path, files)) as (_, base):
        checks = await HttpAnalysis(base).measure(agent, "hello-agent-preview", [], _secret_data(files))
        # The smoke call counts as traffic, so a second measurement judges real requests.
        again = await HttpAnalysis(base).measure(agent, "hello-agent-preview", [], _secret_data(files))
    assert _results(checks) == {"readyz": "Passed", "errorRate": "Passed", "latency": "Passed", "smoke": "Passed"}
    assert _results(again)["errorRate"] == "Passed"
    error_rate = next(c for c in again if c.name == "errorRate")
    assert "0.00% of 1 requests failed" in error_rate.message


async def test_a_latency_threshold_set_to_fail_fails(tmp_path: Path) -> None:
    agent = _agent(maxP95LatencySeconds=0.000001, smoke={"operation": "ping"})
    files = new_key_files(agent.spec.security.signing_algorithm)
    with live_runtime(agent_runtime_layout(agent, tmp_path, files)) as (_, base):
        first = await HttpAnalysis(base).measure(agent, "svc", [], _secret_data(files))
        second = await HttpAnalysis(base).measure(agent, "svc", [], _secret_data(files))
    assert _results(first)["latency"] == "Passed"  # no traffic yet besides probes: nothing to judge
    latency = next(c for c in second if c.name == "latency")
    assert latency.result == AnalysisResult.FAILED
    assert "limit 1e-06 s" in latency.message


async def test_a_smoke_call_the_runtime_refuses_fails_the_check(tmp_path: Path) -> None:
    agent = _agent(smoke={"operation": "analyze_data", "payload": {"not": "a valid input"}})
    files = new_key_files(agent.spec.security.signing_algorithm)
    with live_runtime(agent_runtime_layout(agent, tmp_path, files)) as (_, base):
        checks = await HttpAnalysis(base).measure(agent, "svc", [], _secret_data(files))
    smoke = next(c for c in checks if c.name == "smoke")
    assert smoke.result == AnalysisResult.FAILED
    assert smoke.message.startswith("analyze_data: 4")  # a 4xx, with the runtime's reason


async def test_a_token_signed_with_other_keys_is_refused_by_the_runtime(tmp_path: Path) -> None:
    agent = _agent(smoke={"operation": "ping"})
    files = new_key_files(agent.spec.security.signing_algorithm)
    stranger = _secret_data(new_key_files(agent.spec.security.signing_algorithm))
    with live_runtime(agent_runtime_layout(agent, tmp_path, files)) as (_, base):
        checks = await HttpAnalysis(base).measure(agent, "svc", [], stranger)
        request = urllib.request.Request(
            f"{base}/v1/operations/ping",
            data=b"{}",
            headers={"Authorization": f"Bearer {operator_token(agent, stranger)}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        assert json.loads(refused.value.read())["code"] == "invalid_token"
    assert next(c for c in checks if c.name == "smoke").result == AnalysisResult.FAILED


async def test_a_runtime_that_cannot_be_reached_measures_nothing_and_no_smoke_call_is_sent() -> None:
    """No connection (refused) leaves the checks Pending, to be measured again: a pod just in its
    Service's endpoints may not be reachable yet. The smoke call is not sent where nothing answers."""
    agent = _agent(smoke={"operation": "ping"})
    files = _secret_data(new_key_files(agent.spec.security.signing_algorithm))
    refused = await HttpAnalysis(f"http://127.0.0.1:{free_port()}").measure(agent, "svc", [], files)
    assert _results(refused) == {"readyz": "Pending", "errorRate": "Pending", "latency": "Pending", "smoke": "Pending"}
    assert refused[0].message.startswith("unreachable: ClientConnectorError")
    assert refused[0].message.endswith("; measured again")
    assert refused[-1].message.startswith("not called: the Service did not answer /readyz")


async def test_a_connection_that_gives_no_answer_or_a_broken_one_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connected, then silence, bytes that are not HTTP, or a body cut short: the pod's doing, a
    failure at once (not Pending)."""
    measured = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await measured.wait()  # no answer while the analysis measures
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: text/plain\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    monkeypatch.setattr("agent_operator.analysis.REQUEST_TIMEOUT_SECONDS", 1.0)
    said = {}
    for handler in (silent, garbage, cut_short):
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            checks = await HttpAnalysis(f"http://127.0.0.1:{port}").measure(_agent(), "svc", [], None)
        finally:
            measured.set()
            server.close()
            await server.wait_closed()
        assert _results(checks) == {"readyz": "Failed", "errorRate": "Failed", "latency": "Failed"}, checks
        said[handler.__name__] = checks[0].message
    assert said["silent"] == "no usable answer: SocketTimeoutError: Timeout on reading data from socket"
    assert said["garbage"].startswith("no usable answer: ClientResponseError")
    assert said["cut_short"].startswith("no usable answer: ClientPayloadError")


async def test_outside_a_cluster_without_a_base_url_checks_are_skipped_not_passed() -> None:
    agent = _agent(smoke={"operation": "ping"})
    checks = await HttpAnalysis(None, in_cluster=False).measure(agent, "svc", ["10.0.0.1"], None)
    assert {c.result for c in checks} == {AnalysisResult.SKIPPED}
    assert "--analysis-base-url" in checks[0].message


# --- tokensPerRequest: the preview's pods against the stable colour's --------------------------------


def _pod(*chat_calls: tuple[int, int]) -> web.Application:
    """A runtime pod as the analysis sees it: /readyz, and /metrics after these chat calls (input
    and output tokens each) recorded as the runtime records them."""
    registry = CollectorRegistry()
    usage = Histogram(
        genai.TOKEN_USAGE_METRIC,
        "Tokens per model call.",
        [genai.OPERATION_NAME_LABEL, genai.PROVIDER_LABEL, genai.REQUEST_MODEL_LABEL, genai.TOKEN_TYPE_LABEL],
        registry=registry,
    )
    requests = Counter("agent_http_requests", "Requests.", ["method", "route", "status"], registry=registry)
    for input_tokens, output_tokens in chat_calls:
        usage.labels("chat", "openai", "m", genai.INPUT_TOKENS).observe(input_tokens)
        usage.labels("chat", "openai", "m", genai.OUTPUT_TOKENS).observe(output_tokens)
        requests.labels("POST", "/v1/operations/{name}", "200").inc()

    async def readyz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


Serve = Callable[[web.Application], Awaitable[TestServer]]


async def _url(aiohttp_server: Serve, app: web.Application) -> str:
    server = await aiohttp_server(app)
    return f"http://{server.host}:{server.port}"


async def test_a_preview_spending_more_tokens_per_call_than_allowed_fails(aiohttp_server: Serve) -> None:
    agent = _agent(maxTokensPerRequestRatio=1.5)
    stable = await _url(aiohttp_server, _pod((800, 200), (900, 100)))  # 1000 tokens per call
    thrifty = (await _url(aiohttp_server, _pod((1000, 400))), await _url(aiohttp_server, _pod((600, 400))))
    spendy = await _url(aiohttp_server, _pod((2500, 500), (1500, 500)))  # 2500 per call
    passed = await HttpAnalysis().check(agent, Target(thrifty[0], thrifty, (stable,)), None)
    assert _results(passed) == {
        "readyz": "Passed",
        "errorRate": "Passed",
        "latency": "Passed",
        "tokensPerRequest": "Passed",
    }
    tokens = next(c for c in passed if c.name == "tokensPerRequest")
    # Both preview pods add up: 2400 tokens over 2 calls.
    assert (
        tokens.message
        == "preview 1200.0 tokens per chat call over 2 calls, stable 1000.0 over 2: ratio 1.20 (limit 1.5)"
    )
    failed = await HttpAnalysis().check(agent, Target(spendy, (spendy,), (stable,)), None)
    tokens = next(c for c in failed if c.name == "tokensPerRequest")
    assert tokens.result == AnalysisResult.FAILED
    assert "ratio 2.50 (limit 1.5)" in tokens.message
    assert _results(failed)["errorRate"] == "Passed"  # only the budget check fails


def _failing_pod(failed: int) -> web.Application:
    """A pod whose /metrics shows ``failed`` operation requests answered 500."""
    registry = CollectorRegistry()
    requests = Counter("agent_http_requests", "Requests.", ["method", "route", "status"], registry=registry)
    requests.labels("POST", "/v1/operations/{name}", "500").inc(failed)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def test_a_pod_that_cannot_be_reached_hides_no_failure_of_the_others(aiohttp_server: Serve) -> None:
    """Of several pods, one unreachable: what the others show fails as it is; their passes wait for
    the missing pod (Pending), since its requests may be the failing ones."""
    agent = _agent()
    healthy = await _url(aiohttp_server, _pod((10, 10)))
    failing = await _url(aiohttp_server, _failing_pod(100))
    gone = f"http://127.0.0.1:{free_port()}"
    checks = await HttpAnalysis().check(agent, Target(healthy, (failing, gone)), None)
    error_rate = next(c for c in checks if c.name == "errorRate")
    assert error_rate.result == AnalysisResult.FAILED, error_rate
    assert "100.00% of 100 requests failed" in error_rate.message
    checks = await HttpAnalysis().check(agent, Target(healthy, (healthy, gone)), None)
    assert _results(checks) == {"readyz": "Passed", "errorRate": "Pending", "latency": "Pending"}
    assert "1 of 2 pods did not answer (ClientConnectorError" in checks[1].message


async def test_tokens_per_request_without_chat_traffic_passes_and_an_unreachable_stable_colour_measures_nothing(
    aiohttp_server: Serve,
) -> None:
    agent = _agent(maxTokensPerRequestRatio=1)
    idle = await _url(aiohttp_server, _pod())
    checks = await HttpAnalysis().check(agent, Target(idle, (idle,), (idle,)), None)
    tokens = next(c for c in checks if c.name == "tokensPerRequest")
    assert (tokens.result, tokens.message) == (AnalysisResult.PASSED, "no chat calls on either colour yet")
    gone = f"http://127.0.0.1:{free_port()}"
    checks = await HttpAnalysis().check(agent, Target(idle, (idle,), (gone,)), None)
    tokens = next(c for c in checks if c.name == "tokensPerRequest")
    assert tokens.result == AnalysisResult.PENDING  # measured again: the stable pods may answer next time
    assert tokens.message.startswith("cannot reach the stable colour's /metrics: ClientConnectorError")
    # A stable pod that cannot be read (scaled down or evicted as it was scraped) is left out: the
    # others are the yardstick, and the message says one was missing.
    stable = await _url(aiohttp_server, _pod((800, 200)))
    spendy = await _url(aiohttp_server, _pod((3000, 0)))
    checks = await HttpAnalysis().check(agent, Target(spendy, (spendy,), (stable, gone)), None)
    tokens = next(c for c in checks if c.name == "tokensPerRequest")
    assert (tokens.result, tokens.message) == (
        AnalysisResult.FAILED,
        "preview 3000.0 tokens per chat call over 1 calls, stable 1000.0 over 1: ratio 3.00 (limit 1);"
        " 1 of 2 stable pods could not be read and were left out",
    )
    # Without a stable colour to compare with (after promotion), the check is not made at all.
    checks = await HttpAnalysis().check(agent, Target(idle, (idle,)), None)
    assert "tokensPerRequest" not in _results(checks)


async def test_the_analysis_scrapes_the_stable_colours_pods_from_their_addresses() -> None:
    agent = _agent(maxTokensPerRequestRatio=2)
    target = HttpAnalysis(in_cluster=True).target(agent, "hello-agent-preview", ["10.0.0.7"], ["10.0.0.3", "fd00::3"])
    assert target == Target(
        "http://hello-agent-preview.default.svc:80",
        ("http://10.0.0.7:8080",),
        ("http://10.0.0.3:8080", "http://[fd00::3]:8080"),
    )
    skipped = await HttpAnalysis(None, in_cluster=False).measure(agent, "svc", ["10.0.0.7"], None, ["10.0.0.3"])
    assert _results(skipped)["tokensPerRequest"] == "Skipped"
    after_promotion = await HttpAnalysis(None, in_cluster=False).measure(agent, "svc", ["10.0.0.7"], None)
    assert "tokensPerRequest" not in _results(after_promotion)


async def test_tokens_per_request_compares_two_real_runtimes_chatting_with_a_model(
    aiohttp_server: Serve, tmp_path: Path
) -> None:
    """End to end: a stable and a preview runtime chat with a fake model; the preview's answers run
    three times as long, and the analysis reads that from their own /metrics."""

    async def runtime(name: str, words: int) -> tuple[str, FakeModel]:
        fake = FakeModel(reply=lambda _: " ".join(["word"] * words))
        await fake.start()
        config = make_layout(
            tmp_path / name,
            securityLevel="confidential",
            operations=["chat", "ping"],
            model={"baseUrl": fake.base_url, "model": "test-model", "apiKeyEnv": None},
            egress={"allowedHosts": ["127.0.0.1"]},
        )
        server = await aiohttp_server(create_app(Settings.load(str(config))))
        return f"http://{server.host}:{server.port}", fake

    async def chat(url: str, times: int) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/auth/login", json={"username": "otto", "password": PASSWORD}) as login:
                token = (await login.json())["access_token"]
            for _ in range(times):
                ask = {"input": {"messages": [{"role": "user", "content": "four words of input"}]}}
                headers = {"Authorization": f"Bearer {token}"}
                async with session.post(f"{url}/v1/operations/chat", json=ask, headers=headers) as answer:
                    assert answer.status == 200, await answer.text()

    stable, stable_model = await runtime("stable", 10)
    preview, preview_model = await runtime("preview", 30)
    try:
        await chat(stable, 3)
        await chat(preview, 2)
        target = Target(preview, (preview,), (stable,))
        strict = await HttpAnalysis().check(_agent(maxTokensPerRequestRatio=1.5), target, None)
        loose = await HttpAnalysis().check(_agent(maxTokensPerRequestRatio=3), target, None)
    finally:
        await stable_model.close()
        await preview_model.close()
    tokens = next(c for c in strict if c.name == "tokensPerRequest")
    # The fake model counts a word as a token: 4 in, and 30 out on the preview, 10 on the stable one.
    assert (tokens.result, tokens.message) == (
        AnalysisResult.FAILED,
        "preview 34.0 tokens per chat call over 2 calls, stable 14.0 over 3: ratio 2.43 (limit 1.5)",
    )
    assert next(c for c in loose if c.name == "tokensPerRequest").result == AnalysisResult.PASSED
