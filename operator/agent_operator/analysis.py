"""The HTTP analysis checks: the runtime's /readyz through a Service, error rate and p95 latency
from each pod's /metrics, the preview's tokens per chat call against the stable colour's (when
spec.rollout.analysis.maxTokensPerRequestRatio is set), and an optional smoke operation.

The judging (:func:`judge_metrics`, :func:`judge_tokens`) is pure. :class:`HttpAnalysis` does the
requests: in a cluster it reaches the Service by its DNS name and each pod by the IP its
EndpointSlice lists (the stable colour's pods by the active Service's).
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

from agent_contract import genai
from agent_contract.config import AuthMode
from agent_contract.layout import AGENT_CARD_PATH, RUNTIME_PORT, SERVICE_PORT
from agent_contract.tokens import mint_smoke_token
from agent_operator import rollout
from agent_operator.render.runtime_config import build_runtime_config
from agent_operator.rollout import Check
from agent_operator.spec import AnalysisResult, AnalysisSpec, CheckName, EnterpriseAgent

# Requests made by probes, scrapers and discovery (the A2A card, the API document) say nothing
# about the agent's health: always cheap 200s, they would dilute a colour's error rate and p95.
PROBE_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", AGENT_CARD_PATH, "/openapi.json"})
# Each of connecting and reading may take this long; a whole answer twice as long.
REQUEST_TIMEOUT_SECONDS = 5.0
# No connection at all (refused, no connection within the timeout, a name not resolved) measures
# nothing: a pod that has just become ready is in its Service's endpoints before every node's
# kube-proxy (and NetworkPolicy controller) has programmed the path to it, which takes seconds on a
# busy node. Such a check stays Pending and is measured again, as Argo Rollouts counts a measurement
# error apart from a failure (rollout.MAX_UNANSWERED_MEASUREMENTS bounds how often). A connection
# that was made and then gave no answer, a broken one or a wrong one (not 200, not parseable,
# dropped, cut short) fails at once: that is the pod's doing.
UNREACHABLE = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
MESSAGE_CHARS = 300  # of an error's text in a check's message: a pod's answer may be long


def _described(error: BaseException) -> str:
    """An exception as a message: its text (cut), or what it means when it has none (a timeout)."""
    text = str(error)[:MESSAGE_CHARS]
    if not text and isinstance(error, TimeoutError):
        return "no complete answer in time"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def unmeasured(name: CheckName, what: str, error: BaseException) -> Check:
    return Check(name, AnalysisResult.PENDING, f"{what}: {_described(error)}; measured again")


def _timeout(whole: float, read: float) -> aiohttp.ClientTimeout:
    """Connecting bounded apart from reading, so that a connection never made (ConnectionTimeoutError:
    unreachable) is told from an answer that never came (a failure)."""
    return aiohttp.ClientTimeout(
        total=whole, sock_connect=min(REQUEST_TIMEOUT_SECONDS, whole), sock_read=min(read, whole)
    )


@dataclass(frozen=True)
class Traffic:
    """Requests answered by a set of pods, and the model calls they made, from their /metrics."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx
    buckets: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count), sorted
    chat_calls: float = 0.0  # chat calls that reported token usage (the input series' count)
    chat_tokens: float = 0.0  # their input and output tokens

    def __add__(self, other: Traffic) -> Traffic:
        merged: dict[float, float] = dict(self.buckets)
        for bound, count in other.buckets:
            merged[bound] = merged.get(bound, 0.0) + count
        return Traffic(
            self.requests + other.requests,
            self.errors + other.errors,
            tuple(sorted(merged.items())),
            self.chat_calls + other.chat_calls,
            self.chat_tokens + other.chat_tokens,
        )

    def tokens_per_call(self) -> float | None:
        """Mean input plus output tokens per chat call, or None without chat calls."""
        return self.chat_tokens / self.chat_calls if self.chat_calls > 0 else None

    def p95(self) -> float | None:
        """The upper bound of the bucket holding the 95th percentile (a conservative estimate)."""
        if not self.buckets or self.buckets[-1][1] <= 0:
            return None
        target = 0.95 * self.buckets[-1][1]
        return next(bound for bound, count in self.buckets if count >= target)


_TOKENS_SUM = f"{genai.TOKEN_USAGE_METRIC}_sum"
_TOKENS_COUNT = f"{genai.TOKEN_USAGE_METRIC}_count"


def parse_traffic(text: str) -> Traffic:
    """Reads agent_http_requests_total and agent_http_request_duration_seconds, leaving out
    probe routes, and the chat calls' gen_ai_client_token_usage histogram: every call records
    one input and one output sample, so the calls are the input series' count and the tokens the
    sum of both series' sums. Raises ValueError when the text is not the exposition format."""
    requests = errors = calls = tokens = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("route") in PROBE_ROUTES:
                continue
            if sample.name == "agent_http_requests_total":
                requests += sample.value
                if labels.get("status", "").startswith("5"):
                    errors += sample.value
            elif sample.name == "agent_http_request_duration_seconds_bucket":
                if "le" not in labels:
                    raise ValueError("agent_http_request_duration_seconds_bucket: a sample without its le label")
                bound = float(labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name in (_TOKENS_SUM, _TOKENS_COUNT) and _is_chat(labels):
                token_type = labels.get(genai.TOKEN_TYPE_LABEL)
                if sample.name == _TOKENS_SUM and token_type in (genai.INPUT_TOKENS, genai.OUTPUT_TOKENS):
                    tokens += sample.value
                elif sample.name == _TOKENS_COUNT and token_type == genai.INPUT_TOKENS:
                    calls += sample.value
    return Traffic(requests, errors, tuple(sorted(buckets.items())), calls, tokens)


def _is_chat(labels: Mapping[str, str]) -> bool:
    """A chat call's series (one without an operation name is taken as one)."""
    return labels.get(genai.OPERATION_NAME_LABEL, "chat") == "chat"


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


def judge_tokens(preview: Traffic, stable: Traffic, max_ratio: float) -> Check:
    """The tokensPerRequest check: the preview's mean tokens per chat call over the stable colour's
    must not exceed ``max_ratio``. Without chat calls on a side there is nothing to compare: a
    pass that says so (as errorRate passes with no requests)."""
    ours, theirs = preview.tokens_per_call(), stable.tokens_per_call()
    limit = f"limit {max_ratio:g}"
    if ours is None and theirs is None:
        return Check(CheckName.TOKENS_PER_REQUEST, AnalysisResult.PASSED, "no chat calls on either colour yet")
    if ours is None:
        return Check(
            CheckName.TOKENS_PER_REQUEST,
            AnalysisResult.PASSED,
            f"no chat calls on the preview yet (stable: {theirs:.1f} tokens per call)",
        )
    shown = f"preview {ours:.1f} tokens per chat call over {int(preview.chat_calls)} calls"
    if theirs is None:
        return Check(
            CheckName.TOKENS_PER_REQUEST,
            AnalysisResult.PASSED,
            f"{shown}; no chat calls on the stable colour to compare with",
        )
    compared = f"{shown}, stable {theirs:.1f} over {int(stable.chat_calls)}"
    if theirs == 0:  # no ratio to take: any token against none is over every limit
        passed = ours == 0
        return Check(
            CheckName.TOKENS_PER_REQUEST,
            AnalysisResult.PASSED if passed else AnalysisResult.FAILED,
            f"{compared}: {'neither spends tokens' if passed else 'the stable colour spends none'} ({limit})",
        )
    ratio = ours / theirs
    return Check(
        CheckName.TOKENS_PER_REQUEST,
        AnalysisResult.PASSED if ratio <= max_ratio else AnalysisResult.FAILED,
        f"{compared}: ratio {ratio:.2f} ({limit})",
    )


@dataclass(frozen=True)
class Target:
    """Where the checks go: the Service for /readyz and the smoke call, each pod for /metrics, and
    the stable colour's pods for the checks that compare with them (None: no comparison)."""

    service_url: str
    pod_urls: tuple[str, ...]
    baseline_urls: tuple[str, ...] | None = None


class HttpAnalysis:
    def __init__(self, base_url: str | None = None, in_cluster: bool | None = None) -> None:
        self.base_url = base_url.rstrip("/") if base_url else None
        self.in_cluster = in_cluster if in_cluster is not None else "KUBERNETES_SERVICE_HOST" in os.environ

    def target(
        self,
        agent: EnterpriseAgent,
        service: str,
        pod_ips: Sequence[str],
        baseline_pod_ips: Sequence[str] | None = None,
    ) -> Target | None:
        if self.base_url:
            return Target(self.base_url, (self.base_url,), None if baseline_pod_ips is None else (self.base_url,))
        if not self.in_cluster:
            return None
        return Target(
            f"http://{service}.{agent.namespace}.svc:{SERVICE_PORT}",
            _pod_urls(pod_ips),
            None if baseline_pod_ips is None else _pod_urls(baseline_pod_ips),
        )

    async def measure(
        self,
        agent: EnterpriseAgent,
        service: str,
        pod_ips: Sequence[str],
        key_data: Mapping[str, str] | None,
        baseline_pod_ips: Sequence[str] | None = None,
    ) -> list[Check]:
        """The HTTP checks of the pods behind ``service``; with ``baseline_pod_ips`` (the stable
        colour's pods), also those comparing the two."""
        target = self.target(agent, service, pod_ips, baseline_pod_ips)
        if target is None:
            names = [
                name
                for name in rollout.http_check_names(agent.spec.rollout)
                if name != CheckName.TOKENS_PER_REQUEST or baseline_pod_ips is not None
            ]
            why = "the operator runs outside the cluster and cannot reach pods; set --analysis-base-url"
            return [Check(name, AnalysisResult.SKIPPED, why) for name in names]
        return await self.check(agent, target, key_data)

    async def check(self, agent: EnterpriseAgent, target: Target, key_data: Mapping[str, str] | None) -> list[Check]:
        """The checks against ``target``, in the order status records them."""
        analysis = agent.spec.rollout.analysis
        async with aiohttp.ClientSession(
            timeout=_timeout(2 * REQUEST_TIMEOUT_SECONDS, read=REQUEST_TIMEOUT_SECONDS)
        ) as session:
            readyz = await _readyz(session, target)
            checks = [readyz, *await _metrics(session, target, analysis)]
            if analysis.smoke is not None and readyz.result == AnalysisResult.PENDING:
                # The smoke call may not be idempotent (a model's tokens): not sent where nothing answers.
                why = "not called: the Service did not answer /readyz; measured again"
                checks.append(Check(CheckName.SMOKE, AnalysisResult.PENDING, why))
            elif analysis.smoke is not None:
                checks.append(await _smoke(session, target, agent, key_data))
        return checks


def _pod_urls(ips: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"http://{_host(ip)}:{RUNTIME_PORT}" for ip in ips)


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
    except UNREACHABLE as error:
        return unmeasured(CheckName.READYZ, "unreachable", error)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:  # no answer, a broken or malformed one
        return Check(CheckName.READYZ, AnalysisResult.FAILED, f"no usable answer: {_described(error)}")


async def _metrics(session: aiohttp.ClientSession, target: Target, analysis: AnalysisSpec) -> list[Check]:
    """errorRate and latency from the pods' /metrics, and tokensPerRequest from the same scrape and
    the stable colour's pods' when the target has them (each pod read and parsed once)."""
    baseline, max_ratio = target.baseline_urls, analysis.max_tokens_per_request_ratio
    compare = baseline is not None and max_ratio is not None
    names = [CheckName.ERROR_RATE, CheckName.LATENCY] + ([CheckName.TOKENS_PER_REQUEST] if compare else [])
    if not target.pod_urls:
        return [Check(name, AnalysisResult.FAILED, "no pod to scrape") for name in names]
    read, errors = await _scrape_each(session, target.pod_urls)
    wrong = [error for error in errors if not isinstance(error, UNREACHABLE)]
    if wrong:  # not 200, malformed, not the exposition format, no answer on a connection made
        message = f"cannot read /metrics: {_described(wrong[0])}"
        return [Check(name, AnalysisResult.FAILED, message) for name in names]
    if not read:
        return [unmeasured(name, "cannot reach /metrics", errors[0]) for name in names]
    preview = sum(read, Traffic())
    checks = judge_metrics(preview, analysis)
    if baseline is not None and max_ratio is not None:
        checks.append(await _tokens(session, preview, baseline, max_ratio))
    if errors:
        # What the pods that answered show fails as it is; a pass is no pass until every pod answered.
        missing = f"{len(errors)} of {len(target.pod_urls)} pods did not answer ({_described(errors[0])})"
        checks = [
            c if c.result == AnalysisResult.FAILED else Check(c.name, AnalysisResult.PENDING, f"{c.message}; {missing}")
            for c in checks
        ]
    return checks


async def _tokens(
    session: aiohttp.ClientSession, preview: Traffic, baseline_urls: tuple[str, ...], max_ratio: float
) -> Check:
    if not baseline_urls:
        return Check(
            CheckName.TOKENS_PER_REQUEST,
            AnalysisResult.PASSED,
            "no ready pod of the stable colour to compare with",
        )
    # The stable colour is only the yardstick: a pod of it that cannot be read (scaled down or
    # evicted as it was scraped) is left out, not held against the preview. Only when none answers
    # is nothing known to compare with: Pending when none could be reached, as for the preview,
    # and failed when one answered wrongly.
    read, errors = await _scrape_each(session, baseline_urls)
    if not read:
        wrong = [error for error in errors if not isinstance(error, UNREACHABLE)]
        if not wrong:
            return unmeasured(CheckName.TOKENS_PER_REQUEST, "cannot reach the stable colour's /metrics", errors[0])
        return Check(
            CheckName.TOKENS_PER_REQUEST,
            AnalysisResult.FAILED,
            f"cannot read the stable colour's /metrics: {_described(wrong[0])}",
        )
    check = judge_tokens(preview, sum(read, Traffic()), max_ratio)
    if errors:
        left_out = f"{len(errors)} of {len(baseline_urls)} stable pods could not be read and were left out"
        check = Check(check.name, check.result, f"{check.message}; {left_out}")
    return check


async def _scrape(session: aiohttp.ClientSession, url: str) -> Traffic:
    async with session.get(f"{url}/metrics") as response:
        if response.status != 200:
            raise ValueError(f"{url}/metrics answered {response.status}")
        return parse_traffic(await response.text())


async def _scrape_each(session: aiohttp.ClientSession, urls: Sequence[str]) -> tuple[list[Traffic], list[Exception]]:
    """Each pod's /metrics: those read, and the errors of those that could not be read or parsed."""
    parts = await asyncio.gather(*(_scrape(session, url) for url in urls), return_exceptions=True)
    read: list[Traffic] = []
    errors: list[Exception] = []
    for part in parts:
        if isinstance(part, Traffic):
            read.append(part)
        elif isinstance(part, (aiohttp.ClientError, TimeoutError, ValueError)):
            errors.append(part)
        else:
            raise part  # a bug, or cancelled: not a measurement
    return read, errors


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
    timeout = _timeout(smoke.timeout_seconds, read=smoke.timeout_seconds)
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
    except UNREACHABLE as error:
        return unmeasured(CheckName.SMOKE, f"{smoke.operation}: unreachable", error)
    except TimeoutError:  # connected, but no whole answer in time: the operation's doing
        return Check(
            CheckName.SMOKE,
            AnalysisResult.FAILED,
            f"{smoke.operation}: no answer within {smoke.timeout_seconds:g} s (smoke.timeoutSeconds)",
        )
    except (aiohttp.ClientError, ValueError) as error:  # a broken or malformed answer, a body that is not text
        return Check(CheckName.SMOKE, AnalysisResult.FAILED, f"{smoke.operation}: {_described(error)}")
