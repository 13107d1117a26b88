"""The chart's ServiceMonitor and PrometheusRule, and the ServiceMonitor the operator renders for an
agent, against the Prometheus Operator's own CRDs (v0.85.0, from the Go module proxy): the local
API server validates them with `--dry-run=server --validate=strict`, as it would on install."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from agent_operator.render import RenderPlan, build_children
from eao_devtools.cluster import prometheus_operator_crds
from eao_devtools.testkit.kube import Kube
from tests.helpers import example_agent
from tests.packaging.chart import CHART, by_kind, render

pytestmark = pytest.mark.cluster
CRDS = ("servicemonitors", "prometheusrules")


@pytest.fixture(scope="module")
def monitoring_crds(kube: Kube) -> Iterator[Kube]:
    folder = prometheus_operator_crds()
    for name in CRDS:
        kube.kubectl("apply", "--server-side", "-f", str(folder / f"monitoring.coreos.com_{name}.yaml"))
    for name in CRDS:
        kube.wait_established(f"{name}.monitoring.coreos.com")
    yield kube
    for name in CRDS:  # nothing else in the test run expects them
        kube.kubectl("delete", "crd", f"{name}.monitoring.coreos.com", "--wait=false", check=False)


def server_dry_run(kube: Kube, obj: dict[str, Any]) -> tuple[int, str]:
    result = kube.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=json.dumps(obj),
                          check=False)  # fmt: skip
    return result.returncode, result.stderr


def monitoring_objects(namespace: str) -> list[dict[str, Any]]:
    chart = render(CHART / "ci" / "monitoring-values.yaml", namespace=namespace)
    agent = example_agent("full")
    rendered = [c for c in build_children(agent, RenderPlan.initial(agent)) if c["kind"] == "ServiceMonitor"]
    assert rendered, "examples/full.yaml should render a ServiceMonitor"
    for monitor in rendered:
        monitor["metadata"]["namespace"] = namespace
        monitor["metadata"].pop("ownerReferences", None)
    return by_kind(chart, "ServiceMonitor") + by_kind(chart, "PrometheusRule") + rendered


def test_our_monitoring_objects_fit_the_prometheus_operator_crds(monitoring_crds: Kube, namespace: str) -> None:
    objects = monitoring_objects(namespace)
    assert sorted(o["kind"] for o in objects) == ["PrometheusRule", "ServiceMonitor", "ServiceMonitor"]
    for obj in objects:
        code, stderr = server_dry_run(monitoring_crds, obj)
        assert code == 0, f"{obj['kind']} {obj['metadata']['name']}: {stderr}"


def test_the_crds_do_refuse_a_wrong_field(monitoring_crds: Kube, namespace: str) -> None:
    """The check above can fail: a misspelt field and a wrong type are refused by name."""
    objects = monitoring_objects(namespace)
    monitor = by_kind(objects, "ServiceMonitor")[0]
    monitor["spec"]["endpoints"][0]["portt"] = "metrics"
    code, stderr = server_dry_run(monitoring_crds, monitor)
    assert code != 0
    assert "portt" in stderr
    rule = by_kind(objects, "PrometheusRule")[0]
    rule["spec"]["groups"][0]["rules"][0]["for"] = 10
    code, stderr = server_dry_run(monitoring_crds, rule)
    assert code != 0
    assert "for" in stderr
