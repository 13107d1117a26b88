"""Replicated agents, the operator's side: spec.state.postgres from the spec to the pod's
DATABASE_URL (a Secret reference, never the value), the NetworkPolicy's egress to the database,
a missing Secret or key (Stalled, naming the field), and the SharedStateMissing warning."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any, cast

import pytest
import yaml

from agent_operator import conditions as cond
from agent_operator.conditions import Reason
from agent_operator.controller import Controller, ControllerSettings, NotLeadingError
from agent_operator.kube import Kube
from agent_operator.manifest import ManifestError, parse_agent
from agent_operator.reconcile import (
    Memo,
    Plan,
    child_key,
    missing_references,
    reconcile,
    shared_state_missing,
)
from agent_operator.render import RenderPlan, build_children
from agent_operator.render.common import ANNOTATION_SPEC, decode_spec
from agent_operator.render.references import referenced_objects
from agent_operator.spec import ConditionStatus, ConditionType, EnterpriseAgent, Phase
from tests.helpers import example_agent, example_document, observe, rolled_out, served
from tests.kube_schema import api_errors

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATER = datetime(2026, 1, 1, 0, 5, tzinfo=UTC)
POSTGRES = {"secretRef": {"name": "hello-db-app"}}
URI = "postgresql://app:s3cret-Passw0rd@hello-db-rw:5432/app"


def document(**spec: Any) -> dict[str, Any]:
    """The minimal example with these spec fields set."""
    body = example_document("minimal")
    body["spec"] = {**body["spec"], **spec}
    return body


def agent(**spec: Any) -> EnterpriseAgent:
    return EnterpriseAgent.model_validate(document(**spec))


def served_with(status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> dict[str, Any]:
    body = served("minimal", status, generation)
    body["spec"] = {**body["spec"], **spec}
    return body


def pod_env(agent: EnterpriseAgent) -> dict[str, dict[str, Any]]:
    (deployment,) = [c for c in build_children(agent, RenderPlan.initial(agent)) if c["kind"] == "Deployment"]
    return {var["name"]: var for var in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def network_policy(agent: EnterpriseAgent) -> dict[str, Any]:
    (policy,) = [c for c in build_children(agent, RenderPlan.initial(agent)) if c["kind"] == "NetworkPolicy"]
    return policy


def refusals(body: dict[str, Any]) -> tuple[str, list[str]]:
    """What the operator's validation and the API server's schema and CEL say about ``body``."""
    with pytest.raises(ManifestError) as caught:
        parse_agent(body)
    return str(caught.value), api_errors(body)


# --- the spec -------------------------------------------------------------------------------------


def test_the_key_defaults_to_uri_as_in_cloudnativepg_app_secrets() -> None:
    postgres = agent(state={"postgres": POSTGRES}).spec.state.postgres
    assert postgres is not None
    assert (postgres.secret_ref.name, postgres.secret_ref.key) == ("hello-db-app", "uri")
    assert postgres.egress is None
    assert agent().spec.state.postgres is None
    assert api_errors(document(state={"postgres": POSTGRES})) == []


@pytest.mark.parametrize(
    ("postgres", "field"),
    [
        ({"secretRef": {"key": "uri"}}, "spec.state.postgres.secretRef.name"),
        ({"secretRef": {"name": "Not_A_Name"}}, "spec.state.postgres.secretRef.name"),
        ({"secretRef": {"name": "db", "key": "a key"}}, "spec.state.postgres.secretRef.key"),
        ({}, "spec.state.postgres.secretRef"),
        ({**POSTGRES, "egress": {"port": 5432}}, "spec.state.postgres.egress"),
        ({**POSTGRES, "egress": {"cidrs": [], "port": 5432}}, "spec.state.postgres.egress"),
        ({**POSTGRES, "egress": {"cidrs": ["10.0.0.0/8"], "port": 0}}, "spec.state.postgres.egress.port"),
        ({**POSTGRES, "egress": {"podSelector": {"a": "b"}, "extra": 1}}, "spec.state.postgres.egress.extra"),
    ],
)
def test_both_layers_refuse_a_bad_postgres_spec_naming_the_field(postgres: dict[str, Any], field: str) -> None:
    operator, api = refusals(document(state={"postgres": postgres}))
    assert field in operator, operator
    assert any(field in error for error in api), api


def test_cidr_host_bits_are_for_the_operator_to_refuse() -> None:
    body = document(state={"postgres": {**POSTGRES, "egress": {"cidrs": ["10.30.0.0/24", "10.1.2.3/8"]}}})
    operator, api = refusals(body)
    assert "spec.state.postgres.egress.cidrs[1]: '10.1.2.3/8' is not a valid CIDR" in operator
    assert api == []  # the schema sees a CIDR's shape only: the operator stalls it instead


def test_database_url_is_the_operators_to_set() -> None:
    for env in ([{"name": "DATABASE_URL", "value": URI}],
                [{"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "db", "key": "uri"}}}]):  # fmt: skip
        operator, api = refusals(document(env=env))
        assert "spec.env[0].name: DATABASE_URL is set by the operator from spec.state.postgres.secretRef" in operator
        assert any(e.startswith("spec.env: spec.env must not set DATABASE_URL") for e in api), api


# --- rendering ------------------------------------------------------------------------------------


def test_the_pod_gets_database_url_from_the_secret_and_nothing_else_holds_it() -> None:
    hello = agent(replicas=3, state={"postgres": {"secretRef": {"name": "hello-db-app", "key": "connection"}}})
    env = pod_env(hello)
    assert env["DATABASE_URL"] == {
        "name": "DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": "hello-db-app", "key": "connection"}},
    }
    children = build_children(hello, RenderPlan.initial(hello))
    (config_map,) = [c for c in children if c["kind"] == "ConfigMap"]
    assert "DATABASE_URL" not in json.dumps(config_map)
    assert "postgres" not in json.dumps(config_map).lower()
    # The spec annotation records the reference (for undo), which is all the spec has.
    (deployment,) = [c for c in children if c["kind"] == "Deployment"]
    recorded = decode_spec(deployment["metadata"]["annotations"][ANNOTATION_SPEC])
    assert recorded["state"] == {"postgres": {"secretRef": {"name": "hello-db-app", "key": "connection"}}}


def test_without_state_the_pod_has_no_database_url() -> None:
    assert "DATABASE_URL" not in pod_env(agent(replicas=3))


def test_the_full_example_reaches_its_cloudnativepg_cluster() -> None:
    full = example_agent("full")
    assert pod_env(full)["DATABASE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "support-bot-db-app", "key": "uri"}}
    rules = network_policy(full)["spec"]["egress"]
    assert rules[-1] == {
        "to": [{"podSelector": {"matchLabels": {"cnpg.io/cluster": "support-bot-db"}}}],
        "ports": [{"protocol": "TCP", "port": 5432}],
    }


def test_network_policy_admits_the_database_peers_on_its_port() -> None:
    egress = {
        "cidrs": ["10.30.0.0/24", "fd00:30::/64"],
        "namespaceSelector": {"kubernetes.io/metadata.name": "databases"},
        "podSelector": {"cnpg.io/cluster": "hello-db"},
        "port": 6432,
    }
    rules = network_policy(agent(state={"postgres": {**POSTGRES, "egress": egress}}))["spec"]["egress"]
    database = [rule for rule in rules if {"protocol": "TCP", "port": 6432} in rule.get("ports", [])]
    assert database == [
        {
            "to": [
                {"ipBlock": {"cidr": "10.30.0.0/24"}},
                {"ipBlock": {"cidr": "fd00:30::/64"}},
                {  # one peer: those pods in those namespaces, as a NetworkPolicy reads it
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "databases"}},
                    "podSelector": {"matchLabels": {"cnpg.io/cluster": "hello-db"}},
                },
            ],
            "ports": [{"protocol": "TCP", "port": 6432}],
        }
    ]


def test_network_policy_has_no_database_rule_without_egress() -> None:
    plain = network_policy(agent())["spec"]["egress"]
    assert network_policy(agent(state={"postgres": POSTGRES}))["spec"]["egress"] == plain
    only_pods = network_policy(agent(state={"postgres": {**POSTGRES, "egress": {"podSelector": {"app": "db"}}}}))
    assert only_pods["spec"]["egress"][-1]["to"] == [{"podSelector": {"matchLabels": {"app": "db"}}}]


# --- a missing Secret or key -----------------------------------------------------------------------


def secret(data: dict[str, str] | None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hello-db-app"}, "data": data}


def test_missing_references_name_the_field_and_never_a_value() -> None:
    hello = agent(state={"postgres": POSTGRES})
    assert [r.name_field for r in referenced_objects(hello)] == ["spec.state.postgres.secretRef.name"]
    db = ("Secret", "hello-db-app")
    (gone,) = missing_references(hello, {db: None})
    assert str(gone) == "spec.state.postgres.secretRef.name: Secret 'hello-db-app' not found in namespace 'default'"
    (no_key,) = missing_references(hello, {db: secret({"password": "eA=="})})
    assert str(no_key) == "spec.state.postgres.secretRef.key: Secret 'hello-db-app' has no (or an empty) key 'uri'"
    (empty,) = missing_references(hello, {db: secret({"uri": ""})})
    assert empty.path == "spec.state.postgres.secretRef.key"
    assert missing_references(hello, {db: secret({"uri": "cG9zdGdyZXNxbDovL3g="})}) == []


def test_a_missing_secret_stalls_the_agent_and_touches_no_child() -> None:
    body = served_with(replicas=3, state={"postgres": POSTGRES})
    parsed = observe(body).admission.agent
    assert parsed is not None
    result = reconcile(observe(body, missing=missing_references(parsed, {})), NOW, operator_namespace="ops")
    assert (result.apply, result.delete) == ([], [])
    assert result.status.phase == Phase.STALLED
    stalled = cond.get_condition(result.status.conditions, ConditionType.STALLED)
    assert stalled is not None
    assert (stalled.status, stalled.reason) == (ConditionStatus.TRUE, Reason.MISSING_REFERENCE)
    assert stalled.message.startswith("spec.state.postgres.secretRef.name: Secret 'hello-db-app' not found")
    assert ("Warning", Reason.MISSING_REFERENCE, stalled.message) in result.events
    # Shared state is configured (only its Secret is missing): no SharedStateMissing warning on top.
    assert not cond.is_true(result.status.conditions, ConditionType.SHARED_STATE_MISSING)


class SecretsOnly:
    """A stand-in for the API module that has some Secrets, records each call, and accepts a status."""

    def __init__(self, secrets: dict[str, dict[str, Any]]) -> None:
        self.secrets = secrets
        self.calls: list[tuple[Any, ...]] = []
        self.status: dict[str, Any] | None = None
        self.events: list[tuple[str, str]] = []

    async def find(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("find", api_version, kind, namespace, name))
        return self.secrets.get(name)

    async def apply_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> dict[str, Any]:
        self.status = status
        return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "2"}, "status": status}

    async def post_event(self, involved: Any, type_: str, reason: str, message: str, component: str) -> None:
        self.events.append((type_, reason))

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a Stalled reconcile must not call Kube.{name}")


def test_the_controller_reads_the_referenced_secret_by_name_and_stalls() -> None:
    kube = SecretsOnly({"hello-db-app": secret({"password": "eA=="})})  # the Secret is there, its key is not

    async def scenario() -> str:
        controller = Controller(cast(Kube, kube), ControllerSettings())
        controller.observe_agent("ADDED", served_with(state={"postgres": POSTGRES}))
        controller.start_leading()
        return await controller.reconcile(("default", "hello-agent"))

    assert asyncio.run(scenario()) == "stalled"
    assert kube.calls == [("find", "v1", "Secret", "default", "hello-db-app")]  # one GET, by name
    assert kube.status is not None
    assert kube.status["phase"] == "Stalled"
    assert (
        "spec.state.postgres.secretRef.key: Secret 'hello-db-app' has no (or an empty) key 'uri'"
        in (kube.status["message"])
    )
    assert ("Warning", "MissingReference") in kube.events


class WritesStatus(SecretsOnly):
    """Answers a status write as the API server does: the whole agent at a new resourceVersion."""

    def __init__(self, secrets: dict[str, dict[str, Any]], agent: dict[str, Any]) -> None:
        super().__init__(secrets)
        self.agent = agent
        self.written_over: list[str | None] = []

    async def apply_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> dict[str, Any]:
        self.written_over.append(resource_version)
        metadata = {**self.agent["metadata"], "resourceVersion": str(int(resource_version or "0") + 1)}
        self.agent = {**self.agent, "metadata": metadata, "status": status}
        return self.agent


def test_a_late_event_older_than_our_status_write_does_not_rewind_the_cache() -> None:
    body = served_with(state={"postgres": POSTGRES})
    body["metadata"]["resourceVersion"] = "7"
    kube = WritesStatus({}, body)
    key = ("default", "hello-agent")

    async def scenario() -> Controller:
        controller = Controller(cast(Kube, kube), ControllerSettings())
        controller.observe_agent("ADDED", body)
        controller.start_leading()
        assert await controller.reconcile(key) == "stalled"
        controller.observe_agent("MODIFIED", body)  # the watch's event for version 7, arriving late
        return controller

    controller = asyncio.run(scenario())
    assert kube.written_over == ["7"]  # written only over the version it was computed from
    cached = controller.records[key].body
    assert cached is not None
    assert cached["metadata"]["resourceVersion"] == "8"
    assert cached["status"]["phase"] == "Stalled"  # not rewound to the empty status of version 7
    newer = {**body, "metadata": {**body["metadata"], "resourceVersion": "9"}, "status": cached["status"]}
    controller.observe_agent("MODIFIED", newer)
    assert controller.records[key].body == newer  # anything newer is taken as usual


def test_a_controller_that_does_not_lead_writes_nothing() -> None:
    """The fence behind every write: a reconcile that runs on after a step-down stops at its first
    write instead of landing a status computed before the takeover."""
    kube = SecretsOnly({"hello-db-app": secret({"password": "eA=="})})

    async def scenario() -> None:
        controller = Controller(cast(Kube, kube), ControllerSettings())
        controller.observe_agent("ADDED", served_with(state={"postgres": POSTGRES}))
        controller.start_leading()
        controller.stop_leading()
        with pytest.raises(NotLeadingError):
            await controller.reconcile(("default", "hello-agent"))

    asyncio.run(scenario())
    assert kube.status is None
    assert kube.events == []


# --- SharedStateMissing -----------------------------------------------------------------------------


def run_to_ready(body: dict[str, Any]) -> tuple[Plan, Plan, dict[Any, Any]]:
    """Reconciles ``body`` twice: once to create its children, once with them rolled out."""
    memo = Memo()
    first = reconcile(observe(body), NOW, operator_namespace="ops", memo=memo)
    children = {child_key(c): c for c in first.apply}
    children = rolled_out(children)
    body = {**body, "status": first.status_body()}
    ready = reconcile(observe(body, children), NOW, operator_namespace="ops", memo=memo)
    return first, ready, children


@pytest.mark.parametrize(
    ("spec", "cause"),
    [
        ({"replicas": 3}, "spec.replicas is 3"),
        ({"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 5}}, "spec.autoscaling.maxReplicas is 5"),
        ({"replicas": 2, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8}},
         "spec.autoscaling.maxReplicas is 8"),
    ],
)  # fmt: skip
def test_several_replicas_without_shared_state_warn_but_become_ready(spec: dict[str, Any], cause: str) -> None:
    first, ready, _ = run_to_ready(served_with(**spec))
    warning = cond.get_condition(first.status.conditions, ConditionType.SHARED_STATE_MISSING)
    assert warning is not None
    assert (warning.status, warning.reason) == (ConditionStatus.TRUE, Reason.PER_REPLICA_STATE)
    assert warning.message.startswith(f"{cause} and spec.state.postgres is not set")
    for what in ("logout", "revocation", "consents", "approvals", "reports", "login throttling", "per replica"):
        assert what in warning.message
    assert ("Warning", Reason.PER_REPLICA_STATE, warning.message) in first.events  # once, at creation
    # A warning, not a failure: Ready, not Stalled, and said only once.
    assert ready.status.phase == Phase.READY
    assert cond.is_true(ready.status.conditions, ConditionType.READY)
    assert not cond.is_true(ready.status.conditions, ConditionType.STALLED)
    assert cond.is_true(ready.status.conditions, ConditionType.SHARED_STATE_MISSING)
    assert all(event[1] != Reason.PER_REPLICA_STATE for event in ready.events)


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"replicas": 1},
        {"replicas": 0},
        {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 1}},
        {"autoscaling": {"enabled": False, "maxReplicas": 10}},
        {"replicas": 3, "state": {"postgres": POSTGRES}},
        {"autoscaling": {"enabled": True, "maxReplicas": 10}, "state": {"postgres": POSTGRES}},
    ],
)
def test_one_replica_or_shared_state_is_as_expected(spec: dict[str, Any]) -> None:
    assert shared_state_missing(agent(**spec)) is None
    result = reconcile(observe(served_with(**spec)), NOW, operator_namespace="ops")
    condition = cond.get_condition(result.status.conditions, ConditionType.SHARED_STATE_MISSING)
    assert condition is not None  # present and False, like the other conditions when they do not hold
    assert (condition.status, condition.reason, condition.message) == (ConditionStatus.FALSE, "AsExpected", "")
    assert all(event[0] != "Warning" for event in result.events)


def test_the_warning_clears_when_the_spec_gets_shared_state() -> None:
    _, ready, children = run_to_ready(served_with(replicas=3))
    assert ready.status.phase == Phase.READY
    fixed = served_with(ready.status_body(), generation=2, replicas=3, state={"postgres": POSTGRES})
    after = reconcile(observe(fixed, children), LATER, operator_namespace="ops")
    cleared = cond.get_condition(after.status.conditions, ConditionType.SHARED_STATE_MISSING)
    assert cleared is not None
    assert (cleared.status, cleared.reason, cleared.message) == (ConditionStatus.FALSE, "AsExpected", "")
    assert cleared.last_transition_time == "2026-01-01T00:05:00Z"
    assert cleared.observed_generation == 2
    assert all(event[1] != Reason.PER_REPLICA_STATE for event in after.events)
    # ... and comes back, with a new Warning, when the spec loses it.
    lost = served_with(after.status_body(), generation=3, replicas=3)
    again = reconcile(observe(lost, children), LATER, operator_namespace="ops")
    assert cond.is_true(again.status.conditions, ConditionType.SHARED_STATE_MISSING)
    assert [e[:2] for e in again.events if e[1] == Reason.PER_REPLICA_STATE] == [("Warning", "PerReplicaState")]


@pytest.mark.parametrize(
    "change", [{"replicas": "three"}, {"operations": ["no_such_operation"]}], ids=["invalid", "unknown operation"]
)
def test_a_spec_the_operator_cannot_act_on_leaves_the_warning_as_it_was(change: dict[str, Any]) -> None:
    first = reconcile(observe(served_with(replicas=3)), NOW, operator_namespace="ops")
    before = cond.get_condition(first.status.conditions, ConditionType.SHARED_STATE_MISSING)
    assert before is not None
    assert before.status == ConditionStatus.TRUE
    broken = served_with(first.status_body(), generation=2, **{"replicas": 1, **change})
    stalled = reconcile(observe(broken), LATER, operator_namespace="ops")
    assert stalled.status.phase == Phase.STALLED
    assert cond.get_condition(stalled.status.conditions, ConditionType.SHARED_STATE_MISSING) == before


def test_the_warning_survives_a_status_round_trip_through_yaml() -> None:
    """The condition is a plain metav1.Condition-shaped entry the CRD's status schema accepts."""
    result = reconcile(observe(served_with(replicas=3)), NOW, operator_namespace="ops")
    served_body = {**document(replicas=3), "status": yaml.safe_load(yaml.safe_dump(result.status_body()))}
    assert api_errors(served_body) == []


@pytest.mark.parametrize(
    ("egress", "message"),
    [
        ({"podSelector": {}}, "an empty selector admits every pod"),
        ({"namespaceSelector": {}}, "an empty selector admits every pod"),
        ({"cidrs": ["0.0.0.0/0"]}, "egress.cidrs: /0 admits every address"),
    ],
)
def test_an_egress_rule_open_to_everything_is_refused(egress: dict[str, Any], message: str) -> None:
    document = example_document("minimal")
    document["spec"]["state"] = {"postgres": {"secretRef": {"name": "db"}, "egress": egress}}
    with pytest.raises(ValueError, match=message):
        EnterpriseAgent.model_validate(document)
