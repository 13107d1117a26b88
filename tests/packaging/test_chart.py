"""charts/enterprise-agent-operator: rendered by helm with each ci/*-values.yaml, every object
validated strictly, the values schema refusing bad values, least-privilege RBAC, and the alerts and
dashboard checked by promtool against the metric names our code exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import prometheus_client
import pytest
import yaml

import agent_operator.metrics  # noqa: F401 - registers the operator's metrics
from agent_operator import kinds
from agent_operator.cli import build_parser
from agent_operator.crd import build_crd
from agent_runtime.metrics import RuntimeMetrics
from eao_devtools.cluster import ensure_tools
from tests.helpers import CRD_FILE, KUBERNETES_VERSION, ROOT
from tests.packaging.chart import CHART, CI_VALUES, RELEASE_NAMESPACE, by_kind, helm, render

PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # no schema in kubernetes-validate
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
# Series the alerts read from other exporters (cAdvisor in the kubelet, kube-state-metrics).
EXTERNAL_SERIES = {"container_memory_working_set_bytes", "container_cpu_usage_seconds_total",
                   "kube_pod_container_resource_limits"}  # fmt: skip


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_is_clean(values: Path) -> None:
    result = helm("lint", "--strict", str(CHART), "--values", str(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_every_rendered_object_passes_strict_validation(values: Path) -> None:
    objects = render(values)
    assert by_kind(objects, "Deployment"), "nothing rendered"
    for obj in objects:
        if obj["kind"] in PROMETHEUS_OPERATOR_KINDS:
            continue  # promtool and selectors below; their CRDs in tests/cluster/test_monitoring_crds.py
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "eao"


def test_strict_validation_can_fail() -> None:
    deployment = by_kind(render(), "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_operator_deployment_defaults() -> None:
    objects = render()
    (deployment,) = by_kind(objects, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 2
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                      "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}  # fmt: skip
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    # The arguments are ones `agent-operator run` accepts, and leader election is on.
    parsed = build_parser().parse_args(["run", *container["args"]])
    assert (parsed.lease_namespace, parsed.lease_name) == (RELEASE_NAMESPACE, "enterprise-agent-operator")
    assert parsed.namespace in (None, [])
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_services_and_monitors_select_the_operator_pods() -> None:
    objects = render(CHART / "ci" / "monitoring-values.yaml")
    pod_labels = by_kind(objects, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    (service,) = by_kind(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (dashboard,) = by_kind(objects, "ConfigMap")
    assert json.loads(dashboard["data"]["enterprise-agents.json"]) == json.loads(DASHBOARD.read_text())


# --- values.schema.json ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "named"),
    [
        ("replicaCount=0", "/replicaCount"),
        ("replicaCount=two", "/replicaCount"),
        ("logFormat=xml", "/logFormat"),
        ("image.digest=latest", "/image/digest"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("watchNamespaces[0]=Team_A", "/watchNamespaces/0"),
        ("leaderElection.leaseSeconds=1", "/leaderElection/leaseSeconds"),
        ("metrics.port=70000", "/metrics/port"),
        ("replicas=2", "replicas"),  # a typo of replicaCount: unknown keys are refused, not ignored
        ("rbac.serviceMonitor=true", "serviceMonitor"),
    ],
)
def test_the_values_schema_refuses_bad_values_and_names_them(assignment: str, named: str) -> None:
    result = helm("template", "eao", str(CHART), "--set", assignment)
    assert result.returncode != 0, f"{assignment} was accepted"
    assert named in result.stderr, result.stderr


def test_every_value_is_described() -> None:
    """Each value has a description in the schema and a comment in values.yaml."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        assert node.get("description"), f"{path or 'values'} has no description in values.schema.json"
        if isinstance(value, dict) and "properties" in node:
            assert set(value) <= set(node["properties"]), f"{path}: values.yaml has keys the schema lacks"
            for key, child in node["properties"].items():
                walk(child, value.get(key), f"{path}.{key}")

    for key, child in schema["properties"].items():
        walk(child, values.get(key), key)
    # In values.yaml, each key has a comment right above it, or sits under a key that has one.
    ancestors: list[tuple[int, bool]] = []  # (indent, commented) of the keys enclosing this line
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        key = re.match(r"^( *)([a-zA-Z]\w*):", line)
        if key:
            indent = len(key.group(1))
            ancestors = [a for a in ancestors if a[0] < indent]
            commented = previous.strip().startswith("#")
            assert commented or any(c for _, c in ancestors), f"values.yaml: {key.group(2)} has no comment"
            ancestors.append((indent, commented))
        if line.strip():
            previous = line


# --- CRDs ---------------------------------------------------------------------------------------


def test_the_chart_ships_the_current_crd() -> None:
    (shipped,) = list((CHART / "crds").glob("*.yaml"))
    assert shipped.read_text() == CRD_FILE.read_text(), "run `make crds`"
    assert yaml.safe_load(shipped.read_text()) == build_crd()


# --- RBAC ------------------------------------------------------------------------------------------


def rules_by_resource(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], f"wildcard in {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def used_resources(service_monitors: bool) -> set[tuple[str, str]]:
    """(API group, resource) of everything the operator's API module talks to, less the Lease."""
    used = set()
    for kind in kinds.ALL_KINDS:
        if kind is kinds.LEASE or (kind.plural == "servicemonitors" and not service_monitors):
            continue
        used.add((kind.group, kind.plural))
    return used | {
        (kinds.AGENT.group, f"{kinds.AGENT.plural}/status"),
        (kinds.AGENT.group, f"{kinds.AGENT.plural}/finalizers"),
    }


def granted_verbs(service_monitors: bool) -> dict[tuple[str, str], set[str]]:
    """The verbs the kinds table says the operator needs on each resource."""
    needed = {
        (kind.group, kind.plural): set(kind.verbs)
        for kind in kinds.ALL_KINDS
        if kind is not kinds.LEASE and (kind.plural != "servicemonitors" or service_monitors)
    }
    return needed | {
        (kinds.AGENT.group, f"{kinds.AGENT.plural}/status"): set(kinds.AGENT_STATUS_VERBS),
        (kinds.AGENT.group, f"{kinds.AGENT.plural}/finalizers"): set(kinds.AGENT_FINALIZERS_VERBS),
    }


def test_cluster_mode_grants_exactly_what_the_operator_uses() -> None:
    objects = render()
    roles = {r["metadata"]["name"]: r for r in by_kind(objects, "ClusterRole")}
    granted = rules_by_resource(roles["eao-enterprise-agent-operator"]["rules"])
    assert set(granted) == used_resources(service_monitors=False)
    assert granted == granted_verbs(service_monitors=False)
    assert granted[("", "secrets")] == {"get", "list", "watch", "create", "patch"}  # never delete
    # Patched only to answer an undo request; never created, updated whole or deleted.
    assert granted[("agents.enterprise.io", "enterpriseagents")] == {"get", "list", "watch", "patch"}
    assert granted[("", "events")] == {"create"}
    discovery = rules_by_resource(roles["eao-enterprise-agent-operator-discovery"]["rules"])
    assert discovery == {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
                         ("", "namespaces"): {"list", "watch"}}  # fmt: skip
    (lease_role,) = [r for r in by_kind(objects, "Role") if r["metadata"]["name"].endswith("leader-election")]
    assert lease_role["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert {"create"} in [set(r["verbs"]) for r in lease_role["rules"] if "resourceNames" not in r]
    assert [r["resourceNames"] for r in lease_role["rules"] if "resourceNames" in r] == [["enterprise-agent-operator"]]
    assert {verb for r in lease_role["rules"] for verb in r["verbs"]} == set(kinds.LEASE.verbs)


def test_service_monitor_rights_only_when_asked() -> None:
    roles = by_kind(render(CHART / "ci" / "monitoring-values.yaml"), "ClusterRole")
    main = next(r for r in roles if r["metadata"]["name"] == "eao-enterprise-agent-operator")
    assert rules_by_resource(main["rules"]) == granted_verbs(service_monitors=True)


def test_namespaced_mode_grants_nothing_on_agents_cluster_wide() -> None:
    objects = render(CHART / "ci" / "namespaced-values.yaml")
    cluster_roles = by_kind(objects, "ClusterRole")
    assert [r["metadata"]["name"] for r in cluster_roles] == ["eao-enterprise-agent-operator-discovery"]
    roles = [r for r in by_kind(objects, "Role") if not r["metadata"]["name"].endswith("leader-election")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rules_by_resource(role["rules"]) == granted_verbs(service_monitors=False)
    bindings = [b for b in by_kind(objects, "RoleBinding") if not b["metadata"]["name"].endswith("leader-election")]
    assert {(b["metadata"]["namespace"], b["subjects"][0]["namespace"]) for b in bindings} == {
        ("team-a", RELEASE_NAMESPACE),
        ("team-b", RELEASE_NAMESPACE),
    }
    args = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert build_parser().parse_args(["run", *args]).namespace == ["team-a", "team-b"]


# --- alerts and dashboard --------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ensure_tools() / "promtool"), *args], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def test_the_alert_rules_parse() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_the_alerts_fire_above_their_thresholds_and_not_below() -> None:
    result = promtool("test", "rules", str(ROOT / "tests" / "packaging" / "alerts_test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_prometheus_rule_carries_the_alerts_file() -> None:
    (rule,) = by_kind(render(CHART / "ci" / "monitoring-values.yaml"), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


def exported_series() -> set[str]:
    """Every series name the runtime and the operator expose."""
    names = set()
    for registry in (RuntimeMetrics().registry, prometheus_client.REGISTRY):
        for family in registry.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
            else:
                names.add(family.name)
    return names


def series_in(expression: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers of ours (agent_*) or the known exporters'."""
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", re.sub(r'"[^"]*"', '""', expression)))
    return {w for w in words if w.startswith("agent_") or w in EXTERNAL_SERIES or w.startswith(("container_", "kube_"))}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_alerts_and_dashboard_read_only_series_that_exist() -> None:
    alerts = yaml.safe_load(ALERTS.read_text())
    expressions = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]] + dashboard_expressions()
    test_series = yaml.safe_load((ROOT / "tests" / "packaging" / "alerts_test.yaml").read_text())
    expressions += [s["series"] for test in test_series["tests"] for s in test["input_series"]]
    read = set().union(*(series_in(e) for e in expressions))
    assert read - EXTERNAL_SERIES, "no series of ours found: the name extraction is broken"
    assert read - EXTERNAL_SERIES <= exported_series(), read - EXTERNAL_SERIES - exported_series()
    assert read & EXTERNAL_SERIES == EXTERNAL_SERIES


def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each panel query, with Grafana's $namespace filled in, parses as PromQL (promtool)."""
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    rules = [{"record": f"dashboard:query{i}", "expr": e.replace("$namespace", ".*")}
             for i, e in enumerate(dashboard_expressions())]  # fmt: skip
    rule_file = tmp_path / "dashboard-rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
