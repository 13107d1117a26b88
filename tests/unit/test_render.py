"""The pure renderers: what each child looks like, and what the revision hash depends on."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent_contract.config import RuntimeConfig, SecurityLevel
from agent_operator.render import (
    ColorPlan,
    KeyVersions,
    RenderPlan,
    active_selector,
    build_children,
    compute_revision,
    first_render,
)
from agent_operator.render.common import (
    ANNOTATION_SPEC,
    LABEL_COLOR,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_REVISION,
    decode_spec,
)
from agent_operator.render.keys import build_key_secret
from agent_operator.spec import Color, EnterpriseAgent
from tests.helpers import example_agent, example_document


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _agent(**spec_changes: Any) -> EnterpriseAgent:
    """The full example with some spec fields changed (maps merged, other values replaced)."""
    document = example_document("full")
    document["spec"] = _merge(document["spec"], spec_changes)
    return EnterpriseAgent.model_validate(document)


def _by_kind(children: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    result: dict[str, list[dict[str, Any]]] = {}
    for child in children:
        result.setdefault(child["kind"], []).append(child)
    return result


def _children(agent: EnterpriseAgent, plan: RenderPlan | None = None) -> dict[str, list[dict[str, Any]]]:
    return _by_kind(build_children(agent, plan or RenderPlan.initial(agent)))


def test_full_example_renders_every_child_kind() -> None:
    kinds = _children(example_agent("full"))
    assert sorted(kinds) == sorted(
        [
            "ServiceAccount",
            "Secret",
            "ConfigMap",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "ServiceMonitor",
        ]
    )
    assert len(kinds["Service"]) == 2


def test_minimal_example_has_no_optional_children() -> None:
    kinds = _children(example_agent("minimal"))
    assert "HorizontalPodAutoscaler" not in kinds
    assert "ServiceMonitor" not in kinds
    assert "NetworkPolicy" in kinds  # default deny is on unless switched off


def test_every_child_is_labelled_and_namespaced() -> None:
    agent = example_agent("full")
    for child in build_children(agent, RenderPlan.initial(agent)):
        labels = child["metadata"]["labels"]
        assert labels[LABEL_NAME] == "support-bot", child["kind"]
        assert labels[LABEL_MANAGED_BY] == "enterprise-agent-operator", child["kind"]
        assert child["metadata"]["namespace"] == "agents"


def test_pod_is_hardened_to_restricted_pod_security() -> None:
    (deployment,) = _children(example_agent("minimal"))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/agent/config.yaml"]["readOnly"] is True
    assert mounts["/etc/agent/keys"]["readOnly"] is True
    assert "/tmp" in mounts
    assert "/var/lib/agent" in mounts
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"


def test_users_secret_is_mounted_only_when_referenced() -> None:
    def mounts(agent: EnterpriseAgent) -> set[str]:
        (deployment,) = _children(agent)["Deployment"]
        return {m["mountPath"] for m in deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}

    assert "/etc/agent/users" in mounts(example_agent("full"))
    assert "/etc/agent/users" not in mounts(example_agent("minimal"))


def test_config_map_carries_the_runtime_config_model() -> None:
    agent = example_agent("full")
    (config_map,) = _children(agent)["ConfigMap"]
    config = RuntimeConfig.from_yaml(config_map["data"]["config.yaml"])
    assert config.agent_name == "support-bot"
    assert config.security_level is SecurityLevel.CONFIDENTIAL
    assert config.operations == ["analyze_data", "generate_report", "process_document", "chat"]
    assert config.auth.token_ttl_seconds == 600
    assert config.auth.users_file == "/etc/agent/users/users"
    assert "agent-operator" in config.roles
    assert [f.value for f in config.compliance.frameworks] == ["GDPR", "SOX"]
    assert config.egress.allowed_hosts == ["*.tools.example", "llm.internal.example"]  # spec.model's host joins
    assert config_map["immutable"] is True
    assert config_map["metadata"]["name"].endswith(config_map["metadata"]["labels"][LABEL_REVISION])


def test_hpa_targets_the_agent_not_a_deployment() -> None:
    (hpa,) = _children(example_agent("full"))["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "agents.enterprise.io/v1alpha1",
        "kind": "EnterpriseAgent",
        "name": "support-bot",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    scale_up = hpa["spec"]["behavior"]["scaleUp"]
    assert scale_up["stabilizationWindowSeconds"] == 0
    assert {"type": "Pods", "value": 2, "periodSeconds": 60} in scale_up["policies"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_services_select_the_planned_colours() -> None:
    agent = example_agent("minimal")
    plan = RenderPlan(
        deployments=(ColorPlan(Color.GREEN, 2), ColorPlan(Color.BLUE, 1)),
        active_color=Color.GREEN,
        preview_color=Color.BLUE,
    )
    kinds = _children(agent, plan)
    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    assert services["hello-agent"]["spec"]["selector"][LABEL_COLOR] == "green"
    assert services["hello-agent-preview"]["spec"]["selector"][LABEL_COLOR] == "blue"
    replicas = {d["metadata"]["labels"][LABEL_COLOR]: d["spec"]["replicas"] for d in kinds["Deployment"]}
    assert replicas == {"green": 2, "blue": 1}
    assert active_selector(agent, Color.GREEN) == (
        "agents.enterprise.io/color=green,app.kubernetes.io/instance=hello-agent,app.kubernetes.io/name=hello-agent"
    )


def test_stable_colour_renders_from_its_record_during_a_rollout() -> None:
    """The stable colour keeps its old template and ConfigMap; the preview gets the new spec."""
    old = _agent(image="registry.example/support-bot:2.1.0")
    new = _agent(image="registry.example/support-bot:2.2.0")
    (old_deployment,) = _children(old)["Deployment"]
    old_revision = old_deployment["metadata"]["labels"][LABEL_REVISION]
    record = first_render(old, old_revision)
    plan = RenderPlan(
        deployments=(ColorPlan(Color.BLUE, 3, record), ColorPlan(Color.GREEN, 1)),
        active_color=Color.BLUE,
        preview_color=Color.GREEN,
    )
    kinds = _children(new, plan)
    by_colour = {d["metadata"]["labels"][LABEL_COLOR]: d for d in kinds["Deployment"]}
    assert by_colour["blue"]["spec"]["template"] == old_deployment["spec"]["template"]
    assert by_colour["green"]["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":2.2.0")
    config_maps = {c["metadata"]["labels"][LABEL_REVISION] for c in kinds["ConfigMap"]}
    assert config_maps == {old_revision, by_colour["green"]["metadata"]["labels"][LABEL_REVISION]}
    # The Deployment still records the spec it runs, for `kubectl ea` plugins before ControllerRevisions.
    assert decode_spec(by_colour["blue"]["metadata"]["annotations"][ANNOTATION_SPEC])["image"].endswith(":2.1.0")


def test_encoded_spec_refuses_garbage() -> None:
    with pytest.raises(ValueError, match="not an encoded spec"):
        decode_spec("bm90IGd6aXA=")


def test_deployment_selector_is_stable_across_revisions() -> None:
    """A Deployment's selector is immutable: it must not contain the revision or the version."""
    first = _children(_agent(image="registry.example/support-bot:2.1.0"))["Deployment"][0]
    second = _children(_agent(image="registry.example/support-bot:2.2.0"))["Deployment"][0]
    assert first["spec"]["selector"] == second["spec"]["selector"]
    assert first["metadata"]["labels"][LABEL_REVISION] != second["metadata"]["labels"][LABEL_REVISION]


def test_network_policy_admits_listed_callers_and_the_operator() -> None:
    agent = example_agent("full")
    (policy,) = _by_kind(build_children(agent, RenderPlan.initial(agent, operator_namespace="ops")))["NetworkPolicy"]
    peers = policy["spec"]["ingress"][0]["from"]
    namespaces = peers[1]["namespaceSelector"]["matchExpressions"][0]["values"]
    assert namespaces == ["frontend", "monitoring", "ops"]
    egress_cidrs = [
        peer["ipBlock"]["cidr"] for rule in policy["spec"]["egress"] for peer in rule.get("to", []) if "ipBlock" in peer
    ]
    assert egress_cidrs == ["10.20.0.0/16", "10.40.8.0/24"]  # allowedEgressCIDRs, then spec.model.egressCIDRs
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_key_secret_has_no_data_until_the_reconciler_supplies_it() -> None:
    agent = example_agent("minimal")
    assert "data" not in build_key_secret(agent)
    assert build_key_secret(agent, {"jwt-a": "eA=="})["data"] == {"jwt-a": "eA=="}


REVISION_TRIGGERS = {
    "image": {"image": "registry.example/support-bot:2.2.0"},
    "env": {"env": [{"name": "LOG_LEVEL", "value": "debug"}]},
    "runtime config": {"securityLevel": "restricted"},
    "operations": {"operations": ["analyze_data", "chat"]},
    "resources": {"resources": {"requests": {"cpu": "1"}}},
    "egress hosts (runtime-enforced)": {"networkPolicy": {"allowedEgressHosts": ["other.example"]}},
    "shared-state Secret": {"state": {"postgres": {"secretRef": {"name": "other-db-app"}}}},
    "shared-state Secret key": {"state": {"postgres": {"secretRef": {"key": "fqdn-uri"}}}},
    "model endpoint": {"model": {"baseUrl": "https://llm2.internal.example/v1"}},
    "model name": {"model": {"model": "meta-llama/Llama-3.3-70B-Instruct"}},
    "model key Secret": {"model": {"apiKeySecretRef": {"name": "model-credentials-2", "key": "api-key"}}},
    "model CA bundle": {"model": {"caBundle": {"configMapRef": {"name": "other-ca"}}}},
    "model timeout": {"model": {"timeoutSeconds": 90}},
    "limits": {"limits": {"perCaller": {"tokensPerHour": 100000}}},
}
NOT_REVISION_TRIGGERS = {
    "replicas": {"replicas": 3},
    "autoscaling": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 30}},
    "rollout": {"rollout": {"promotion": "Auto", "scaleDownDelaySeconds": 10}},
    "network policy ingress": {"networkPolicy": {"allowedIngressNamespaces": ["other"]}},
    "database egress": {"state": {"postgres": {"egress": {"cidrs": ["10.30.0.0/24"], "port": 6432}}}},
    "model egress CIDRs (NetworkPolicy only)": {"model": {"egressCIDRs": ["10.40.9.0/24"]}},
}


@pytest.mark.parametrize("change", REVISION_TRIGGERS.values(), ids=list(REVISION_TRIGGERS))
def test_revision_changes_with_what_replaces_pods(change: dict[str, Any]) -> None:
    assert compute_revision(_agent(**change), KeyVersions()) != compute_revision(_agent(), KeyVersions())


@pytest.mark.parametrize("change", NOT_REVISION_TRIGGERS.values(), ids=list(NOT_REVISION_TRIGGERS))
def test_revision_ignores_what_does_not(change: dict[str, Any]) -> None:
    assert compute_revision(_agent(**change), KeyVersions()) == compute_revision(_agent(), KeyVersions())


def test_revision_changes_with_key_versions_not_key_material() -> None:
    agent = _agent()
    one = KeyVersions(signing=("a",), encryption=("b",), active_signing="a", active_encryption="b")
    rotated = KeyVersions(signing=("a", "c"), encryption=("b",), active_signing="c", active_encryption="b")
    assert compute_revision(agent, one) != compute_revision(agent, rotated)
    assert compute_revision(agent, one) == compute_revision(agent, KeyVersions(**one.__dict__))


def test_rendering_is_deterministic() -> None:
    agent = example_agent("full")
    assert build_children(agent, RenderPlan.initial(agent)) == build_children(agent, RenderPlan.initial(agent))


# Zero values the API server keeps (pointer fields: absent means the API's default, not zero).
# A zero anywhere else is dropped by the server, so the drift comparison, which wants every field
# we set to be present, would see it missing and apply the child again on every resync.
ZERO_KEPT = {
    "automountServiceAccountToken",
    "enableServiceLinks",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "runAsNonRoot",
    "maxUnavailable",
    "replicas",
    "stabilizationWindowSeconds",
    "tolerationSeconds",
    "optional",
}
EMPTY_STRUCT_KEPT = {"podSelector", "namespaceSelector", "emptyDir"}  # {} selects everything, or is a source
MAPS = {"labels", "annotations", "matchLabels", "nodeSelector", "data", "selector", "requests", "limits"}


def dropped_zeros(value: Any, path: str = "", key: str = "") -> list[str]:
    """Paths in a rendered child where it sets a zero value the API server would drop."""
    if isinstance(value, dict):
        if not value:
            return [] if key in EMPTY_STRUCT_KEPT else [path]
        if key in MAPS:  # entries of a map are kept whatever their value
            return []
        return [p for k, v in value.items() for p in dropped_zeros(v, f"{path}.{k}", k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in dropped_zeros(v, f"{path}[{i}]", key)] if value else [path]
    if value is not True and value in (False, 0, "") and key not in ZERO_KEPT:
        return [path]
    return []


def rendered_zeros(children: list[dict[str, Any]]) -> list[str]:
    found = []
    for child in children:
        # A ControllerRevision's data is a raw extension: stored byte for byte, never compared.
        body = {k: v for k, v in child.items() if not (child["kind"] == "ControllerRevision" and k == "data")}
        found += [f"{child['kind']}/{child['metadata']['name']}{p}" for p in dropped_zeros(body)]
    return found


ZERO_PRONE_SPECS: list[dict[str, Any]] = [
    {},
    {"env": [{"name": "EMPTY", "value": ""}]},
    {"networkPolicy": {"allowedIngressPodLabels": {}, "allowedEgressCIDRs": ["10.0.0.0/8"], "egressPorts": []}},
    {"pod": {"tolerations": [{"key": "", "operator": "Exists", "value": ""}]}},
    {"resources": {"requests": {}, "limits": {}}},
    {
        "state": {
            "postgres": {"secretRef": {"name": "db"}, "egress": {"namespaceSelector": {}, "podSelector": {"a": "b"}}}
        }
    },
]


@pytest.mark.parametrize("changes", ZERO_PRONE_SPECS, ids=lambda c: ",".join(c) or "full")
def test_children_set_no_zero_value_the_api_server_drops(changes: dict[str, Any]) -> None:
    agent = _agent(**changes)
    blue = RenderPlan.initial(agent)
    both = replace(blue, deployments=(ColorPlan(Color.BLUE, 2), ColorPlan(Color.GREEN, 0)))
    assert rendered_zeros(build_children(agent, blue)) == []
    assert rendered_zeros(build_children(agent, both)) == []


def test_the_zero_value_check_can_fail() -> None:
    children = build_children(_agent(), RenderPlan.initial(_agent()))
    deployment = next(c for c in children if c["kind"] == "Deployment")
    deployment["spec"]["paused"] = False
    deployment["spec"]["template"]["spec"]["containers"][0]["args"] = []
    assert sorted(rendered_zeros([deployment])) == [
        "Deployment/support-bot-blue.spec.paused",
        "Deployment/support-bot-blue.spec.template.spec.containers[0].args",
    ]
