"""The pure core of a reconcile: observed state in, the writes to make and the status out.

No I/O here. The controller gathers what it observed (the agent, its children from the watch
cache, which referenced objects exist, the key Secret), calls :func:`reconcile` with the time it
read once, and performs exactly the writes the plan lists. Comparing desired with observed
*before* writing is what makes a resync with no drift cost zero write requests.

    admit(body) -> Observed -> reconcile(observed, now, checks) -> Plan
                                     |-- plan.measure: the controller measures, calls again with checks
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson

from agent_contract.layout import CONFIG_FILE_KEY
from agent_contract.operations import BUILTIN_OPERATIONS
from agent_operator import conditions as cond
from agent_operator import rollout
from agent_operator.conditions import Reason
from agent_operator.manifest import FieldError, ManifestError, parse_agent
from agent_operator.render import (
    ColorPlan,
    KeyVersions,
    RenderPlan,
    RevisionRecord,
    active_selector,
    build_children,
    compute_revision,
    first_render,
)
from agent_operator.render.common import (
    ANNOTATION_ABORT,
    ANNOTATION_RETRY,
    ANNOTATION_SPEC,
    LABEL_REVISION,
    Manifest,
    active_service_name,
    config_map_name,
    decode_spec,
    deployment_name,
    json_bytes,
    preview_service_name,
)
from agent_operator.render.history import REVISION_HISTORY_LIMIT, read_controller_revision
from agent_operator.render.keys import ANNOTATION_ROTATED_FOR
from agent_operator.render.references import Found, content_digest, unsatisfied
from agent_operator.spec import (
    API_VERSION,
    KIND,
    QUANTITY,
    Color,
    Condition,
    ConditionStatus,
    ConditionType,
    EnterpriseAgent,
    EnterpriseAgentSpec,
    EnterpriseAgentStatus,
    Phase,
    Step,
    UndoStatus,
    cut_message,
    parse_quantity,
    read_status,
)
from agent_operator.timefmt import rfc3339

# (apiVersion, kind, name) identifies a child within the agent's namespace.
ChildKey = tuple[str, str, str]


def child_key(manifest: Mapping[str, Any]) -> ChildKey:
    return (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"])


@dataclass(frozen=True)
class Admission:
    """The agent as the operator reads it: a valid spec, or the reason it cannot act on it."""

    agent: EnterpriseAgent | None
    reason: str = ""
    errors: tuple[FieldError, ...] = ()


def admit(body: Mapping[str, Any]) -> Admission:
    """Parses the agent and runs the checks only the operator can make (operation names)."""
    metadata = body.get("metadata") or {}
    # The status is the operator's own record, read leniently (read_status); a status the models
    # cannot read must never make the spec invalid.
    spec_only = {key: value for key, value in body.items() if key != "status"}
    try:
        agent = parse_agent(spec_only, f"{metadata.get('namespace')}/{metadata.get('name')}")
    except ManifestError as error:
        return Admission(None, Reason.INVALID_SPEC, tuple(error.errors))
    unknown = unknown_operations(agent)
    if unknown:
        return Admission(None, Reason.UNKNOWN_OPERATION, tuple(unknown))
    return Admission(agent)


@dataclass(frozen=True)
class Observed:
    """What the controller saw of one agent: the object, its children, their EndpointSlices, the
    Secrets and ConfigMaps its spec references as read (``references``, by kind and name; None for
    one that is not there) and those it references that are missing, the key Secret it ensured,
    and its answer to an undo request (undo.py) that the status is to record."""

    body: Mapping[str, Any]
    admission: Admission
    children: Mapping[ChildKey, Mapping[str, Any]] = field(default_factory=dict)
    endpoint_slices: Sequence[Mapping[str, Any]] = ()
    missing: Sequence[FieldError] = ()
    key_secret: Mapping[str, Any] | None = None
    references: Found = field(default_factory=dict)
    undo: UndoStatus | None = None

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self.body.get("metadata") or {}

    @property
    def generation(self) -> int:
        return int(self.metadata.get("generation") or 0)

    @property
    def uid(self) -> str:
        return str(self.metadata.get("uid") or "")

    @property
    def annotations(self) -> Mapping[str, str]:
        return self.metadata.get("annotations") or {}

    @property
    def status(self) -> EnterpriseAgentStatus:
        """The status as written, with the undo answer of this reconcile (kept by every plan)."""
        status = read_status(self.body.get("status"))
        return status if self.undo is None else status.model_copy(update={"last_undo": self.undo})

    @property
    def key_data(self) -> Mapping[str, str]:
        return (self.key_secret or {}).get("data") or {}


@dataclass(frozen=True)
class Measure:
    """The HTTP checks a decision needs before it can be made: of ``color``, through ``service``
    (its /readyz and the smoke call) and each pod address (its /metrics). ``baseline_pod_ips``: the
    stable colour's pods, whose /metrics the preview's are compared with (None: no comparison)."""

    service: str
    color: Color
    pod_ips: tuple[str, ...]
    baseline_pod_ips: tuple[str, ...] | None = None


@dataclass
class Plan:
    """The outcome of one reconcile: what to write, and what to do after."""

    status: EnterpriseAgentStatus
    apply: list[Manifest] = field(default_factory=list)
    delete: list[ChildKey] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    revision: str | None = None
    measure: Measure | None = None  # measure these, then reconcile again with the checks
    requeue_after: float | None = None
    outcome: rollout.Outcome | None = None  # a rollout that ended with this status
    promotion_seconds: float | None = None
    decision: rollout.Decision | None = None
    stalled: bool = False

    def status_body(self) -> dict[str, Any]:
        """The status as written with server-side apply: a field left out is removed."""
        body: dict[str, Any] = self.status.model_dump(mode="json", by_alias=True, exclude_none=True)
        return body


@dataclass
class Memo:
    """What is costly to compute and changes only with the spec or the keys: the revision and the
    rendered children. Kept per agent by the controller; a cache, so the result is the same with
    an empty one."""

    revision_inputs: tuple[Any, ...] | None = None
    revision: str = ""  # the hash of the user's input (spec, key versions, referenced content)
    # The same input's hash as an operator that did not hash referenced content computed it.
    unreferenced_revision: str = ""
    keys: KeyVersions = field(default_factory=KeyVersions)
    fresh: RevisionRecord | None = None  # the current spec rendered now, when no record of it is kept
    # The render's inputs, with each revision record as its fingerprint, and its output as JSON: a
    # thousand agents' memos held every record and render as objects (20 MiB of the operator's
    # peak when the cache's children were decoded afresh for each reconcile).
    render_inputs: tuple[Any, ...] | None = None
    rendered_json: bytes = b"[]"
    kept: frozenset[ChildKey] = frozenset()


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


def is_subset(desired: Any, actual: Any) -> bool:
    """True when every field we set is present with the same value; fields the API server or
    other controllers added are ignored, and so is a field we set to null (absent means null).

    A field we set to a zero value (false, 0, "", {} or []) must be present too: for the fields we
    render, the server keeps a zero it was given (``automountServiceAccountToken: false``,
    ``allowPrivilegeEscalation: false``, ``maxUnavailable: 0``), and absent means the API's
    default, which for those fields is the weaker setting. Renderers leave out the zero values
    the server itself drops (an empty map or list, an env var's ``value: ""``); see
    tests/unit/test_render.py."""
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            return not desired and actual is None
        return all(is_subset(value, actual[key]) if key in actual else value is None for key, value in desired.items())
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


def missing_references(agent: EnterpriseAgent, found: Found) -> list[FieldError]:
    """The references the objects ``found`` (by kind and name, as read; None when there is none)
    do not satisfy: a Secret or ConfigMap that does not exist, or a key that is not in it (or holds
    no value where one is needed); refs marked optional never. Errors name the field, the object
    and the key, never a value."""
    return [FieldError(problem.path, problem.message) for problem in unsatisfied(agent, found)]


def shared_state_missing(agent: EnterpriseAgent) -> str | None:
    """Why the agent's replicas would not share their state, or None when they do (or it runs one).
    With autoscaling the ceiling is maxReplicas, so the message does not change as the HPA scales."""
    spec = agent.spec
    if spec.state.postgres is not None:
        return None
    if spec.autoscaling.enabled and spec.autoscaling.max_replicas > 1:
        cause = f"spec.autoscaling.maxReplicas is {spec.autoscaling.max_replicas}"
    elif spec.replicas > 1:
        cause = f"spec.replicas is {spec.replicas}"
    else:
        return None
    return (
        f"{cause} and spec.state.postgres is not set: each replica keeps its own embedded store, so logout and"
        " token revocation, GDPR consents, SOX approvals, stored reports and login throttling are per replica"
        " (a token revoked on one replica still works on the others). Set spec.state.postgres.secretRef to"
        " share them."
    )


# --- status ---------------------------------------------------------------------------------------


def _events_for(
    old: Sequence[Condition], new: Sequence[Condition], *, never_served: bool
) -> list[tuple[str, str, str]]:
    """An Event for every condition that changed status or reason; nothing when all is as before,
    and nothing for a new agent (``never_served``: no active revision yet) that rolls out and
    becomes available: that is what its status says at once, and what GitOps tools read. One
    write per agent fewer, which 1,000 agents created at once feel. Its warnings (Stalled,
    SharedStateMissing, a failed rollout) still get one."""
    events: list[tuple[str, str, str]] = []
    for condition in new:
        if condition.type not in _OWN_TYPES:
            continue  # another controller's condition, carried along untouched
        type_ = ConditionType(condition.type)
        before = cond.get_condition(old, type_)
        if before is not None and (before.status, before.reason) == (condition.status, condition.reason):
            continue
        holds = condition.status == ConditionStatus.TRUE
        if not holds and type_ != ConditionType.READY:
            continue  # a condition clearing is reported by the one that takes over
        if before is None and (type_ in _FIRST_ROLLOUT_TYPES or (type_ == ConditionType.READY and not holds)):
            continue  # a new agent rolling out, not ready yet
        if never_served and type_ == ConditionType.READY and holds:
            continue  # a new agent available for the first time
        warning = type_ in _WARNING_TYPES or (type_ == ConditionType.READY and not holds)
        event = ("Warning" if warning else "Normal", condition.reason, condition.message)
        if event not in events:  # Reconciling and Progressing often move together: one Event
            events.append(event)
    return events


_OWN_TYPES = frozenset(ConditionType)
_FIRST_ROLLOUT_TYPES = frozenset({ConditionType.RECONCILING, ConditionType.PROGRESSING})
# Conditions whose turning True is a Warning Event (Ready turning False is one too).
_WARNING_TYPES = frozenset({ConditionType.STALLED, ConditionType.DEGRADED, ConditionType.SHARED_STATE_MISSING})


def _phase(*, ready: bool, reason: str, stalled: bool, degraded: bool, paused: bool) -> Phase:
    if stalled:
        return Phase.STALLED
    if degraded:
        return Phase.DEGRADED
    if paused:
        return Phase.PAUSED
    if ready:
        return Phase.READY
    return Phase.PENDING if reason == Reason.CREATING else Phase.PROGRESSING


def _status(
    base: EnterpriseAgentStatus,
    agent: EnterpriseAgent | None,
    generation: int,
    now: str,
    *,
    ready: bool,
    reason: str,
    message: str,
    stalled: bool = False,
    degraded: bool = False,
    paused: bool = False,
    **fields: Any,
) -> tuple[EnterpriseAgentStatus, list[tuple[str, str, str]]]:
    """``base`` with the conditions, phase and message for this outcome, and ``fields`` set. The
    SharedStateMissing warning is judged on ``agent``'s spec; it is left as it was when the spec
    cannot be read (``agent`` is None), and it never changes the phase or Ready."""
    message = cut_message(message)
    progressing = not ready and not stalled and not degraded
    # (type, whether it holds, the reason when it does not); Ready always explains itself. A
    # Degraded rollout is also Stalled: it waits for a person (a new spec, retry), and kstatus
    # (Flux, kpt) reports Stalled as Failed instead of waiting for a Ready that will not come.
    flags = (
        (ConditionType.READY, ready, None),
        (ConditionType.RECONCILING, progressing, Reason.RECONCILED),
        (ConditionType.STALLED, stalled or degraded, Reason.AS_EXPECTED),
        (ConditionType.PROGRESSING, progressing, Reason.AS_EXPECTED),
        (ConditionType.DEGRADED, degraded, Reason.AS_EXPECTED),
    )
    conditions = list(base.conditions)
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
    if agent is not None:
        warning = shared_state_missing(agent)
        conditions = cond.set_condition(
            conditions,
            ConditionType.SHARED_STATE_MISSING,
            warning is not None,
            Reason.PER_REPLICA_STATE if warning is not None else Reason.AS_EXPECTED,
            warning or "",
            generation,
            now,
        )
    phase = _phase(ready=ready, reason=reason, stalled=stalled, degraded=degraded, paused=paused)
    status = base.model_copy(
        update={
            **fields,
            "phase": phase,
            "message": message,
            "observed_generation": generation,
            "conditions": conditions,
        }
    )
    return status, _events_for(base.conditions, conditions, never_served=base.active_revision is None)


def stalled_plan(observed: Observed, errors: Sequence[FieldError], reason: str, now: datetime) -> Plan:
    """Bad input: no child is touched (the last good rollout keeps serving); status says why."""
    return _untouched_plan(observed, reason, "; ".join(str(error) for error in errors), now, stalled=True)


def waiting_plan(observed: Observed, message: str, now: datetime) -> Plan:
    """A write refused for a moment by the API server itself, not for the spec: nothing is touched.
    An agent with no status yet says it is being created (kstatus would read an agent without
    status as Current); one with a status keeps it, so a Ready agent is not shown otherwise."""
    if observed.status.conditions:
        return Plan(status=observed.status)
    return _untouched_plan(observed, Reason.CREATING, message, now, stalled=False)


def _untouched_plan(observed: Observed, reason: str, message: str, now: datetime, *, stalled: bool) -> Plan:
    status, events = _status(
        observed.status,
        observed.admission.agent,
        observed.generation,
        rfc3339(now),
        ready=False,
        reason=reason,
        message=message,
        stalled=stalled,
    )
    return Plan(status=status, events=events, stalled=stalled)


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


def _deployment_key(agent: EnterpriseAgent, color: Color) -> ChildKey:
    return ("apps/v1", "Deployment", deployment_name(agent, color))


def running_revisions(status: EnterpriseAgentStatus) -> dict[Color, str]:
    """The revision status says each colour runs: the active colour its activeRevision and, after
    a promotion (while the old colour is kept for a switch-back), the old colour the previous one."""
    active = status.active_color or Color.BLUE
    running: dict[Color, str] = {}
    if status.active_revision:
        running[active] = status.active_revision
    roll = status.rollout
    if roll is not None and roll.step == Step.POST_PROMOTION and roll.previous_revision:
        running[active.other] = roll.previous_revision
    return running


def observed_colours(
    agent: EnterpriseAgent, observed: Observed, records: Mapping[str, RevisionRecord]
) -> dict[Color, rollout.Colour]:
    """Each colour's Deployment as the rollout sees it. A Deployment that is gone (someone deleted
    it) while status says it runs a revision whose record is kept is seen as that revision with no
    pods: the rollout carries on, and the colour is made again from the record, not the spec."""
    colours = {color: colour_observed(observed.children.get(_deployment_key(agent, color))) for color in Color}
    for color, revision in running_revisions(observed.status).items():
        if colours[color].revision is None and revision in records:
            colours[color] = rollout.Colour(revision=revision)
    return colours


def rollout_input(
    agent: EnterpriseAgent,
    observed: Observed,
    revision: str,
    now: datetime,
    checks: Sequence[rollout.Check] | None = None,
    colours: Mapping[Color, rollout.Colour] | None = None,
) -> rollout.RolloutInput:
    status = observed.status
    active = status.active_color or Color.BLUE
    return rollout.RolloutInput(
        revision=revision,
        replicas=agent.spec.replicas,
        rollout=agent.spec.rollout,
        status=status,
        colours=colours if colours is not None else observed_colours(agent, observed, {}),
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


# --- revisions ------------------------------------------------------------------------------------


def _adopted_record(
    agent: EnterpriseAgent,
    observed: Observed,
    deployment: Mapping[str, Any],
    color: Color,
    revision: str,
    keys: KeyVersions,
) -> RevisionRecord | None:
    """The record of a revision whose Deployment has no ControllerRevision (an operator before
    ControllerRevisions made it, or its record was deleted): the spec from the Deployment's
    annotation, this colour's pod template and the config as they run, so adopting it changes no
    pod. The other colour's template, never used yet, is rendered now."""
    source = recorded_agent(agent, deployment)
    template = (deployment.get("spec") or {}).get("template")
    if source is None or not isinstance(template, Mapping):
        return None
    fresh = first_render(source, revision, compute_revision(source, keys))
    config_map = observed.children.get(("v1", "ConfigMap", config_map_name(agent, revision))) or {}
    config = (config_map.get("data") or {}).get(CONFIG_FILE_KEY)
    return replace(
        fresh,
        pod_templates={**fresh.pod_templates, color.value: dict(template)},
        runtime_config=config if isinstance(config, str) else fresh.runtime_config,
    )


def revision_records(agent: EnterpriseAgent, observed: Observed, keys: KeyVersions) -> dict[str, RevisionRecord]:
    """The agent's revisions by name: those its ControllerRevisions keep, and those of colours
    running without one (adopted from what runs)."""
    records: dict[str, RevisionRecord] = {}
    for (api_version, kind, _), child in observed.children.items():
        if (api_version, kind) == ("apps/v1", "ControllerRevision"):
            record = read_controller_revision(child)
            if record is not None:
                records[record.revision] = record
    for color in Color:
        deployment = observed.children.get(_deployment_key(agent, color))
        revision = colour_observed(deployment).revision
        if deployment is not None and revision and revision not in records:
            adopted = _adopted_record(agent, observed, deployment, color, revision, keys)
            if adopted is not None:
                records[revision] = adopted
    return records


def _key_files_version(observed: Observed) -> Any:
    return (observed.key_secret or {}).get("metadata", {}).get("resourceVersion") or sorted(observed.key_data.items())


def _revision(agent: EnterpriseAgent, observed: Observed, memo: Memo) -> tuple[str, KeyVersions]:
    """The hash of the user's input (the spec, the key versions and what the referenced Secrets and
    ConfigMaps hold), computed once per input."""
    digest = content_digest(agent, observed.references, observed.key_data)
    inputs = (observed.uid, observed.generation, agent.spec, _key_files_version(observed), digest)
    if memo.revision_inputs != inputs:
        memo.keys = KeyVersions.from_secret_data(observed.key_data)
        memo.revision = compute_revision(agent, memo.keys, digest)
        memo.unreferenced_revision = compute_revision(agent, memo.keys) if digest is not None else memo.revision
        memo.fresh = None
        memo.revision_inputs = inputs
    return memo.revision, memo.keys


def _current_record(
    agent: EnterpriseAgent, records: Mapping[str, RevisionRecord], spec_hash: str, memo: Memo
) -> RevisionRecord:
    """The current spec's revision: a kept one made from the same input (the latest, when several
    were), else the spec rendered now under the hash as its name.

    A record an earlier operator made hashed the spec and keys but not the referenced content: if
    one was made from this spec and these keys, it is this input's, and it is taken over under the
    new hash (its ControllerRevision's spec-hash annotation is rewritten; its name, pods and config
    stay). So an operator upgrade starts no rollout; a later change of the content does."""
    same = [record for record in records.values() if record.spec_hash == spec_hash]
    if not same and memo.unreferenced_revision != spec_hash:
        same = [
            replace(record, spec_hash=spec_hash)
            for record in records.values()
            if record.spec_hash == memo.unreferenced_revision
        ]
    if same:
        return max(same, key=lambda r: (r.number, r.revision == spec_hash, r.revision))
    if memo.fresh is None or memo.fresh.revision != spec_hash:
        memo.fresh = first_render(agent, spec_hash)
    return memo.fresh


def kept_revisions(
    status: EnterpriseAgentStatus,
    records: Mapping[str, RevisionRecord],
    current: RevisionRecord,
    colours: Mapping[Color, rollout.Colour],
) -> tuple[RevisionRecord, ...]:
    """The revisions whose ControllerRevisions stay, numbered: those in use (the current spec's,
    each colour's, and those status names) and the latest REVISION_HISTORY_LIMIT others; the rest
    are pruned. A revision written now is numbered above every kept one, and so is the current
    spec's when the spec went back to an older revision (as a StatefulSet renumbers its own)."""
    roll = status.rollout
    in_use = {current.revision, status.active_revision, status.preview_revision}
    in_use |= {colour.revision for colour in colours.values()}
    in_use.add(roll.previous_revision if roll is not None else None)
    others = sorted(
        (record for record in records.values() if record.revision != current.revision),
        key=lambda r: (r.number == 0, r.number, r.revision),
    )
    top = max((record.number for record in others), default=0)
    numbered: list[RevisionRecord] = []
    for record in others:
        if record.number == 0:
            top += 1
            record = replace(record, number=top)
        numbered.append(record)
    if current.number <= top:
        current = replace(current, number=top + 1)
    idle = sorted((r for r in numbered if r.revision not in in_use), key=lambda r: r.number, reverse=True)
    kept = [r for r in numbered if r.revision in in_use] + idle[:REVISION_HISTORY_LIMIT] + [current]
    return tuple(sorted(kept, key=lambda r: r.number))


# --- the plan -------------------------------------------------------------------------------------


def _render(
    agent: EnterpriseAgent,
    observed: Observed,
    decision: rollout.Decision,
    current: RevisionRecord,
    records: Mapping[str, RevisionRecord],
    colours: Mapping[Color, rollout.Colour],
    operator_namespace: str,
    memo: Memo,
) -> tuple[list[Manifest], frozenset[ChildKey]]:
    """Every child for the decision, and those left as they are because the revision they run has
    no record. Each colour is rendered from its revision's record: the current spec's, or, for a
    colour that keeps an older revision, that one's. Rendering is the costly part: reused while
    its inputs hold."""
    history = kept_revisions(observed.status, records, current, colours)
    layouts = tuple(
        (layout, None if layout.from_spec else colours[layout.color].revision) for layout in decision.deployments
    )
    rotated_for = (observed.key_secret or {}).get("metadata", {}).get("annotations", {}).get(ANNOTATION_ROTATED_FOR)
    layout_records = ((layout, records.get(revision) if revision else None) for layout, revision in layouts)
    inputs = (
        memo.revision_inputs,
        current.fingerprint(),
        tuple(record.fingerprint() for record in history),
        operator_namespace,
        decision.active_color,
        decision.preview_color,
        tuple((layout, record.fingerprint() if record else None) for layout, record in layout_records),
        rotated_for,
    )
    if memo.render_inputs == inputs:
        return orjson.loads(memo.rendered_json), memo.kept
    colour_plans: list[ColorPlan] = []
    kept: set[ChildKey] = set()
    for layout, revision in layouts:
        if layout.from_spec:
            colour_plans.append(ColorPlan(layout.color, layout.replicas))
            continue
        record = records.get(revision) if revision else None
        if record is None:
            kept.add(_deployment_key(agent, layout.color))
            if revision:
                kept.add(("v1", "ConfigMap", config_map_name(agent, revision)))
            continue
        colour_plans.append(ColorPlan(layout.color, layout.replicas, record))
    render_plan = RenderPlan(
        deployments=tuple(colour_plans),
        active_color=decision.active_color,
        preview_color=decision.preview_color,
        keys=memo.keys,
        key_data=dict(observed.key_data) or None,
        key_rotated_for=rotated_for,
        operator_namespace=operator_namespace,
        current=current,
        history=history,
    )
    rendered = [owned(child, agent.name, observed.uid) for child in build_children(agent, render_plan)]
    # Returned as read back from its JSON on every call, the first too: the same values each time.
    memo.render_inputs, memo.rendered_json, memo.kept = inputs, json_bytes(rendered), frozenset(kept)
    return orjson.loads(memo.rendered_json), frozenset(kept)


def reconcile(
    observed: Observed,
    now: datetime,
    checks: Sequence[rollout.Check] | None = None,
    *,
    operator_namespace: str,
    memo: Memo | None = None,
) -> Plan:
    """The whole reconcile of one agent, pure: refuse what cannot be acted on, decide the
    rollout's next step, render the children for it, and diff them with what exists.

    When the decision needs HTTP checks and ``checks`` is None, the plan only asks for them
    (``plan.measure``); call again with the measured checks and the same ``now``."""
    agent = observed.admission.agent
    if agent is None:
        return stalled_plan(observed, observed.admission.errors, observed.admission.reason, now)
    if observed.missing:
        return stalled_plan(observed, observed.missing, Reason.MISSING_REFERENCE, now)
    memo = memo if memo is not None else Memo()
    spec_hash, keys = _revision(agent, observed, memo)
    records = revision_records(agent, observed, keys)
    current = _current_record(agent, records, spec_hash, memo)
    revision = current.revision
    colours = observed_colours(agent, observed, records)
    decision = rollout.decide(rollout_input(agent, observed, revision, now, checks, colours))
    if decision.measure is not None:
        return Plan(status=observed.status, revision=revision, measure=_measure(agent, observed, decision))
    children, kept = _render(agent, observed, decision, current, records, colours, operator_namespace, memo)
    desired_keys = {child_key(child) for child in children} | kept
    apply = [child for child in children if not is_subset(child, observed.children.get(child_key(child)))]
    # Children we made earlier that the spec no longer asks for: an old revision's ConfigMap,
    # an HPA or NetworkPolicy switched off.
    delete = sorted(key for key in observed.children if key not in desired_keys)
    active_key = ("apps/v1", "Deployment", deployment_name(agent, decision.active_color))
    active_status = (observed.children.get(active_key) or {}).get("status") or {}
    active_manifest = next((c for c in children if child_key(c) == active_key), None)
    image = (
        active_manifest["spec"]["template"]["spec"]["containers"][0]["image"] if active_manifest else agent.spec.image
    )
    status, events = _status(
        observed.status,
        agent,
        observed.generation,
        rfc3339(now),
        ready=decision.ready,
        reason=decision.reason,
        message=decision.message,
        degraded=decision.degraded,
        paused=decision.paused,
        active_color=decision.active_color,
        active_revision=decision.active_revision,
        preview_revision=decision.preview_revision,
        rollout=decision.rollout,
        abort_request_seen=decision.abort_request_seen,
        replicas=int(active_status.get("replicas", 0)),
        ready_replicas=int(active_status.get("readyReplicas", 0)),
        selector=active_selector(agent, decision.active_color),
        image=image,
    )
    return Plan(
        status=status,
        apply=apply,
        delete=delete,
        events=events + [e for e in decision.events if e not in events],
        revision=revision,
        requeue_after=decision.requeue_after,
        outcome=decision.outcome,
        promotion_seconds=decision.promotion_seconds,
        decision=decision,
    )


def _measure(agent: EnterpriseAgent, observed: Observed, decision: rollout.Decision) -> Measure:
    """Where the checks of the colour the decision names go: the Service that serves it, its pods."""
    slices = observed.endpoint_slices
    if decision.measure == "preview":
        service, color = preview_service_name(agent), decision.active_color.other
        # The stable colour's pods, behind the active Service, for the checks that compare with them.
        baseline: tuple[str, ...] | None = None
        if agent.spec.rollout.analysis.max_tokens_per_request_ratio is not None:
            stable = decision.active_color
            baseline = tuple(ready_endpoint_addresses(agent, slices, active_service_name(agent), stable))
    else:
        service, color, baseline = active_service_name(agent), decision.active_color, None
    return Measure(service, color, tuple(ready_endpoint_addresses(agent, slices, service, color)), baseline)


def settle(made: Plan, after: Plan) -> Plan:
    """The plan whose writes were just made, with the status judged on what now exists (``after``,
    the same reconcile over the children as the writes returned them), as long as that takes the
    same course: a step is taken once its children exist, and the status says so at once instead
    of in a second write."""
    if made.decision is None or after.decision is None or after.measure is not None:
        return made
    if not rollout.same_course(made.decision, after.decision):
        return made
    return replace(made, status=after.status, events=after.events)


def key_files(observed: Observed) -> dict[str, bytes]:
    """The key Secret's files, decoded (what the smoke token is signed with)."""
    return {name: base64.b64decode(value) for name, value in observed.key_data.items()}
