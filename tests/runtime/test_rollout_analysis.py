"""The rollout's HTTP analysis checks against a real agent-runtime process on loopback, running
the config and keys the operator would give the agent's pods."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent_contract.keyfiles import new_key_files
from agent_operator.analysis import HttpAnalysis, operator_token
from agent_operator.spec import AnalysisResult, EnterpriseAgent
from eao_devtools.testkit.operator_process import free_port
from eao_devtools.testkit.runtime import agent_runtime_layout, live_runtime
from tests.helpers import example_document


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


async def test_an_unreachable_runtime_fails_readyz_and_metrics() -> None:
    agent = _agent()
    checks = await HttpAnalysis(f"http://127.0.0.1:{free_port()}").measure(agent, "svc", [], None)
    assert _results(checks) == {"readyz": "Failed", "errorRate": "Failed", "latency": "Failed"}
    assert "unreachable" in checks[0].message


async def test_outside_a_cluster_without_a_base_url_checks_are_skipped_not_passed() -> None:
    agent = _agent(smoke={"operation": "ping"})
    checks = await HttpAnalysis(None, in_cluster=False).measure(agent, "svc", ["10.0.0.1"], None)
    assert {c.result for c in checks} == {AnalysisResult.SKIPPED}
    assert "--analysis-base-url" in checks[0].message
