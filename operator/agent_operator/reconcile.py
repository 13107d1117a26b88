"""The pure core of a reconcile: observed state in, the writes to make and the status out.

No I/O here. The controller gathers what it observed (the agent, its children from the watch
cache, which referenced objects exist), calls :func:`plan`, then performs exactly the writes the
plan lists. Comparing desired with observed *before* writing is what makes a resync with no drift
cost zero write requests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent_operator import conditions as cond
from agent_operator.conditions import Reason
from agent_operator.manifest import FieldError
from agent_operator.render import ColorPlan, KeyVersions, RenderPlan, active_selector, build_children, compute_revision
from agent_operator.render.common import LABEL_REVISION, Manifest, deployment_name
from agent_operator.spec import API_VERSION, KIND, QUANTITY, Color, EnterpriseAgent, Phase, parse_quantity
from agent_runtime.config import BUILTIN_OPERATIONS

# (apiVersion, kind, name) identifies a child within the agent's namespace.
ChildKey = tuple[str, str, str]


def child_key(manifest: Mapping[str, Any]) -> ChildKey:
    return (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"])


@dataclass(frozen=True)
class Observed:
    """What the controller saw: the agent's current status and its children by key."""

    status: Mapping[str, Any]
    children: Mapping[ChildKey, Mapping[str, Any]]
    generation: int
    uid: str
    key_data: Mapping[str, str] | None = None
    key_rotated_for: str | None = None


@dataclass
class Plan:
    """The outcome of one reconcile."""

    apply: list[Manifest] = field(default_factory=list)
    delete: list[ChildKey] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    revision: str | None = None


# --- comparing desired with observed -------------------------------------------------------------


def _same_scalar(desired: Any, actual: Any) -> bool:
    if desired == actual:
        return True
    # The API server canonicalises quantities ("0.5" -> "500m", 1 -> "1"); compare their values.
    if isinstance(desired, int | str) and isinstance(actual, str) and not isinstance(desired, bool):
        text = str(desired)
        if re.fullmatch(QUANTITY, text) and re.fullmatch(QUANTITY, actual):
            return parse_quantity(text) == parse_quantity(actual)
    return False


def _is_zero(value: Any) -> bool:
    return value is not True and value in ({}, [], None, "", 0)


def is_subset(desired: Any, actual: Any) -> bool:
    """True when every field we set is present with the same value; fields the API server or
    other controllers added are ignored. Zero values (false, 0, "", empty maps and lists) match
    an absent field, since the server omits them."""
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            return not desired and actual is None
        return all(
            is_subset(value, actual[key]) if key in actual else _is_zero(value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        if not isinstance(actual, list):
            return not desired and actual is None
        return len(desired) == len(actual) and all(is_subset(d, a) for d, a in zip(desired, actual, strict=True))
    return _same_scalar(desired, actual)


def owned(manifest: Manifest, agent_name: str, uid: str) -> Manifest:
    """The manifest with the agent as its controlling owner, so deleting the agent deletes it."""
    metadata = dict(manifest["metadata"])
    metadata["ownerReferences"] = [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": agent_name,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    return {**manifest, "metadata": metadata}


# --- checks only the operator can make -----------------------------------------------------------


def unknown_operations(agent: EnterpriseAgent) -> list[FieldError]:
    return [
        FieldError(
            f"spec.operations[{index}]",
            f"unknown operation {name!r}; the runtime provides {', '.join(BUILTIN_OPERATIONS)}",
        )
        for index, name in enumerate(agent.spec.operations)
        if name not in BUILTIN_OPERATIONS
    ]


def referenced_secrets(agent: EnterpriseAgent) -> list[tuple[str, str]]:
    """(field path, Secret name) of every Secret the pods need that the operator does not own."""
    refs = [(f"spec.imagePullSecrets[{i}].name", ref.name) for i, ref in enumerate(agent.spec.image_pull_secrets)]
    if agent.spec.security.users_secret_ref is not None:
        refs.append(("spec.security.usersSecretRef.name", agent.spec.security.users_secret_ref.name))
    return refs


# --- status ---------------------------------------------------------------------------------------


def _deployment_progress(deployment: Mapping[str, Any] | None, revision: str, replicas: int) -> tuple[str, str, bool]:
    """(reason, message, ready) of the active Deployment towards ``revision`` at ``replicas``.
    The message changes only when the count of available pods does, so a rollout costs few
    status writes."""
    if deployment is None:
        return Reason.CREATING, "creating the Deployment", False
    status = deployment.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return Reason.DEADLINE_EXCEEDED, condition.get("message", "progress deadline exceeded"), False
    available = status.get("availableReplicas", 0)
    done = (
        deployment["metadata"].get("labels", {}).get(LABEL_REVISION) == revision
        and status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)
        and status.get("updatedReplicas", 0) == replicas
        and status.get("replicas", 0) == replicas
        and available >= replicas
    )
    if not done:
        return Reason.ROLLING_OUT, f"rolling out revision {revision}: {available}/{replicas} pods available", False
    return Reason.AVAILABLE, f"{available}/{replicas} pods available at revision {revision}", True


def _events_for(old: list[cond.Condition], new: list[cond.Condition]) -> list[tuple[str, str, str]]:
    """An Event for every condition that changed status or reason; nothing when all is as before."""
    events = []
    for condition in new:
        before = cond.get_condition(old, condition["type"])
        if before is not None and (before.get("status"), before.get("reason")) == (
            condition["status"],
            condition["reason"],
        ):
            continue
        if condition["status"] != "True" and condition["type"] != cond.READY:
            continue  # a condition clearing is reported by the one that takes over
        warning = condition["type"] in (cond.STALLED, cond.DEGRADED) or (
            condition["type"] == cond.READY and condition["status"] == "False" and before is not None
        )
        if condition["type"] == cond.READY and condition["status"] == "False" and before is None:
            continue  # not ready at creation is no news
        event = ("Warning" if warning else "Normal", condition["reason"], condition["message"])
        if event not in events:  # Reconciling and Progressing often move together: one Event
            events.append(event)
    return events


def _status(
    observed: Observed,
    now: str,
    *,
    ready: bool,
    reason: str,
    message: str,
    stalled: bool = False,
    degraded: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    generation = observed.generation
    old_conditions = list(observed.status.get("conditions") or [])
    progressing = not ready and not stalled and not degraded
    # (type, whether it holds, the reason when it does not); Ready always explains itself.
    flags = (
        (cond.READY, ready, None),
        (cond.RECONCILING, progressing, Reason.RECONCILED),
        (cond.STALLED, stalled, Reason.AS_EXPECTED),
        (cond.PROGRESSING, progressing, Reason.AS_EXPECTED),
        (cond.DEGRADED, degraded, Reason.AS_EXPECTED),
    )
    conditions = old_conditions
    for type_, holds, idle_reason in flags:
        explained = holds or idle_reason is None
        conditions = cond.set_condition(
            conditions,
            type_,
            holds,
            reason if explained else str(idle_reason),
            message if explained else "",
            generation,
            now,
        )
    phase = (
        Phase.STALLED
        if stalled
        else Phase.DEGRADED
        if degraded
        else Phase.READY
        if ready
        else Phase.PENDING
        if reason == Reason.CREATING
        else Phase.PROGRESSING
    )
    status: dict[str, Any] = {
        **{
            k: v
            for k, v in observed.status.items()
            if k not in ("conditions", "phase", "message", "observedGeneration")
        },
        **(extra or {}),
        "phase": phase.value,
        "message": message,
        "observedGeneration": generation,
        "conditions": conditions,
    }
    return status, _events_for(old_conditions, conditions)


def stalled_plan(observed: Observed, errors: list[FieldError], reason: str, now: str) -> Plan:
    """Bad input: no child is touched (the last good rollout keeps serving); status says why."""
    message = "; ".join(str(error) for error in errors)
    status, events = _status(observed, now, ready=False, reason=reason, message=message, stalled=True)
    return Plan(status=status, events=events)


# --- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Desired:
    """The children the spec asks for, and the revision they make up."""

    revision: str
    active: Color
    children: list[Manifest]


def desired_state(agent: EnterpriseAgent, observed: Observed, operator_namespace: str) -> Desired:
    """Renders every child; it depends only on the spec, the key Secret and the active colour,
    so the controller may reuse it while those are unchanged."""
    keys = KeyVersions.from_secret_data(observed.key_data or {})
    active = Color(observed.status.get("activeColor") or Color.BLUE.value)
    render_plan = RenderPlan(
        active=ColorPlan(active, agent.spec.replicas),
        keys=keys,
        key_data=dict(observed.key_data) if observed.key_data else None,
        key_rotated_for=observed.key_rotated_for,
        operator_namespace=operator_namespace,
    )
    children = [owned(child, agent.name, observed.uid) for child in build_children(agent, render_plan)]
    return Desired(compute_revision(agent, keys), active, children)


def plan(
    agent: EnterpriseAgent, observed: Observed, now: str, operator_namespace: str, rendered: Desired | None = None
) -> Plan:
    """Desired children, the difference to apply, stale children to delete, and the new status.
    ``rendered`` is a :func:`desired_state` computed earlier for the same inputs."""
    wanted = rendered or desired_state(agent, observed, operator_namespace)
    revision, active, desired = wanted.revision, wanted.active, wanted.children
    result = Plan(revision=revision)
    desired_keys = {child_key(child) for child in desired}
    result.apply = [child for child in desired if not is_subset(child, observed.children.get(child_key(child)))]
    # Children we made earlier that the spec no longer asks for: an old revision's ConfigMap,
    # an HPA or NetworkPolicy switched off, the other colour's Deployment.
    result.delete = sorted(key for key in observed.children if key not in desired_keys)

    deployment = observed.children.get(("apps/v1", "Deployment", deployment_name(agent, active)))
    reason, message, ready = _deployment_progress(deployment, revision, agent.spec.replicas)
    deployment_status = (deployment or {}).get("status") or {}
    extra = {
        "activeColor": active.value,
        "activeRevision": revision if ready else observed.status.get("activeRevision"),
        "replicas": deployment_status.get("replicas", 0),
        "readyReplicas": deployment_status.get("readyReplicas", 0),
        "selector": active_selector(agent, active),
        "image": agent.spec.image,
    }
    degraded = reason == Reason.DEADLINE_EXCEEDED
    result.status, result.events = _status(
        observed, now, ready=ready, reason=reason, message=message, degraded=degraded, extra=extra
    )
    return result


def status_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether the status is worth writing: any field differs (timestamps move only on transitions)."""
    return dict(old) != dict(new)
