"""Referenced Secrets and ConfigMaps, the pure side: which fields name them, what a missing one (or
key) stalls with, and how their content becomes part of the revision, so rotating the model key
rolls out a new colour while an edit to a key nobody reads changes nothing. The reconcile core is
driven with the objects as the controller would have read them."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from agent_operator import conditions as cond
from agent_operator import reconcile as core
from agent_operator.conditions import Reason
from agent_operator.reconcile import ChildKey, Memo, Plan, child_key, missing_references, reconcile
from agent_operator.render import KeyVersions, compute_revision
from agent_operator.render.history import ANNOTATION_SPEC_HASH
from agent_operator.render.references import content_digest, referenced_objects
from agent_operator.spec import ConditionType, EnterpriseAgent, Phase, Step
from tests.helpers import observe, rolled_out, served

NOW = datetime(2026, 1, 1, tzinfo=UTC)
Children = dict[ChildKey, dict[str, Any]]
KEY_SECRET = {
    "metadata": {"name": "hello-agent-keys", "resourceVersion": "1"},
    "data": {"jwt-a": base64.b64encode(b"signing key a").decode(), "dek-a": base64.b64encode(b"dek a").decode()},
}
MODEL = {
    "baseUrl": "https://llm.example/v1",
    "model": "m",
    "apiKeySecretRef": {"name": "model-credentials", "key": "api-key"},
}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(name: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {k: b64(v) for k, v in data.items()},
    }


def config_map(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def body_with(status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> dict[str, Any]:
    body = served("minimal", status, generation)
    body["spec"] = {**body["spec"], **spec}
    return body


def agent_with(**spec: Any) -> EnterpriseAgent:
    return EnterpriseAgent.model_validate(body_with(**spec))


def found(*objects: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any] | None]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def revision(agent: EnterpriseAgent, *objects: dict[str, Any], key_data: dict[str, str] = KEY_SECRET["data"]) -> str:
    keys = KeyVersions.from_secret_data(key_data)
    return compute_revision(agent, keys, content_digest(agent, found(*objects), key_data))


# --- which fields name what -----------------------------------------------------------------------


def test_every_field_that_names_a_secret_or_config_map_is_a_reference() -> None:
    agent = agent_with(
        imagePullSecrets=[{"name": "registry"}],
        env=[
            {"name": "PLAIN", "value": "x"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tools", "key": "token", "optional": True}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        ],
        envFrom=[{"secretRef": {"name": "bulk"}}, {"configMapRef": {"name": "flags"}}],
        security={"usersSecretRef": {"name": "users"}},
        state={"postgres": {"secretRef": {"name": "db-app"}}},
        model={**MODEL, "caBundle": {"configMapRef": {"name": "corp-ca"}}},
    )
    shown = [(r.kind, r.name, r.name_field, r.key, r.optional, r.in_revision) for r in referenced_objects(agent)]
    assert shown == [
        ("Secret", "registry", "spec.imagePullSecrets[0].name", None, False, False),
        ("Secret", "tools", "spec.env[1].valueFrom.secretKeyRef.name", "token", True, True),
        ("ConfigMap", "settings", "spec.env[2].valueFrom.configMapKeyRef.name", "mode", False, True),
        ("Secret", "bulk", "spec.envFrom[0].secretRef.name", None, False, True),
        ("ConfigMap", "flags", "spec.envFrom[1].configMapRef.name", None, False, True),
        # The runtime reads the users file again when it changes: checked, not part of the revision.
        ("Secret", "users", "spec.security.usersSecretRef.name", "users", False, False),
        ("Secret", "db-app", "spec.state.postgres.secretRef.name", "uri", False, True),
        ("Secret", "model-credentials", "spec.model.apiKeySecretRef.name", "api-key", False, True),
        ("ConfigMap", "corp-ca", "spec.model.caBundle.configMapRef.name", "ca.crt", False, True),
    ]


# --- what stalls, naming the field ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "objects", "message"),
    [
        (
            {"model": MODEL},
            [],
            "spec.model.apiKeySecretRef.name: Secret 'model-credentials' not found in namespace 'default'",
        ),
        (
            {"model": MODEL},
            [secret("model-credentials", other="x")],
            "spec.model.apiKeySecretRef.key: Secret 'model-credentials' has no (or an empty) key 'api-key'",
        ),
        (
            {"model": MODEL},
            [secret("model-credentials", **{"api-key": ""})],
            "spec.model.apiKeySecretRef.key: Secret 'model-credentials' has no (or an empty) key 'api-key'",
        ),
        (
            {"model": {**MODEL, "apiKeySecretRef": None, "caBundle": {"configMapRef": {"name": "ca"}, "key": "b.pem"}}},
            [config_map("ca", **{"a.pem": "x"})],
            "spec.model.caBundle.key: ConfigMap 'ca' has no (or an empty) key 'b.pem'",
        ),
        (
            {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "tools", "key": "token"}}}]},
            [secret("tools", other="x")],
            "spec.env[0].valueFrom.secretKeyRef.key: Secret 'tools' has no key 'token'",
        ),
        (
            {"env": [{"name": "M", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}}]},
            [],
            "spec.env[0].valueFrom.configMapKeyRef.name: ConfigMap 'settings' not found in namespace 'default'",
        ),
        (
            {"envFrom": [{"configMapRef": {"name": "flags"}}, {"secretRef": {"name": "bulk"}}]},
            [config_map("flags")],
            "spec.envFrom[1].secretRef.name: Secret 'bulk' not found in namespace 'default'",
        ),
        (
            {"security": {"usersSecretRef": {"name": "people"}}},
            [secret("people", other="x")],
            "spec.security.usersSecretRef.name: Secret 'people' has no key 'users'",
        ),
        (
            {"imagePullSecrets": [{"name": "registry"}]},
            [],
            "spec.imagePullSecrets[0].name: Secret 'registry' not found in namespace 'default'",
        ),
    ],
)
def test_a_missing_object_or_key_stalls_naming_the_field(
    spec: dict[str, Any], objects: list[dict[str, Any]], message: str
) -> None:
    agent = agent_with(**spec)
    missing = missing_references(agent, found(*objects))
    assert [str(error) for error in missing] == [message]
    plan = reconcile(observe(body_with(**spec), missing=missing), NOW, operator_namespace="ops")
    assert (plan.apply, plan.delete, plan.status.phase) == ([], [], Phase.STALLED)
    stalled = cond.get_condition(plan.status.conditions, ConditionType.STALLED)
    assert stalled is not None
    assert (stalled.reason, stalled.message) == (Reason.MISSING_REFERENCE, message)


def test_an_optional_reference_may_be_missing_and_an_empty_value_may_be_empty() -> None:
    optional = {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k", "optional": True}}}]}
    assert missing_references(agent_with(**optional), {}) == []
    assert missing_references(agent_with(**optional), found(secret("t", other="x"))) == []
    plain = {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k"}}}]}
    assert missing_references(agent_with(**plain), found(secret("t", k=""))) == []  # as Kubernetes allows
    users = {"security": {"usersSecretRef": {"name": "people"}}}
    assert missing_references(agent_with(**users), found(secret("people", users=""))) == []  # no users yet


def test_a_secret_and_a_config_map_of_the_same_name_are_told_apart() -> None:
    spec = {
        "env": [
            {"name": "A", "valueFrom": {"secretKeyRef": {"name": "same", "key": "a"}}},
            {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "same", "key": "b"}}},
        ]
    }
    assert missing_references(agent_with(**spec), found(secret("same", a="1"), config_map("same", b="2"))) == []
    (only,) = missing_references(agent_with(**spec), found(config_map("same", a="1", b="2")))
    assert str(only) == "spec.env[0].valueFrom.secretKeyRef.name: Secret 'same' not found in namespace 'default'"


# --- what the revision hashes ---------------------------------------------------------------------


def test_the_revision_changes_with_a_referenced_key_and_not_with_another_key_of_the_same_secret() -> None:
    agent = agent_with(model=MODEL)
    first = revision(agent, secret("model-credentials", **{"api-key": "sk-one", "note": "a"}))
    assert revision(agent, secret("model-credentials", **{"api-key": "sk-one", "note": "b"})) == first
    assert revision(agent, secret("model-credentials", **{"api-key": "sk-two", "note": "a"})) != first


def test_every_key_of_an_imported_object_counts_and_so_do_config_maps() -> None:
    agent = agent_with(envFrom=[{"configMapRef": {"name": "flags"}}])
    first = revision(agent, config_map("flags", a="1"))
    assert revision(agent, config_map("flags", a="1", b="2")) != first
    assert revision(agent, config_map("flags", a="2")) != first
    assert revision(agent, config_map("flags", a="1")) == first
    binary = {**config_map("flags", a="1"), "binaryData": {"blob": b64("x")}}
    assert revision(agent, binary) != first


def test_an_optional_reference_hashes_as_absent_until_it_appears() -> None:
    spec = {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k", "optional": True}}}]}
    agent = agent_with(**spec)
    absent = revision(agent)
    assert revision(agent, secret("t", other="x")) == absent  # the key is what the pod reads
    assert revision(agent, secret("t", k="v")) != absent


def test_references_outside_the_revision_change_nothing() -> None:
    spec = {"imagePullSecrets": [{"name": "registry"}], "security": {"usersSecretRef": {"name": "people"}}}
    agent = agent_with(**spec)
    keys = KeyVersions.from_secret_data(KEY_SECRET["data"])
    assert revision(agent, secret("people", users="alice:...")) == revision(agent, secret("people", users=""))
    # Without content in the revision, it is exactly the spec-and-keys hash an earlier operator made.
    assert revision(agent, secret("people", users="x")) == compute_revision(agent, keys)


def test_the_revision_is_keyed_with_the_agents_own_keys() -> None:
    """Someone who can read the agent (and so its revision label) but not its Secrets cannot test
    guesses of a short referenced secret against the label: the digest is keyed with key material
    they do not have."""
    agent = agent_with(model=MODEL)
    pin = secret("model-credentials", **{"api-key": "1234"})
    other_keys = {**KEY_SECRET["data"], "jwt-a": b64("someone else's key")}
    assert revision(agent, pin) != revision(agent, pin, key_data=other_keys)


def test_no_value_or_per_secret_hash_lands_in_any_child_or_status() -> None:
    agent_spec: dict[str, Any] = {"model": MODEL, "replicas": 1}
    value = "sk-live-0123456789"
    body = body_with(**agent_spec)
    references = found(secret("model-credentials", **{"api-key": value}))
    plan = reconcile(
        observe(body, key_secret=KEY_SECRET, references=references), NOW, operator_namespace="ops", memo=Memo()
    )
    written = json.dumps([plan.apply, plan.status_body()])
    raw = value.encode()
    for leak in (
        value,
        b64(value),
        hashlib.sha256(raw).hexdigest()[:10],
        hashlib.sha256(b64(value).encode()).hexdigest()[:10],
    ):
        assert leak not in written
    digest = content_digest(agent_with(**agent_spec), references, KEY_SECRET["data"])
    assert digest is not None
    assert digest[:10] not in written
    assert plan.revision is not None
    assert plan.revision in written


# --- through the reconcile: a rotation rolls out --------------------------------------------------


def settle(
    body: dict[str, Any], children: Children, references: Any, memo: Memo
) -> tuple[Plan, dict[str, Any], Children]:
    """Reconciles until nothing more is written, every Deployment rolled out as it is written (no
    pod is in any Service's endpoints, so a rollout waits in its Preview step)."""
    for _ in range(10):
        observed = observe(body, children, key_secret=KEY_SECRET, references=references)
        plan = reconcile(observed, NOW, operator_namespace="ops", memo=memo)
        if not plan.apply and not plan.delete and plan.status_body() == body["status"]:
            return plan, body, children
        children = {key: child for key, child in children.items() if key not in plan.delete}
        children = rolled_out({**children, **{child_key(c): c for c in plan.apply}})
        body = {**body, "status": plan.status_body()}
    raise AssertionError("the reconcile never settled")


def test_rotating_the_model_key_starts_a_rollout_without_an_edit_to_the_agent() -> None:
    body, memo = body_with(model=MODEL), Memo()
    old = found(secret("model-credentials", **{"api-key": "sk-old"}))
    ready, body, children = settle(body, {}, old, memo)
    assert (ready.status.phase, ready.status.rollout) == (Phase.READY, None)
    # Another key of the same Secret changes: nothing happens.
    noted = found(secret("model-credentials", **{"api-key": "sk-old", "comment": "rotated next week"}))
    same, _, _ = settle(body, children, noted, memo)
    assert same.revision == ready.revision
    # The key itself changes: a new revision in preview beside the running one, same generation.
    rotated = found(secret("model-credentials", **{"api-key": "sk-new"}))
    plan, body, children = settle(body, children, rotated, memo)
    assert plan.status.rollout is not None
    assert plan.status.rollout.step == Step.PREVIEW
    assert plan.status.active_revision == ready.revision != plan.status.preview_revision == plan.revision
    assert plan.status.observed_generation == 1
    green = children[("apps/v1", "Deployment", "hello-agent-green")]
    assert green["metadata"]["labels"]["agents.enterprise.io/revision"] == plan.revision
    # Its pods read the key from the Secret (a reference), never a value.
    env = {v["name"]: v for v in green["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MODEL_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "model-credentials", "key": "api-key"}}


def test_an_upgrade_to_an_operator_that_hashes_references_starts_no_rollout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents made by an operator that hashed only the spec and keys: their revision is taken over
    under the new hash (the ControllerRevision's annotation is rewritten), pods stay as they are;
    the next change of the content rolls out."""
    body = body_with(model=MODEL)
    old = found(secret("model-credentials", **{"api-key": "sk-old"}))
    with monkeypatch.context() as before:
        before.setattr(core, "content_digest", lambda *_: None)  # the earlier operator
        ready, body, children = settle(body, {}, old, Memo())
    assert ready.status.phase == Phase.READY
    upgraded = reconcile(
        observe(body, children, key_secret=KEY_SECRET, references=old), NOW, operator_namespace="ops", memo=Memo()
    )
    assert upgraded.revision == ready.revision
    assert upgraded.status.rollout is None
    assert upgraded.status.phase == Phase.READY
    assert [(c["kind"], c["metadata"]["name"]) for c in upgraded.apply] == [
        ("ControllerRevision", f"hello-agent-{ready.revision}")
    ]
    (record,) = upgraded.apply
    assert record["data"] == children[child_key(record)]["data"]  # only its annotation changes
    assert record["metadata"]["annotations"][ANNOTATION_SPEC_HASH] != ready.revision
    children = {**children, child_key(record): record}
    memo = Memo()
    steady, body, children = settle(body, children, old, memo)
    assert (steady.revision, steady.status.rollout) == (ready.revision, None)
    rotated = found(secret("model-credentials", **{"api-key": "sk-new"}))
    rolling, _, _ = settle(body, children, rotated, memo)
    assert rolling.status.rollout is not None
    assert rolling.status.preview_revision != ready.revision
