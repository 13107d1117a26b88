"""Revisions: what names one (the user's input only) and where what it renders to is kept (its
ControllerRevision), so a newer renderer changes no running pod and a deleted child comes back as
it was. Pure: the reconcile core driven with the children its own plans wrote."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from agent_contract.config import RuntimeConfig
from agent_operator import rollout
from agent_operator.reconcile import ChildKey, Memo, Plan, child_key, kept_revisions, reconcile
from agent_operator.render import KeyVersions, RevisionRecord, compute_revision, first_render
from agent_operator.render.common import ANNOTATION_SPEC, LABEL_REVISION, Manifest, encode_spec
from agent_operator.render.history import (
    REVISION_HISTORY_LIMIT,
    build_controller_revision,
    read_controller_revision,
)
from agent_operator.render.runtime_config import build_runtime_config
from agent_operator.render.workload import build_pod_template
from agent_operator.spec import Color, EnterpriseAgent, EnterpriseAgentStatus, RolloutStatus, Step
from tests.helpers import observe, rolled_out, served

NOW = datetime.fromisoformat("2026-01-01T00:00:00+00:00")
V1, V2 = "registry.example/agent:1.0.0", "registry.example/agent:2.0.0"
Children = dict[ChildKey, dict[str, Any]]


def body_with(image: str, generation: int = 1, status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body = served("minimal", status, generation=generation)
    body["spec"] = {**body["spec"], "image": image, **spec}
    return body


def settle(body: dict[str, Any], children: Children, memo: Memo | None = None) -> tuple[Plan, dict[str, Any], Children]:
    """Reconciles until nothing more is written, with every Deployment rolled out as it is written
    (no pod is ever in a Service's endpoints, so a rollout waits in its Preview step)."""
    memo = memo if memo is not None else Memo()
    for _ in range(10):
        plan = reconcile(observe(body, children), NOW, operator_namespace="ops", memo=memo)
        if not plan.apply and not plan.delete and plan.status_body() == body["status"]:
            return plan, body, children
        children = {key: child for key, child in children.items() if key not in plan.delete}
        children = rolled_out({**children, **{child_key(c): c for c in plan.apply}})
        body = {**body, "status": plan.status_body()}
    raise AssertionError("the reconcile never settled")


def mid_rollout() -> tuple[dict[str, Any], Children]:
    """v1 served by blue; v2 in preview on green, blue still serving v1."""
    plan, body, children = settle(body_with(V1), {})
    assert (plan.status.phase, plan.status.active_color) == ("Ready", Color.BLUE)
    plan, body, children = settle(body_with(V2, generation=2, status=body["status"]), children)
    assert plan.status.rollout is not None
    assert plan.status.rollout.step == Step.PREVIEW
    assert plan.status.preview_revision == plan.revision != plan.status.active_revision
    return body, children


def deployment(children: Children, color: Color) -> dict[str, Any]:
    return children[("apps/v1", "Deployment", f"hello-agent-{color.value}")]


def image_of(manifest: Manifest) -> str:
    return str(manifest["spec"]["template"]["spec"]["containers"][0]["image"])


def upgrade_the_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A newer operator: every pod template gets a label and an env var, every runtime config a
    new data directory. Patched wherever the operator's modules refer to the renderers."""
    original_template, original_config = build_pod_template, build_runtime_config

    def template(agent: EnterpriseAgent, revision: str, color: Color | None) -> Manifest:
        rendered = original_template(agent, revision, color)
        rendered["metadata"]["labels"]["example.com/rendered-by"] = "v2"
        rendered["spec"]["containers"][0]["env"].append({"name": "NEW_FEATURE", "value": "on"})
        return rendered

    def config(agent: EnterpriseAgent) -> RuntimeConfig:
        return original_config(agent).model_copy(update={"data_dir": "/var/lib/agent/v2"})

    replacements: dict[Callable[..., Any], Callable[..., Any]] = {original_template: template, original_config: config}
    for name, module in list(sys.modules.items()):
        if name.startswith("agent_operator"):
            for attribute, value in list(vars(module).items()):
                if callable(value) and value in replacements:
                    monkeypatch.setattr(module, attribute, replacements[value])
    fresh = first_render(EnterpriseAgent.model_validate(body_with(V1)), "x")
    assert fresh.pod_template(Color.BLUE)["metadata"]["labels"]["example.com/rendered-by"] == "v2"  # it took


def test_an_operator_upgrade_changes_no_revision_and_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """After an upgrade whose renderer emits something new, an agent whose spec did not change
    keeps its revisions: no rollout starts, and the stable colour (and the preview) are re-applied
    from their ControllerRevisions, so neither Deployment nor any immutable ConfigMap changes."""
    body, children = mid_rollout()
    before = observe(body, children).status
    upgrade_the_renderer(monkeypatch)
    plan = reconcile(observe(body, children), NOW, operator_namespace="ops", memo=Memo())  # a new process
    assert (plan.status.active_revision, plan.status.preview_revision) == (
        before.active_revision,
        before.preview_revision,
    )
    assert plan.revision == before.preview_revision
    assert plan.status.rollout is not None
    assert plan.status.rollout.started_at == (before.rollout or RolloutStatus()).started_at  # not restarted
    assert [child_key(c) for c in plan.apply] == []
    assert plan.delete == []


def test_an_operator_upgrade_leaves_a_steady_agent_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    plan, body, children = settle(body_with(V1), {})
    upgrade_the_renderer(monkeypatch)
    again = reconcile(observe(body, children), NOW, operator_namespace="ops", memo=Memo())
    assert again.revision == plan.revision
    assert (again.apply, again.delete, again.status) == ([], [], plan.status)
    # A new spec is rendered by the new renderer; the colour that keeps serving is not.
    rollout, _, after = settle(body_with(V2, generation=2, status=body["status"]), children)
    assert "NEW_FEATURE" in str(deployment(after, Color.GREEN)["spec"]["template"])
    assert deployment(after, Color.BLUE)["spec"]["template"] == deployment(children, Color.BLUE)["spec"]["template"]
    assert rollout.status.rollout is not None


def test_a_deleted_stable_deployment_and_config_map_come_back_from_the_record() -> None:
    """The stable colour's Deployment and ConfigMap deleted during a rollout: made again as they
    were (v1), not from the spec under rollout (v2); the rollout carries on where it was."""
    body, children = mid_rollout()
    stable = deployment(children, Color.BLUE)
    revision = stable["metadata"]["labels"][LABEL_REVISION]
    config_key = ("v1", "ConfigMap", f"hello-agent-config-{revision}")
    config_map = children[config_key]
    gone = {key: child for key, child in children.items() if key not in {child_key(stable), config_key}}
    plan = reconcile(observe(body, gone), NOW, operator_namespace="ops")
    applied = {child_key(c): c for c in plan.apply}
    assert image_of(applied[child_key(stable)]) == V1
    assert applied[child_key(stable)]["spec"]["template"] == stable["spec"]["template"]
    assert applied[child_key(stable)]["spec"]["replicas"] == 1
    assert applied[config_key]["data"] == config_map["data"]
    status = observe(body, children).status
    assert (plan.status.active_color, plan.status.active_revision) == (Color.BLUE, status.active_revision)
    assert plan.status.rollout is not None
    assert plan.status.rollout.step == Step.PREVIEW
    assert plan.status.image == V1


def test_a_deleted_controller_revision_is_written_again_unchanged() -> None:
    _, body, children = settle(body_with(V1), {})
    (key,) = [key for key in children if key[1] == "ControllerRevision"]
    plan = reconcile(observe(body, {k: c for k, c in children.items() if k != key}), NOW, operator_namespace="ops")
    assert [child_key(c) for c in plan.apply] == [key]
    assert plan.apply[0]["data"] == children[key]["data"]


def test_the_controller_revision_keeps_what_the_revision_renders_to() -> None:
    _, body, children = settle(body_with(V1, env=[{"name": "LOG_LEVEL", "value": "debug"}]), {})
    (record_manifest,) = [c for k, c in children.items() if k[1] == "ControllerRevision"]
    record = read_controller_revision(record_manifest)
    assert record is not None
    blue = deployment(children, Color.BLUE)
    revision = blue["metadata"]["labels"][LABEL_REVISION]
    assert record_manifest["metadata"]["name"] == f"hello-agent-{revision}"
    assert record_manifest["metadata"]["labels"]["app.kubernetes.io/instance"] == "hello-agent"
    assert record_manifest["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "enterprise-agent-operator"
    assert record_manifest["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert record_manifest["revision"] == 1
    assert record.spec == body["spec"]
    assert record.pod_template(Color.BLUE) == blue["spec"]["template"]
    assert (
        record.runtime_config == children[("v1", "ConfigMap", f"hello-agent-config-{revision}")]["data"]["config.yaml"]
    )
    assert build_controller_revision(EnterpriseAgent.model_validate(body), record)["data"] == record_manifest["data"]


def test_a_spec_put_back_reuses_its_revision_and_numbers_it_latest() -> None:
    body, children = mid_rollout()
    first = observe(body, children).status.active_revision
    plan, body, children = settle(body_with(V1, generation=3, status=body["status"]), children)
    assert plan.revision == first
    numbers = {
        c["metadata"]["labels"][LABEL_REVISION]: c["revision"]
        for k, c in children.items()
        if k[1] == "ControllerRevision"
    }
    assert numbers[first] == max(numbers.values()) == 3


def test_a_revision_is_the_users_input_not_the_defaults() -> None:
    """A default written out counts as one left out, and nothing about the rendering counts."""
    plain = EnterpriseAgent.model_validate(body_with(V1))
    explicit = EnterpriseAgent.model_validate(
        body_with(V1, imagePullPolicy="IfNotPresent", security={"tokenTTLSeconds": 900}, env=[])
    )
    assert compute_revision(plain, KeyVersions()) == compute_revision(explicit, KeyVersions())
    assert compute_revision(plain, KeyVersions()) != compute_revision(
        EnterpriseAgent.model_validate(body_with(V1, security={"tokenTTLSeconds": 600})), KeyVersions()
    )


def _record(revision: str, number: int) -> RevisionRecord:
    return RevisionRecord(revision, revision, {}, {"blue": {}, "green": {}}, "", number)


def test_old_revisions_are_pruned_keeping_those_in_use_and_a_short_history() -> None:
    records = {f"r{n}": _record(f"r{n}", n) for n in range(1, 10)}
    status = EnterpriseAgentStatus(
        active_color=Color.GREEN,
        active_revision="r8",
        rollout=RolloutStatus(step=Step.COMPLETED, previous_revision="r2"),
    )
    colours = {Color.GREEN: rollout.Colour(revision="r8"), Color.BLUE: rollout.Colour(revision="r3")}
    kept = kept_revisions(status, records, records["r9"], colours)
    history = [f"r{n}" for n in range(7, 4, -1)][:REVISION_HISTORY_LIMIT]  # the latest not in use
    assert {r.revision for r in kept} == {"r9", "r8", "r3", "r2", *history}
    assert [r.number for r in kept] == sorted(r.number for r in kept)


def test_a_new_revision_is_numbered_above_every_kept_one() -> None:
    records = {"a": _record("a", 4), "b": _record("b", 7)}
    kept = kept_revisions(EnterpriseAgentStatus(), records, _record("c", 0), {})
    assert [(r.revision, r.number) for r in kept] == [("a", 4), ("b", 7), ("c", 8)]
    put_back = kept_revisions(EnterpriseAgentStatus(), records, records["a"], {})
    assert [(r.revision, r.number) for r in put_back] == [("b", 7), ("a", 8)]


def test_an_agent_from_an_operator_before_controller_revisions_keeps_its_revision_and_pods() -> None:
    """Children an older operator made (its own revision hash, the spec only in the Deployment's
    annotation): the running revision is adopted as it runs, recorded, and nothing else is written."""
    _, body, children = settle(body_with(V1), {})
    revision = deployment(children, Color.BLUE)["metadata"]["labels"][LABEL_REVISION]
    old = "0123456789"
    legacy: Children = {}
    for key, child in children.items():
        if key[1] == "ControllerRevision":
            continue
        # The older operator's hash wherever the revision appears.
        legacy[(key[0], key[1], key[2].replace(revision, old))] = json.loads(json.dumps(child).replace(revision, old))
    blue = deployment(legacy, Color.BLUE)
    blue["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"  # what the API server adds
    blue["metadata"]["annotations"][ANNOTATION_SPEC] = encode_spec(body["spec"])
    status = {**body["status"], "activeRevision": old}
    plan = reconcile(observe({**body, "status": status}, legacy), NOW, operator_namespace="ops")
    assert plan.revision == old
    assert plan.status.active_revision == old
    assert plan.status.rollout is None
    assert [child_key(c) for c in plan.apply] == [("apps/v1", "ControllerRevision", f"hello-agent-{old}")]
    adopted = read_controller_revision(plan.apply[0])
    assert adopted is not None
    assert adopted.pod_template(Color.BLUE) == blue["spec"]["template"]
    assert plan.delete == []
