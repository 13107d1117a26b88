"""Judging /metrics: error rate and p95 from the runtime's exposition text, and the preview's tokens
per chat call against the stable colour's."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from pydantic import ValidationError

from agent_contract import genai
from agent_operator.analysis import Traffic, judge_metrics, judge_tokens, parse_traffic
from agent_operator.spec import AnalysisResult, AnalysisSpec, CheckName

EXPOSITION = """\
# HELP agent_http_requests_total HTTP requests answered, by route template, method and status.
# TYPE agent_http_requests_total counter
agent_http_requests_total{method="POST",route="/v1/operations/{name}",status="200"} 90.0
agent_http_requests_total{method="POST",route="/v1/operations/{name}",status="503"} 10.0
agent_http_requests_total{method="GET",route="/readyz",status="503"} 500.0
# HELP agent_http_request_duration_seconds Time to answer an HTTP request.
# TYPE agent_http_request_duration_seconds histogram
agent_http_request_duration_seconds_bucket{le="0.1",method="POST",route="/v1/operations/{name}"} 80.0
agent_http_request_duration_seconds_bucket{le="1.0",method="POST",route="/v1/operations/{name}"} 94.0
agent_http_request_duration_seconds_bucket{le="5.0",method="POST",route="/v1/operations/{name}"} 100.0
agent_http_request_duration_seconds_bucket{le="+Inf",method="POST",route="/v1/operations/{name}"} 100.0
agent_http_request_duration_seconds_count{method="POST",route="/v1/operations/{name}"} 100.0
agent_http_request_duration_seconds_sum{method="POST",route="/v1/operations/{name}"} 30.0
agent_http_request_duration_seconds_bucket{le="0.1",method="GET",route="/readyz"} 0.0
agent_http_request_duration_seconds_bucket{le="+Inf",method="GET",route="/readyz"} 500.0
"""


def test_probe_routes_are_left_out() -> None:
    traffic = parse_traffic(EXPOSITION)
    assert (traffic.requests, traffic.errors) == (100, 10)
    assert traffic.p95() == 5.0  # 94 of 100 under 1 s: the 95th is in the 5 s bucket


def test_thresholds_decide_each_check() -> None:
    traffic = parse_traffic(EXPOSITION)
    loose = judge_metrics(traffic, AnalysisSpec.model_validate({"maxErrorRate": 0.2, "maxP95LatencySeconds": 5}))
    assert [c.result for c in loose] == [AnalysisResult.PASSED, AnalysisResult.PASSED]
    strict = judge_metrics(traffic, AnalysisSpec.model_validate({"maxErrorRate": 0.05, "maxP95LatencySeconds": 1}))
    assert [c.result for c in strict] == [AnalysisResult.FAILED, AnalysisResult.FAILED]
    assert strict[0].message == "10.00% of 100 requests failed (limit 5.00%)"


def test_pods_add_up() -> None:
    one = parse_traffic(EXPOSITION)
    both = one + one
    assert (both.requests, both.errors) == (200, 20)
    assert both.p95() == one.p95()


def test_no_traffic_passes_and_says_so() -> None:
    checks = judge_metrics(Traffic(), AnalysisSpec())
    assert [c.result for c in checks] == [AnalysisResult.PASSED, AnalysisResult.PASSED]
    assert "no requests yet" in checks[0].message


def test_garbage_is_refused() -> None:
    with pytest.raises(ValueError, match="could not convert"):
        parse_traffic('agent_http_requests_total{route="/x" 1\n')


# --- tokensPerRequest -------------------------------------------------------------------------------


def token_exposition(*calls: tuple[int, int], operation: str = "chat") -> str:
    """/metrics of a runtime that made these chat calls, each (input tokens, output tokens), with
    the labels the runtime puts on gen_ai_client_token_usage."""
    registry = CollectorRegistry()
    usage = Histogram(
        genai.TOKEN_USAGE_METRIC,
        "tokens per call",
        [genai.OPERATION_NAME_LABEL, genai.PROVIDER_LABEL, genai.REQUEST_MODEL_LABEL, genai.TOKEN_TYPE_LABEL],
        registry=registry,
        buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536),
    )
    for input_tokens, output_tokens in calls:
        usage.labels(operation, "openai", "m", genai.INPUT_TOKENS).observe(input_tokens)
        usage.labels(operation, "openai", "m", genai.OUTPUT_TOKENS).observe(output_tokens)
    return EXPOSITION + generate_latest(registry).decode()


def test_tokens_per_call_comes_from_the_same_parse_as_the_requests() -> None:
    traffic = parse_traffic(token_exposition((100, 50), (300, 150)))
    assert (traffic.requests, traffic.errors) == (100, 10)  # the HTTP metrics are read as before
    assert (traffic.chat_calls, traffic.chat_tokens) == (2, 600)
    assert traffic.tokens_per_call() == 300
    assert parse_traffic(EXPOSITION).tokens_per_call() is None
    # Another operation's token usage is not a chat call's.
    assert parse_traffic(token_exposition((10, 10), operation="embeddings")).chat_calls == 0
    both = parse_traffic(token_exposition((100, 50))) + parse_traffic(token_exposition((300, 150), (0, 0)))
    assert (both.chat_calls, both.tokens_per_call()) == (3, 200)


def calls(count: int, tokens: float) -> Traffic:
    return Traffic(chat_calls=count, chat_tokens=tokens)


@pytest.mark.parametrize(
    ("preview", "stable", "limit", "result", "message"),
    [
        (Traffic(), Traffic(), 1.5, "Passed", "no chat calls on either colour yet"),
        (Traffic(), calls(4, 4000), 1.5, "Passed", "no chat calls on the preview yet (stable: 1000.0 tokens per call)"),
        (
            calls(2, 3000),
            Traffic(),
            1.5,
            "Passed",
            "preview 1500.0 tokens per chat call over 2 calls; no chat calls on the stable colour to compare with",
        ),
        (
            calls(10, 15000),
            calls(10, 10000),
            1.5,
            "Passed",
            "preview 1500.0 tokens per chat call over 10 calls, stable 1000.0 over 10: ratio 1.50 (limit 1.5)",
        ),
        (
            calls(10, 15100),
            calls(10, 10000),
            1.5,
            "Failed",
            "preview 1510.0 tokens per chat call over 10 calls, stable 1000.0 over 10: ratio 1.51 (limit 1.5)",
        ),
        (calls(3, 300), calls(30, 6000), 1, "Passed", None),  # fewer tokens than before: fine
        (
            calls(1, 10),
            calls(5, 0),
            1000,
            "Failed",
            "preview 10.0 tokens per chat call over 1 calls, stable 0.0 over 5: the stable colour spends none"
            " (limit 1000)",
        ),
        (calls(1, 0), calls(5, 0), 1, "Passed", None),
    ],
)
def test_tokens_per_request_judges_the_preview_against_the_stable_colour(
    preview: Traffic, stable: Traffic, limit: float, result: str, message: str | None
) -> None:
    check = judge_tokens(preview, stable, limit)
    assert (check.name, check.result) == (CheckName.TOKENS_PER_REQUEST, AnalysisResult(result))
    if message is not None:
        assert check.message == message


def test_the_ratio_is_optional_and_at_least_one() -> None:
    assert AnalysisSpec().max_tokens_per_request_ratio is None
    assert AnalysisSpec.model_validate({"maxTokensPerRequestRatio": 1}).max_tokens_per_request_ratio == 1.0
    for bad in (0.99, 0, -1, "lots"):
        with pytest.raises(ValidationError, match="maxTokensPerRequestRatio"):
            AnalysisSpec.model_validate({"maxTokensPerRequestRatio": bad})
