"""The pure reconcile core: comparisons, conditions, events and plans, without a server."""

from __future__ import annotations

import asyncio
import copy
from datetime import datetime
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY

from agent_operator import conditions as cond
from agent_operator.controller import Controller, ControllerSettings, WorkQueue
from agent_operator.kube import Kube
from agent_operator.manifest import FieldError
from agent_operator.reconcile import Memo, Plan, child_key, is_subset, reconcile, stalled_plan, waiting_plan
from agent_operator.render.common import LABEL_INSTANCE, LABEL_REVISION
from agent_operator.spec import ConditionType, Phase
from tests.helpers import observe, rolled_out, served

NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
NOW_TIME, LATER_TIME = (datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (NOW, LATER))


def test_is_subset_ignores_server_added_fields_and_fields_we_set_to_null() -> None:
    desired = {"spec": {"replicas": 1, "paused": None, "template": {"containers": [{"name": "a"}]}}}
    actual = {
        "spec": {"replicas": 1, "template": {"containers": [{"name": "a", "terminationMessagePath": "/dev/x"}]}},
        "status": {},
    }
    assert is_subset(desired, actual)


@pytest.mark.parametrize("zero", [False, 0, "", {}, []], ids=repr)
def test_is_subset_sees_a_zero_value_removed_by_hand(zero: Any) -> None:
    """A field we set must be there with our value, a zero one too: absent is not "false"
    (automountServiceAccountToken and allowPrivilegeEscalation default to the weaker setting)."""
    desired = {"spec": {"replicas": 1, "field": zero}}
    assert is_subset(desired, {"spec": {"replicas": 1, "field": zero, "added": "by the server"}})
    assert not is_subset(desired, {"spec": {"replicas": 1}})


def test_is_subset_sees_drift() -> None:
    assert not is_subset({"spec": {"replicas": 1}}, {"spec": {"replicas": 4}})
    assert not is_subset({"spec": {"selector": {"color": "blue"}}}, {"spec": {"selector": {"color": "green"}}})
    assert not is_subset({"spec": {"ports": [1, 2]}}, {"spec": {"ports": [1]}})
    assert not is_subset({"metadata": {"name": "x"}}, None)


def test_is_subset_compares_quantities_by_value() -> None:
    assert is_subset({"cpu": "0.5", "memory": 1073741824}, {"cpu": "500m", "memory": "1Gi"})
    assert not is_subset({"cpu": "0.5"}, {"cpu": "600m"})


def test_set_condition_keeps_transition_time_unless_status_flips() -> None:
    conditions = cond.set_condition([], ConditionType.READY, False, "RollingOut", "0/1", 1, NOW)
    same = cond.set_condition(conditions, ConditionType.READY, False, "RollingOut", "still 0/1", 2, LATER)
    assert same[0].last_transition_time == NOW
    assert same[0].message == "still 0/1"
    assert same[0].observed_generation == 2
    flipped = cond.set_condition(same, ConditionType.READY, True, "Available", "1/1", 2, LATER)
    assert flipped[0].last_transition_time == LATER
    assert flipped[0].status == "True"


def plan(status: dict[str, Any] | None = None, children: dict[Any, Any] | None = None, now: datetime = NOW_TIME,
         memo: Memo | None = None) -> Plan:  # fmt: skip
    """The production entry point on the minimal example."""
    return reconcile(observe(served("minimal", status), children), now, operator_namespace="ops", memo=memo)


def _deployment(revision: str, available: int, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "hello-agent-blue", "generation": 1, "labels": {LABEL_REVISION: revision}},
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "availableReplicas": available,
            "readyReplicas": available,
        },
    }


def test_plan_for_a_new_agent_applies_every_child_and_is_progressing() -> None:
    result = plan()
    assert {c["kind"] for c in result.apply} >= {"Deployment", "Service", "ConfigMap", "Secret", "NetworkPolicy"}
    assert all(c["metadata"]["ownerReferences"][0]["uid"] == "u1" for c in result.apply)
    assert result.status.phase == Phase.PENDING
    assert result.status.observed_generation == 1
    assert cond.is_true(result.status.conditions, ConditionType.RECONCILING)
    assert result.events == []  # rolling out at creation is no news (one write per agent fewer)


def _as_the_api_server_returns(obj: Any) -> Any:
    """Go's JSON writes a whole float64 without a fraction: 5.0 comes back as 5."""
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    if isinstance(obj, dict):
        return {key: _as_the_api_server_returns(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_as_the_api_server_returns(value) for value in obj]
    return obj


def test_children_read_back_from_the_api_server_are_not_written_again() -> None:
    """A new agent's children, as the server stores them, plan no second write: whole floats of
    the spec (maxP95LatencySeconds: 5.0) come back as integers, in the ControllerRevision too,
    and the Deployment's spec annotation made from either must be the same (it was not: every new
    agent's Deployment was written twice, seen in the 1,000-agent bench's write count)."""
    body = served("minimal")
    body["spec"]["rollout"] = {"analysis": {"maxP95LatencySeconds": 5}}  # the CRD's default, as served
    first = reconcile(observe(body), NOW_TIME, operator_namespace="ops")
    children = {child_key(c): _as_the_api_server_returns(c) for c in first.apply}
    second = reconcile(observe({**body, "status": first.status_body()}, children), NOW_TIME, operator_namespace="ops")
    assert [child_key(c) for c in second.apply] == []


def test_an_agent_that_served_before_gets_events_when_it_loses_and_regains_its_pods() -> None:
    memo = Memo()
    first = plan(memo=memo)
    children = {child_key(c): c for c in first.apply}
    deployment_key = ("apps/v1", "Deployment", "hello-agent-blue")
    served_by = {**children[deployment_key], "status": _deployment(first.revision or "", 1)["status"]}
    ready = plan(first.status_body(), {**children, deployment_key: served_by}, memo=memo)
    assert ready.events == []  # first available: said by the status alone
    gone = {**children[deployment_key], "status": _deployment(first.revision or "", 0)["status"]}
    lost = plan(ready.status_body(), {**children, deployment_key: gone}, LATER_TIME, memo)
    assert lost.status.phase != Phase.READY
    assert "Warning" in [kind for kind, _, _ in lost.events]
    back = plan(lost.status_body(), {**children, deployment_key: served_by}, LATER_TIME, memo)
    assert [(kind, reason) for kind, reason, _ in back.events] == [("Normal", "Available")]


def test_plan_with_nothing_changed_writes_nothing_and_posts_nothing() -> None:
    memo = Memo()
    first = plan(memo=memo)
    children = {child_key(c): c for c in first.apply}
    deployment_key = ("apps/v1", "Deployment", "hello-agent-blue")
    children[deployment_key] = {**children[deployment_key], "status": _deployment(first.revision or "", 1)["status"]}
    ready = plan(children=children, memo=memo)
    assert ready.status.phase == Phase.READY
    assert ready.events == []  # a new agent's first Available is in its status: no Event (issue 19)
    again = plan(ready.status_body(), children, LATER_TIME, memo)
    assert again.apply == []
    assert again.delete == []
    assert again.events == []
    assert again.status == ready.status  # same timestamps: no status write either
    fresh = plan(ready.status_body(), children, LATER_TIME)  # the memo is a cache: same plan without it
    assert (fresh.apply, fresh.delete, fresh.events, fresh.status) == ([], [], [], ready.status)


def _without(manifest: dict[str, Any], *path: str) -> dict[str, Any]:
    """A deep copy of ``manifest`` with the field at ``path`` removed, as by a JSON patch remove.
    A number in ``path`` is a list index."""
    edited = copy.deepcopy(manifest)
    parent: Any = edited
    for part in path[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    del parent[path[-1]]
    return edited


HARDENING_REMOVED_BY_HAND = [
    ("Deployment", "hello-agent-blue", ("spec", "template", "spec", "automountServiceAccountToken")),
    ("Deployment", "hello-agent-blue", ("spec", "template", "spec", "enableServiceLinks")),
    (
        "Deployment",
        "hello-agent-blue",
        ("spec", "template", "spec", "containers", "0", "securityContext", "allowPrivilegeEscalation"),
    ),
    ("Deployment", "hello-agent-blue", ("spec", "strategy", "rollingUpdate", "maxUnavailable")),
    ("ServiceAccount", "hello-agent", ("automountServiceAccountToken",)),
]


@pytest.mark.parametrize(
    ("kind", "name", "path"), HARDENING_REMOVED_BY_HAND, ids=lambda v: v[-1] if isinstance(v, tuple) else v
)
def test_a_zero_valued_field_removed_by_hand_is_reapplied(kind: str, name: str, path: tuple[str, ...]) -> None:
    """`kubectl patch --type=json -p '[{"op":"remove","path":...}]'` on a field we render as false
    or 0: the next reconcile applies that child again, with the field at our value."""
    memo = Memo()
    children = rolled_out({child_key(c): c for c in plan(memo=memo).apply})
    ready = plan(children=children, memo=memo)
    assert plan(ready.status_body(), children, LATER_TIME, memo).apply == []
    key = next(k for k in children if k[1:] == (kind, name))
    rendered = children[key]
    parent: Any = rendered
    for part in path[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    assert parent[path[-1]] in (False, 0)  # the premise: a zero value we set
    edited = {**children, key: _without(rendered, *path)}

    repaired = plan(ready.status_body(), edited, LATER_TIME, memo)

    assert [child_key(c) for c in repaired.apply] == [key]
    (applied,) = repaired.apply
    value: Any = applied
    for part in path:
        value = value[int(part)] if isinstance(value, list) else value[part]
    assert value is parent[path[-1]]


def test_plan_deletes_children_the_spec_no_longer_wants() -> None:
    stale = {
        ("v1", "ConfigMap", "hello-agent-config-0000000000"): {"metadata": {"name": "hello-agent-config-0000000000"}}
    }
    result = plan(children=stale)
    assert result.delete == [("v1", "ConfigMap", "hello-agent-config-0000000000")]


def test_stalled_plan_touches_no_child_and_warns_once() -> None:
    errors = [FieldError("spec.operations[0]", "unknown operation 'x'")]
    first = stalled_plan(observe(served("minimal", generation=3)), errors, cond.Reason.UNKNOWN_OPERATION, NOW_TIME)
    assert first.apply == []
    assert first.status.phase == Phase.STALLED
    assert ("Warning", "UnknownOperation", "spec.operations[0]: unknown operation 'x'") in first.events
    again = stalled_plan(
        observe(served("minimal", first.status_body(), generation=3)), errors, cond.Reason.UNKNOWN_OPERATION, LATER_TIME
    )
    assert again.events == []
    assert again.status == first.status


def test_waiting_on_the_api_server_says_creating_on_a_new_agent_and_keeps_any_status_it_has() -> None:
    message = "waiting for the API server to recognise kind EnterpriseAgent"
    new = waiting_plan(observe(served("minimal", generation=1)), message, NOW_TIME)
    assert (new.apply, new.delete, new.stalled) == ([], [], False)
    assert new.status.phase == Phase.PENDING
    assert new.status.message == message
    conditions = {c.type: (c.status.value, c.reason) for c in new.status.conditions}
    assert conditions[ConditionType.STALLED.value] == ("False", cond.Reason.AS_EXPECTED)
    assert conditions[ConditionType.READY.value] == ("False", cond.Reason.CREATING)
    started = reconcile(observe(served("minimal")), NOW_TIME, operator_namespace="ops")
    assert started.status.conditions
    assert started.status.message != message
    kept = waiting_plan(observe(served("minimal", started.status_body())), message, LATER_TIME)
    assert kept.status == started.status  # an agent with a status (Ready, rolling out) keeps it
    assert (kept.apply, kept.events) == ([], [])


def test_an_unknown_operation_stalls_through_the_entry_point_and_names_the_field() -> None:
    body = served("minimal")
    body["spec"] = {**body["spec"], "operations": ["ping", "no_such_thing"]}
    result = reconcile(observe(body), NOW_TIME, operator_namespace="ops")
    assert (result.apply, result.delete) == ([], [])
    assert result.status.phase == Phase.STALLED
    assert "spec.operations[1]" in (result.status.message or "")


def test_a_status_message_longer_than_the_crd_allows_is_cut() -> None:
    errors = [FieldError(f"spec.operations[{i}]", "x" * 60) for i in range(100)]
    result = stalled_plan(observe(served("minimal")), errors, cond.Reason.UNKNOWN_OPERATION, NOW_TIME)
    assert result.status.message is not None
    assert len(result.status.message) == 4096
    assert all(len(c.message) <= 4096 for c in result.status.conditions)


def test_work_queue_coalesces_and_never_hands_one_key_to_two_workers() -> None:
    async def scenario() -> list[str]:
        queue = WorkQueue()
        queue.add("a")
        queue.add("a")
        queue.add("b")
        assert len(queue) == 2
        first = await queue.get()
        queue.add(first)  # changed while being processed: queued again only after done()
        second = await queue.get()
        assert second != first
        queue.done(first)
        third = await queue.get()
        return [str(first), str(second), str(third)]

    assert asyncio.run(scenario()) == ["a", "b", "a"]


def test_work_queue_reports_how_long_a_key_waited() -> None:
    """agent_operator_workqueue_wait_seconds: one observation per hand-out, of the time since the
    key was queued (a key queued twice before it is taken counts from the first time)."""

    def observed() -> tuple[float, float]:
        count = REGISTRY.get_sample_value("agent_operator_workqueue_wait_seconds_count") or 0.0
        return count, REGISTRY.get_sample_value("agent_operator_workqueue_wait_seconds_sum") or 0.0

    async def scenario() -> None:
        queue = WorkQueue()
        queue.add("a")
        await asyncio.sleep(0.05)
        queue.add("a")
        await queue.get()

    count, total = observed()
    asyncio.run(scenario())
    after_count, after_total = observed()
    assert after_count == count + 1
    assert after_total - total >= 0.05


def test_another_controllers_condition_is_carried_along() -> None:
    foreign = {"type": "Synced", "status": "True", "reason": "Synced", "lastTransitionTime": NOW}
    result = plan({"conditions": [foreign]})
    assert result.status.phase == Phase.PENDING
    assert [c.type for c in result.status.conditions if c.type == "Synced"] == ["Synced"]
    assert all(event[1] != "Synced" for event in result.events)


def test_a_status_field_this_version_cannot_read_loses_nothing_else() -> None:
    """A newer operator's step (or a hand edit) must not cost the serving colour: green stays active."""
    status = {
        "activeColor": "green",
        "activeRevision": "aaaaaaaaaa",
        "someNewField": {"x": 1},
        "rollout": {"step": "SomethingNew", "previewColor": "blue"},
    }
    green = _deployment("aaaaaaaaaa", 1)
    green["metadata"]["name"] = "hello-agent-green"
    result = plan(status, {("apps/v1", "Deployment", "hello-agent-green"): green})
    assert result.status.active_color == "green"
    scaled = {c["metadata"]["name"]: c["spec"]["replicas"] for c in result.apply if c["kind"] == "Deployment"}
    assert scaled.get("hello-agent-green", 1) >= 1, scaled


def test_children_of_a_deleted_agent_leave_no_record_behind() -> None:
    controller = Controller(cast(Kube, None), ControllerSettings())
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "gone-config", "namespace": "default", "labels": {LABEL_INSTANCE: "gone"}},
    }
    controller.observe_child("DELETED", child)
    assert controller.records == {}
    controller.observe_child("ADDED", child)  # seen before its agent: kept until it goes
    controller.observe_child("DELETED", child)
    assert controller.records == {}
