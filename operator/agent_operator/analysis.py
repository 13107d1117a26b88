"""The HTTP analysis checks: the runtime's /readyz through a Service, error rate and p95 latency
from each pod's /metrics, and an optional smoke operation.

The judging (:func:`judge_metrics`) is pure. :class:`HttpAnalysis` does the requests: in a
cluster it reaches the Service by its DNS name and each pod by the IP its EndpointSlice lists.
Outside a cluster (``make run`` on the local control plane, where kwok pods have no network)
those addresses do not exist, so the checks are reported as Skipped, never as passed, unless
``base_url`` points every request at one runtime (how the e2e tests and the bench drive it).
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from agent_contract.config import AuthMode
from agent_contract.layout import RUNTIME_PORT, SERVICE_PORT
from agent_contract.tokens import mint_smoke_token
from agent_operator import rollout
from agent_operator.render.runtime_config import build_runtime_config
from agent_operator.rollout import Check
from agent_operator.spec import AnalysisResult, AnalysisSpec, CheckName, EnterpriseAgent

# Requests made by probes and scrapers say nothing about the agent's health.
PROBE_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
REQUEST_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Traffic:
    """Requests answered by a set of pods, from their /metrics."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx
    buckets: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count), sorted

    def __add__(self, other: Traffic) -> Traffic:
        merged: dict[float, float] = dict(self.buckets)
        for bound, count in other.buckets:
            merged[bound] = merged.get(bound, 0.0) + count
        return Traffic(self.requests + other.requests, self.errors + other.errors, tuple(sorted(merged.items())))

    def p95(self) -> float | None:
        """The upper bound of the bucket holding the 95th percentile (a conservative estimate)."""
        if not self.buckets or self.buckets[-1][1] <= 0:
            return None
        target = 0.95 * self.buckets[-1][1]
        return next(bound for bound, count in self.buckets if count >= target)


def parse_traffic(text: str) -> Traffic:
    """Reads agent_http_requests_total and agent_http_request_duration_seconds, leaving out
    probe routes. Raises ValueError when the text is not the exposition format."""
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("route") in PROBE_ROUTES:
                continue
            if sample.name == "agent_http_requests_total":
                requests += sample.value
                if sample.labels.get("status", "").startswith("5"):
                    errors += sample.value
            elif sample.name == "agent_http_request_duration_seconds_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return Traffic(requests, errors, tuple(sorted(buckets.items())))


def judge_metrics(traffic: Traffic, analysis: AnalysisSpec) -> list[Check]:
    """The errorRate and latency checks. No traffic yet is a pass that says so: nothing failed."""
    if traffic.requests <= 0:
        note = "no requests yet (probes excluded)"
        return [
            Check(CheckName.ERROR_RATE, AnalysisResult.PASSED, note),
            Check(CheckName.LATENCY, AnalysisResult.PASSED, note),
        ]
    rate = traffic.errors / traffic.requests
    error_check = Check(
        CheckName.ERROR_RATE,
        AnalysisResult.PASSED if rate <= analysis.max_error_rate else AnalysisResult.FAILED,
        f"{rate:.2%} of {int(traffic.requests)} requests failed (limit {analysis.max_error_rate:.2%})",
    )
    p95 = traffic.p95()
    if p95 is None:
        latency = Check(CheckName.LATENCY, AnalysisResult.PASSED, "no latency samples")
    else:
        shown = "> largest bucket" if math.isinf(p95) else f"<= {p95:g} s"
        latency = Check(
            CheckName.LATENCY,
            AnalysisResult.PASSED if p95 <= analysis.max_p95_latency_seconds else AnalysisResult.FAILED,
            f"p95 {shown} (limit {analysis.max_p95_latency_seconds:g} s)",
        )
    return [error_check, latency]


@dataclass(frozen=True)
class Target:
    """Where the checks go: the Service for /readyz and the smoke call, each pod for /metrics."""

    service_url: str
    pod_urls: tuple[str, ...]


class HttpAnalysis:
    def __init__(self, base_url: str | None = None, in_cluster: bool | None = None) -> None:
        self.base_url = base_url.rstrip("/") if base_url else None
        self.in_cluster = in_cluster if in_cluster is not None else "KUBERNETES_SERVICE_HOST" in os.environ

    def target(self, agent: EnterpriseAgent, service: str, pod_ips: Sequence[str]) -> Target | None:
        if self.base_url:
            return Target(self.base_url, (self.base_url,))
        if not self.in_cluster:
            return None
        return Target(
            f"http://{service}.{agent.namespace}.svc:{SERVICE_PORT}",
            tuple(f"http://{_host(ip)}:{RUNTIME_PORT}" for ip in pod_ips),
        )

    async def measure(
        self,
        agent: EnterpriseAgent,
        service: str,
        pod_ips: Sequence[str],
        key_data: Mapping[str, str] | None,
    ) -> list[Check]:
        analysis = agent.spec.rollout.analysis
        target = self.target(agent, service, pod_ips)
        names = rollout.http_check_names(agent.spec.rollout)
        if target is None:
            why = "the operator runs outside the cluster and cannot reach pods; set --analysis-base-url"
            return [Check(name, AnalysisResult.SKIPPED, why) for name in names]
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            checks = [await _readyz(session, target), *await _metrics(session, target, analysis)]
            if analysis.smoke is not None:
                checks.append(await _smoke(session, target, agent, key_data))
        return checks


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


async def _readyz(session: aiohttp.ClientSession, target: Target) -> Check:
    try:
        async with session.get(f"{target.service_url}/readyz") as response:
            body = (await response.text())[:200]
            passed = response.status == 200
            return Check(
                CheckName.READYZ,
                AnalysisResult.PASSED if passed else AnalysisResult.FAILED,
                f"{response.status} {body}",
            )
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:  # ValueError: a body that is not text
        return Check(CheckName.READYZ, AnalysisResult.FAILED, f"unreachable: {error or type(error).__name__}")


async def _metrics(session: aiohttp.ClientSession, target: Target, analysis: AnalysisSpec) -> list[Check]:
    if not target.pod_urls:
        failed = Check(CheckName.ERROR_RATE, AnalysisResult.FAILED, "no pod to scrape")
        return [failed, Check(CheckName.LATENCY, AnalysisResult.FAILED, "no pod to scrape")]

    async def scrape(url: str) -> Traffic:
        async with session.get(f"{url}/metrics") as response:
            if response.status != 200:
                raise ValueError(f"{url}/metrics answered {response.status}")
            return parse_traffic(await response.text())

    try:
        parts = await asyncio.gather(*(scrape(url) for url in target.pod_urls))
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        message = f"cannot read /metrics: {error or type(error).__name__}"
        return [
            Check(CheckName.ERROR_RATE, AnalysisResult.FAILED, message),
            Check(CheckName.LATENCY, AnalysisResult.FAILED, message),
        ]
    total = Traffic()
    for part in parts:
        total = total + part
    return judge_metrics(total, analysis)


def operator_token(agent: EnterpriseAgent, key_data: Mapping[str, str]) -> str:
    """A short-lived token the runtime accepts, signed with the agent's own key from its Secret,
    carrying every role its config defines so any operation may be smoke-tested."""
    files = {name: base64.b64decode(value) for name, value in key_data.items()}
    return mint_smoke_token(build_runtime_config(agent), files)


async def _smoke(
    session: aiohttp.ClientSession, target: Target, agent: EnterpriseAgent, key_data: Mapping[str, str] | None
) -> Check:
    smoke = agent.spec.rollout.analysis.smoke
    assert smoke is not None
    if build_runtime_config(agent).auth.mode != AuthMode.LOCAL:
        return Check(
            CheckName.SMOKE, AnalysisResult.SKIPPED, "the agent takes OIDC tokens; the operator cannot sign one"
        )
    if not key_data:
        return Check(CheckName.SMOKE, AnalysisResult.FAILED, "the key Secret has no keys")
    try:
        token = operator_token(agent, key_data)
    except (KeyError, ValueError) as error:
        return Check(CheckName.SMOKE, AnalysisResult.FAILED, f"cannot sign a token: {error}")
    url = f"{target.service_url}/v1/operations/{smoke.operation}"
    timeout = aiohttp.ClientTimeout(total=smoke.timeout_seconds)
    try:
        async with session.post(
            url, json=smoke.payload, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        ) as response:
            body: Any = (await response.text())[:300]
            passed = 200 <= response.status < 300
            return Check(
                CheckName.SMOKE,
                AnalysisResult.PASSED if passed else AnalysisResult.FAILED,
                f"{smoke.operation}: {response.status} {body}",
            )
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:  # ValueError: a body that is not text
        return Check(CheckName.SMOKE, AnalysisResult.FAILED, f"{smoke.operation}: {error or type(error).__name__}")
