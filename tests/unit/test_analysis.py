"""Judging /metrics: error rate and p95 from the runtime's exposition text."""

from __future__ import annotations

import pytest

from agent_operator.analysis import Traffic, judge_metrics, parse_traffic
from agent_operator.spec import AnalysisResult, AnalysisSpec

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
