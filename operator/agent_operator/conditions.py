"""Status conditions with kstatus semantics (Ready, Reconciling, Stalled) plus Progressing and
Degraded, and the warning SharedStateMissing. Every type but Ready is abnormal when True (kstatus'
"abnormal-true" polarity), so a reader that knows only some of them reads the rest as fine. Pure
functions on the typed :class:`~agent_operator.spec.Condition`."""

from __future__ import annotations

from collections.abc import Sequence

from agent_operator.spec import Condition, ConditionStatus, ConditionType


class Reason:
    """Named reasons, so code, tests, alerts and the Argo CD health check agree on spelling."""

    AVAILABLE = "Available"
    CREATING = "Creating"
    ROLLING_OUT = "RollingOut"
    INVALID_SPEC = "InvalidSpec"
    MISSING_REFERENCE = "MissingReference"
    UNKNOWN_OPERATION = "UnknownOperation"
    APPLY_FAILED = "ApplyFailed"
    FORBIDDEN = "Forbidden"  # a quota, an admission policy, RBAC or a terminating namespace refused a write
    NAME_CONFLICT = "NameConflict"  # a child's name is taken by an object this agent does not control
    RECONCILED = "Reconciled"
    AS_EXPECTED = "AsExpected"
    DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
    # Blue-green rollout steps and outcomes.
    PREVIEW_PROGRESSING = "PreviewProgressing"
    ANALYSING = "Analysing"
    AWAITING_PROMOTION = "AwaitingPromotion"
    PROMOTING = "Promoting"
    PROMOTED = "Promoted"
    ABORTED = "Aborted"
    ANALYSIS_FAILED = "AnalysisFailed"
    ROLLOUT_COMPLETED = "RolloutCompleted"
    ROLLED_BACK = "RolledBack"
    # SharedStateMissing: several replicas, each with its own embedded store.
    PER_REPLICA_STATE = "PerReplicaState"


_ORDER = list(ConditionType)


def set_condition(
    conditions: Sequence[Condition],
    type_: ConditionType,
    holds: bool,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[Condition]:
    """Returns conditions with ``type_`` set. lastTransitionTime only moves when the status
    flips (as Argo Rollouts' SetCondition keeps it); reason, message and observedGeneration are
    refreshed either way."""
    wanted = ConditionStatus.TRUE if holds else ConditionStatus.FALSE
    before = get_condition(conditions, type_)
    transition = before.last_transition_time if before is not None and before.status == wanted else now
    updated = Condition(
        type=type_.value,
        status=wanted,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    result = [c for c in conditions if c.type != type_] + [updated]
    return sorted(result, key=lambda c: _ORDER.index(ConditionType(c.type)) if c.type in _ORDER else len(_ORDER))


def get_condition(conditions: Sequence[Condition], type_: ConditionType) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Sequence[Condition], type_: ConditionType) -> bool:
    condition = get_condition(conditions, type_)
    return condition is not None and condition.status == ConditionStatus.TRUE
