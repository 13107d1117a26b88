"""Status conditions with kstatus semantics (Ready, Reconciling, Stalled) plus Progressing and
Degraded. Pure functions on plain dicts, as they appear in ``status.conditions``."""

from __future__ import annotations

from typing import Any

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
CONDITION_TYPES = (READY, RECONCILING, STALLED, PROGRESSING, DEGRADED)


class Reason:
    """Named reasons, so code, tests, alerts and the Argo CD health check agree on spelling."""

    AVAILABLE = "Available"
    CREATING = "Creating"
    ROLLING_OUT = "RollingOut"
    INVALID_SPEC = "InvalidSpec"
    MISSING_REFERENCE = "MissingReference"
    UNKNOWN_OPERATION = "UnknownOperation"
    APPLY_FAILED = "ApplyFailed"
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


Condition = dict[str, Any]


def set_condition(
    conditions: list[Condition], type_: str, status: bool, reason: str, message: str, generation: int, now: str
) -> list[Condition]:
    """Returns conditions with ``type_`` set. lastTransitionTime only moves when the status
    flips; reason, message and observedGeneration are refreshed either way."""
    wanted = "True" if status else "False"
    result = []
    found = False
    for condition in conditions:
        if condition.get("type") != type_:
            result.append(condition)
            continue
        found = True
        transition = condition.get("lastTransitionTime", now) if condition.get("status") == wanted else now
        result.append(_condition(type_, wanted, reason, message, generation, transition))
    if not found:
        result.append(_condition(type_, wanted, reason, message, generation, now))
    return sorted(result, key=lambda c: CONDITION_TYPES.index(c["type"]) if c["type"] in CONDITION_TYPES else 99)


def _condition(type_: str, status: str, reason: str, message: str, generation: int, transition: str) -> Condition:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
        "observedGeneration": generation,
    }


def get_condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return condition is not None and condition.get("status") == "True"
