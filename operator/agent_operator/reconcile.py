"""The pure core of a reconcile: observed state in, the writes to make and the status out.

No I/O here. The controller gathers what it observed (the agent, its children from the watch
cache, which referenced objects exist), calls :func:`plan`, then performs exactly the writes the
plan lists. Comparing desired with observed *before* writing is what makes a resync with no drift
cost zero write requests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent_contract.operations import BUILTIN_OPERATIONS
from agent_operator import conditions as cond
from agent_operator import rollout
from agent_operator.conditions import Reason
from agent_operator.manifest import FieldError
from agent_operator.render import (
    ColorPlan,
    KeyVersions,
    RenderPlan,
    active_selector,
    build_children,
    compute_revision,
)
from agent_operator.render.common import (
    ANNOTATION_ABORT,
    ANNOTATION_RETRY,
    ANNOTATION_SPEC,
    LABEL_REVISION,
    Manifest,
    active_service_name,
    decode_spec,
    deployment_name,
    preview_service_name,
)
from agent_operator.spec import (
    API_VERSION,
    KIND,
    QUANTITY,
    Color,
    EnterpriseAgent,
    EnterpriseAgentSpec,
    Phase,
    parse_quantity,
)

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
    annotations: Mapping[str, str] = field(default_factory=dict)  # the agent's
    endpoint_slices: Sequence[Mapping[str, Any]] = ()  # of the agent's Services


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
    paused: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    generation = observed.generation
    old_conditions = list(observed.status.get("conditions") or [])
    progressing = not ready and not stalled and not degraded
    # (type, whether it holds, the reason when it does not); Ready always explains itself. A
    # Degraded rollout is also Stalled: it waits for a person (a new spec, retry), and kstatus
    # (Flux, kpt) reports Stalled as Failed instead of waiting for a Ready that will not come.
    flags = (
        (cond.READY, ready, None),
        (cond.RECONCILING, progressing, Reason.RECONCILED),
        (cond.STALLED, stalled or degraded, Reason.AS_EXPECTED),
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
        else Phase.PAUSED
        if paused
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


# --- what the rollout sees -------------------------------------------------------------------------


def colour_observed(deployment: Mapping[str, Any] | None) -> rollout.Colour:
    """A colour's Deployment as the rollout state machine sees it."""
    if deployment is None:
        return rollout.Colour()
    metadata, spec = deployment["metadata"], deployment.get("spec") or {}
    status = deployment.get("status") or {}
    replicas = int(spec.get("replicas", 1))
    available = int(status.get("availableReplicas", 0))
    rolled_out = (
        status.get("observedGeneration", 0) >= metadata.get("generation", 0)
        and status.get("updatedReplicas", 0) == replicas
        and status.get("replicas", 0) == replicas
        and available >= replicas
    )
    exceeded = any(
        c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
        for c in status.get("conditions") or []
    )
    return rollout.Colour(
        revision=(metadata.get("labels") or {}).get(LABEL_REVISION),
        replicas=replicas,
        available=available,
        rolled_out=rolled_out,
        deadline_exceeded=exceeded,
    )


def _ready_endpoints(
    agent: EnterpriseAgent, slices: Sequence[Mapping[str, Any]], service: str, color: Color
) -> list[Mapping[str, Any]]:
    prefix = deployment_name(agent, color) + "-"
    found = []
    for endpoint_slice in slices:
        if (endpoint_slice["metadata"].get("labels") or {}).get("kubernetes.io/service-name") != service:
            continue
        for endpoint in endpoint_slice.get("endpoints") or []:
            target = (endpoint.get("targetRef") or {}).get("name", "")
            if (endpoint.get("conditions") or {}).get("ready") and target.startswith(prefix):
                found.append(endpoint)
    return found


def ready_endpoints(agent: EnterpriseAgent, slices: Sequence[Mapping[str, Any]], service: str, color: Color) -> int:
    """Ready endpoints behind ``service`` that are pods of ``color``: what traffic would reach."""
    return len(_ready_endpoints(agent, slices, service, color))


def ready_endpoint_addresses(
    agent: EnterpriseAgent, slices: Sequence[Mapping[str, Any]], service: str, color: Color
) -> list[str]:
    """The first address of each such endpoint: where the analysis scrapes /metrics."""
    return [e["addresses"][0] for e in _ready_endpoints(agent, slices, service, color) if e.get("addresses")]


def rollout_input(
    agent: EnterpriseAgent,
    observed: Observed,
    revision: str,
    now: datetime,
    checks: Sequence[rollout.Check] | None = None,
) -> rollout.RolloutInput:
    active = Color(observed.status.get("activeColor") or Color.BLUE.value)
    colours = {
        color: colour_observed(observed.children.get(("apps/v1", "Deployment", deployment_name(agent, color))))
        for color in Color
    }
    return rollout.RolloutInput(
        revision=revision,
        replicas=agent.spec.replicas,
        rollout=agent.spec.rollout,
        status=observed.status,
        colours=colours,
        preview_endpoints=ready_endpoints(agent, observed.endpoint_slices, preview_service_name(agent), active.other),
        active_endpoints=ready_endpoints(agent, observed.endpoint_slices, active_service_name(agent), active),
        now=now,
        abort_requested=observed.annotations.get(ANNOTATION_ABORT),
        retry_requested=observed.annotations.get(ANNOTATION_RETRY),
        checks=checks,
    )


def recorded_agent(agent: EnterpriseAgent, deployment: Mapping[str, Any] | None) -> EnterpriseAgent | None:
    """The agent as it was when ``deployment`` was rendered (its spec annotation), or None when
    the annotation is missing or not a valid spec."""
    text = ((deployment or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_SPEC)
    if not text:
        return None
    try:
        spec = EnterpriseAgentSpec.model_validate(decode_spec(text))
    except ValueError:  # pydantic's ValidationError is a ValueError too
        return None
    return agent.model_copy(update={"spec": spec})


# --- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Desired:
    """The children the decision asks for. ``keep`` are Deployments left as they are because the
    spec they were made from cannot be read back."""

    revision: str
    decision: rollout.Decision
    children: list[Manifest]
    keep: frozenset[ChildKey] = frozenset()


def render_key(agent: EnterpriseAgent, observed: Observed, decision: rollout.Decision) -> tuple[Any, ...]:
    """Everything :func:`desired_state` depends on besides the spec and keys, for caching."""
    recorded = tuple(
        (
            layout,
            None
            if layout.from_spec
            else (
                (observed.children.get(("apps/v1", "Deployment", deployment_name(agent, layout.color))) or {})
                .get("metadata", {})
                .get("annotations", {})
                .get(ANNOTATION_SPEC)
            ),
        )
        for layout in decision.deployments
    )
    return (decision.active_color, decision.preview_color, recorded)


def desired_state(
    agent: EnterpriseAgent, observed: Observed, decision: rollout.Decision, revision: str, operator_namespace: str
) -> Desired:
    """Renders every child for the decision: a colour that keeps an older revision is rendered
    from the spec recorded on its Deployment."""
    colours: list[ColorPlan] = []
    keep: set[ChildKey] = set()
    for layout in decision.deployments:
        key = ("apps/v1", "Deployment", deployment_name(agent, layout.color))
        if layout.from_spec:
            colours.append(ColorPlan(layout.color, layout.replicas))
            continue
        deployment = observed.children.get(key)
        source = recorded_agent(agent, deployment)
        if source is None or deployment is None:
            keep.add(key)
            continue
        colours.append(ColorPlan(layout.color, layout.replicas, source, colour_observed(deployment).revision))
    render_plan = RenderPlan(
        deployments=tuple(colours),
        active_color=decision.active_color,
        preview_color=decision.preview_color,
        keys=KeyVersions.from_secret_data(observed.key_data or {}),
        key_data=dict(observed.key_data) if observed.key_data else None,
        key_rotated_for=observed.key_rotated_for,
        operator_namespace=operator_namespace,
    )
    children = [owned(child, agent.name, observed.uid) for child in build_children(agent, render_plan)]
    return Desired(revision, decision, children, frozenset(keep))


def plan(agent: EnterpriseAgent, observed: Observed, now: str, wanted: Desired) -> Plan:
    """The difference to apply, stale children to delete, and the new status."""
    decision = wanted.decision
    result = Plan(revision=wanted.revision)
    desired_keys = {child_key(child) for child in wanted.children} | wanted.keep
    result.apply = [child for child in wanted.children if not is_subset(child, observed.children.get(child_key(child)))]
    # Children we made earlier that the spec no longer asks for: an old revision's ConfigMap,
    # an HPA or NetworkPolicy switched off.
    result.delete = sorted(key for key in observed.children if key not in desired_keys)
    active_key = ("apps/v1", "Deployment", deployment_name(agent, decision.active_color))
    active_status = (observed.children.get(active_key) or {}).get("status") or {}
    active_manifest = next((c for c in wanted.children if child_key(c) == active_key), None)
    image = (
        active_manifest["spec"]["template"]["spec"]["containers"][0]["image"] if active_manifest else agent.spec.image
    )
    extra = {
        "activeColor": decision.active_color.value,
        "activeRevision": decision.active_revision,
        "previewRevision": decision.preview_revision,
        "rollout": decision.rollout,
        "replicas": active_status.get("replicas", 0),
        "readyReplicas": active_status.get("readyReplicas", 0),
        "selector": active_selector(agent, decision.active_color),
        "image": image,
    }
    status, events = _status(
        observed,
        now,
        ready=decision.ready,
        reason=decision.reason,
        message=decision.message,
        degraded=decision.degraded,
        paused=decision.paused,
        extra=extra,
    )
    result.status = {k: v for k, v in status.items() if v is not None}
    result.events = events + [e for e in decision.events if e not in events]
    return result


def plan_for(
    agent: EnterpriseAgent,
    observed: Observed,
    now: datetime,
    operator_namespace: str,
    checks: Sequence[rollout.Check] | None = None,
) -> Plan:
    """The whole pure reconcile in one call, without the controller's caches: revision, rollout
    decision, rendering and plan."""
    revision = compute_revision(agent, KeyVersions.from_secret_data(observed.key_data or {}))
    decision = rollout.decide(rollout_input(agent, observed, revision, now, checks))
    wanted = desired_state(agent, observed, decision, revision, operator_namespace)
    return plan(agent, observed, rollout.rfc3339(now), wanted)


def status_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether the status is worth writing: any field differs (timestamps move only on transitions)."""
    return dict(old) != dict(new)
