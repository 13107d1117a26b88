"""The blue-green rollout as a pure state machine: (spec, observed) in, the next step out.

Each call looks at the recorded status (the step, its timestamps) and at what the cluster shows
(each colour's Deployment, the ready endpoints behind each Service, the analysis checks measured
for this call) and decides: which colour runs which revision at how many replicas, which colour
each Service selects, and the new rollout status. Steps are small and idempotent, so an operator
killed at any point resumes from status: repeating a step changes nothing.

    Preview -> Analysis -> AwaitingPromotion -> [Promoting] -> PostPromotion -> Completed
       \\___________\\______________\\________________\\_______________\\-> Aborted

No I/O here: the HTTP checks are measured by the controller when a decision asks for them
(``Decision.measure``) and passed back in as ``RolloutInput.checks``.

Faults are waited out, as Argo Rollouts does, not failed at once: a change of spec.replicas (the
HPA writes the agent's scale subresource) scales the preview and both colours to the new count and
the step waits for them; a pod that is briefly unready (evicted during a node drain) is waited for
too, and so is a preview pod that did not answer a check (Pending) for up to
MAX_UNANSWERED_MEASUREMENTS measurements in a row. Only readiness missing for longer than
spec.rollout.progressDeadlineSeconds (``status.rollout.waitingSince``), a failed check, a preview
that did not answer more often than that (after promotion: once), or a requested check that could
not run by the deadline ends a rollout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from agent_operator.conditions import Reason
from agent_operator.spec import (
    AbortReason,
    AnalysisCheck,
    AnalysisResult,
    CheckName,
    Color,
    EnterpriseAgentStatus,
    PromotionMode,
    RolloutSpec,
    RolloutStatus,
    Step,
)
from agent_operator.timefmt import parse, rfc3339, rfc3339_micro

# Steps during which a preview colour exists next to the stable one, before traffic moves.
BEFORE_PROMOTION = (Step.PREVIEW, Step.ANALYSIS, Step.AWAITING_PROMOTION, Step.PROMOTING)
# Steps at which a person may approve the preview (`kubectl ea promote`, spec.rollout.promote).
PROMOTABLE = (Step.PREVIEW, Step.ANALYSIS, Step.AWAITING_PROMOTION)
# The sequence a successful rollout walks, for progress displays.
SEQUENCE = (*BEFORE_PROMOTION, Step.POST_PROMOTION, Step.COMPLETED)
# How often a check without a result is measured again while the analysis waits: a requested one that
# came back Skipped, or one left Pending because the pods could not be reached (analysis.UNREACHABLE).
REMEASURE_SECONDS = 10.0
# Consecutive measurements with a pod that did not answer that are waited out (Argo Rollouts' default
# consecutiveErrorLimit): a pod just in its Service's endpoints can be unreachable for a few seconds
# while the node programs the path to it, not for a minute. One more fails the analysis.
MAX_UNANSWERED_MEASUREMENTS = 4

Outcome = Literal["promoted", "aborted", "analysis_failed", "deadline_exceeded", "rolled_back"]


@dataclass(frozen=True)
class Colour:
    """One colour's Deployment as observed."""

    revision: str | None = None  # None: no Deployment
    replicas: int = 0
    available: int = 0
    rolled_out: bool = False  # the controller has observed its spec and every pod is updated and available
    deadline_exceeded: bool = False


@dataclass(frozen=True)
class Check:
    """One analysis check's result, as measured."""

    name: CheckName
    result: AnalysisResult
    message: str = ""

    def as_status(self, now: str) -> AnalysisCheck:
        return AnalysisCheck(name=self.name, result=self.result, message=self.message[:1024], observed_at=now)


@dataclass(frozen=True)
class RolloutInput:
    revision: str  # the revision the current spec renders
    replicas: int  # spec.replicas
    rollout: RolloutSpec
    status: EnterpriseAgentStatus
    colours: Mapping[Color, Colour]
    preview_endpoints: int  # ready endpoints of the preview Service that are pods of the preview colour
    active_endpoints: int  # ready endpoints of the active Service that are pods of the active colour
    now: datetime
    abort_requested: str | None = None  # the abort annotation: a revision; acts once (status.abortRequestSeen)
    retry_requested: str | None = None  # the retry annotation: a token, served once
    checks: Sequence[Check] | None = None  # HTTP checks measured for this decision, when it asked


@dataclass(frozen=True)
class Layout:
    """What one colour's Deployment should be. ``from_spec`` False: keep the spec it was made from."""

    color: Color
    replicas: int
    from_spec: bool


@dataclass
class Decision:
    active_color: Color
    preview_color: Color  # the preview Service's colour
    deployments: tuple[Layout, ...]
    active_revision: str | None
    preview_revision: str | None
    rollout: RolloutStatus | None  # status.rollout
    reason: str
    message: str
    ready: bool = False
    degraded: bool = False
    paused: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None
    measure: Literal["preview", "active"] | None = None  # checks are needed to decide; measure and call again
    outcome: Outcome | None = None
    promotion_seconds: float | None = None
    abort_request_seen: str | None = None  # status.abortRequestSeen: the abort annotation as acted on


def _seconds_until(moment: datetime, now: datetime) -> float:
    return max(0.0, (moment - now).total_seconds())


def preview_replicas(rollout: RolloutSpec, replicas: int) -> int:
    return min(rollout.preview_replicas or replicas, replicas)


def decide(i: RolloutInput) -> Decision:
    """The next step for the agent; see the module docstring for the sequence.

    An abort request acts once: every decision records the annotation it saw
    (``abort_request_seen``), and only an annotation that differs from the one recorded is a new
    request. One that asks to abort no rollout in flight is spent too, so a later rollout of the
    same revision (after `kubectl ea retry`, or the spec reverted and applied again) proceeds."""
    decision = _decide(i)
    decision.abort_request_seen = i.abort_requested
    return decision


def _abort_request(i: RolloutInput) -> str | None:
    """The revision a new abort request names, or None when the annotation was already acted on."""
    if i.abort_requested is None or i.abort_requested == i.status.abort_request_seen:
        return None
    return i.abort_requested


def _decide(i: RolloutInput) -> Decision:
    roll = i.status.rollout or RolloutStatus()
    active = i.status.active_color or Color.BLUE
    stable = i.status.active_revision
    step = roll.step
    in_flight = i.status.preview_revision

    if stable is None or i.colours.get(active, Colour()).revision is None:
        # Nothing has served yet (or the stable colour is gone with its spec): roll out in place.
        return _steady(i, active, roll if step == Step.COMPLETED else None)
    if step == Step.POST_PROMOTION:
        return _post_promotion(i, active, roll)
    if i.revision == stable:
        if step in BEFORE_PROMOTION:  # the spec went back to the stable revision: drop the preview
            return _steady(i, active, None, events=[("Normal", "RolloutCancelled", f"back to revision {stable}")])
        return _steady(i, active, roll if step == Step.COMPLETED else None)
    if step == Step.ABORTED and in_flight == i.revision:
        token = i.retry_requested
        if token and token != roll.retried_for:
            return _start(i, active, token)
        return _aborted(i, active, roll)
    if step not in BEFORE_PROMOTION or in_flight != i.revision:
        return _start(i, active, roll.retried_for)
    if _abort_request(i) == i.revision:
        return _abort(i, active, roll, AbortReason.ABORTED, "aborted on request; traffic stays on the stable colour")
    if step == Step.PREVIEW:
        return _preview(i, active, roll)
    if step == Step.ANALYSIS:
        return _analysis(i, active, roll)
    if step == Step.AWAITING_PROMOTION:
        return _awaiting(i, active, roll)
    return _promoting(i, active, roll)


# --- layouts --------------------------------------------------------------------------------------


def _colour_from_spec(i: RolloutInput, color: Color) -> bool:
    """A colour keeps its own recorded spec unless it already runs the current revision."""
    return i.colours.get(color, Colour()).revision in (None, i.revision)


def _idle(i: RolloutInput, color: Color) -> tuple[Layout, ...]:
    """The other colour outside a rollout: kept at zero (its spec is what `undo` restores)."""
    if i.colours.get(color, Colour()).revision is None:
        return ()
    return (Layout(color, 0, _colour_from_spec(i, color)),)


def _during_rollout(i: RolloutInput, active: Color, preview_count: int) -> tuple[Layout, ...]:
    return (
        Layout(active, i.replicas, _colour_from_spec(i, active)),
        Layout(active.other, preview_count, True),
    )


# --- states ---------------------------------------------------------------------------------------


def _steady(
    i: RolloutInput,
    active: Color,
    roll: RolloutStatus | None,
    events: list[tuple[str, str, str]] | None = None,
) -> Decision:
    """No rollout: the active colour runs the current spec at spec.replicas."""
    colour = i.colours.get(active, Colour())
    ready = colour.revision == i.revision and colour.rolled_out and colour.replicas == i.replicas
    if colour.revision is None:
        reason, message = Reason.CREATING, "creating the Deployment"
    elif colour.deadline_exceeded and not ready:
        reason, message = Reason.DEADLINE_EXCEEDED, f"revision {i.revision} did not become available in time"
    elif ready:
        reason, message = Reason.AVAILABLE, f"{colour.available}/{i.replicas} pods available at revision {i.revision}"
    else:
        reason = Reason.ROLLING_OUT
        message = f"rolling out revision {i.revision}: {colour.available}/{i.replicas} pods available"
    stable = i.revision if ready else i.status.active_revision
    return Decision(
        active_color=active,
        preview_color=active,
        deployments=(Layout(active, i.replicas, True), *_idle(i, active.other)),
        active_revision=stable,
        preview_revision=None,
        rollout=roll,
        reason=reason,
        message=message,
        ready=ready,
        degraded=reason == Reason.DEADLINE_EXCEEDED,
        events=events or [],
    )


def _start(i: RolloutInput, active: Color, retried_for: str | None) -> Decision:
    """A new rollout; the last retry request served is carried, so it is not served twice."""
    preview = active.other
    roll = RolloutStatus(
        step=Step.PREVIEW,
        preview_color=preview,
        started_at=rfc3339_micro(i.now),
        retried_for=retried_for,
        message=f"rolling out revision {i.revision} to {preview.value}; {active.value} keeps serving",
    )
    count = preview_replicas(i.rollout, i.replicas)
    return Decision(
        active_color=active,
        preview_color=preview,
        deployments=_during_rollout(i, active, count),
        active_revision=i.status.active_revision,
        preview_revision=i.revision,
        rollout=roll,
        reason=Reason.PREVIEW_PROGRESSING,
        message=f"starting preview of revision {i.revision} on {preview.value}: 0/{count} pods ready",
        events=[("Normal", "RolloutStarted", roll.message or "")],
        requeue_after=float(i.rollout.progress_deadline_seconds),
    )


def _in_rollout(i: RolloutInput, active: Color, roll: RolloutStatus, **changes: Any) -> Decision:
    """A decision that keeps both colours up with traffic on the stable one."""
    base = Decision(
        active_color=active,
        preview_color=active.other,
        deployments=_during_rollout(i, active, preview_replicas(i.rollout, i.replicas)),
        active_revision=i.status.active_revision,
        preview_revision=i.revision,
        rollout=roll,
        reason=Reason.PREVIEW_PROGRESSING,
        message="",
    )
    return replace(base, **changes)


def _waiting(i: RolloutInput, active: Color, roll: RolloutStatus, until: datetime, reason: str, doing: str) -> Decision:
    """Waiting for a timer. The message names the moment, not the seconds left, so it stays the
    same across reconciles and costs no status write."""
    return _in_rollout(
        i,
        active,
        roll,
        reason=reason,
        message=f"{doing} at {rfc3339(until)}",
        requeue_after=_seconds_until(until, i.now),
    )


def _deadline(i: RolloutInput, roll: RolloutStatus) -> datetime:
    started = parse(roll.started_at) or i.now
    return started + timedelta(seconds=i.rollout.progress_deadline_seconds)


def _preview_check(i: RolloutInput, active: Color, count: int) -> Check:
    """Ready pods of the preview colour at the new revision, and in the preview Service's endpoints."""
    colour = i.colours.get(active.other, Colour())
    healthy = colour.revision == i.revision and colour.rolled_out and colour.replicas == count
    endpoints = min(i.preview_endpoints, count)
    message = (
        f"{min(colour.available, count)}/{count} pods ready, {endpoints}/{count} in the preview Service's endpoints"
    )
    if colour.revision is not None and colour.replicas != count:
        message += f" (scaling from {colour.replicas})"
    passed = healthy and i.preview_endpoints >= count
    return Check(CheckName.ENDPOINTS, AnalysisResult.PASSED if passed else AnalysisResult.PENDING, message)


def _preview(i: RolloutInput, active: Color, roll: RolloutStatus) -> Decision:
    deadline = _deadline(i, roll)
    if i.now >= deadline or i.colours.get(active.other, Colour()).deadline_exceeded:
        return _abort(i, active, roll, AbortReason.PROGRESS_DEADLINE_EXCEEDED, _deadline_message(i))
    count = preview_replicas(i.rollout, i.replicas)
    check = _preview_check(i, active, count)
    if check.result != AnalysisResult.PASSED:
        return _in_rollout(
            i,
            active,
            roll,
            message=f"preview of revision {i.revision} on {active.other.value}: {check.message}",
            requeue_after=_seconds_until(deadline, i.now),
        )
    now = rfc3339_micro(i.now)
    analysis = [check.as_status(now)] + [
        Check(name, AnalysisResult.PENDING).as_status(now) for name in http_check_names(i.rollout)
    ]
    window = i.rollout.analysis.window_seconds
    roll = roll.model_copy(update={"step": Step.ANALYSIS, "preview_ready_at": now, "analysis": analysis})
    return _in_rollout(
        i,
        active,
        roll,
        reason=Reason.ANALYSING,
        message=f"preview of revision {i.revision} is ready; analysing it for {window} s",
        requeue_after=float(window),
    )


def http_check_names(rollout: RolloutSpec) -> list[CheckName]:
    """The checks the controller measures over HTTP, for this rollout's settings. tokensPerRequest
    compares the preview with the stable colour, so only the analysis before promotion has it."""
    names = [CheckName.READYZ, CheckName.ERROR_RATE, CheckName.LATENCY]
    if rollout.analysis.max_tokens_per_request_ratio is not None:
        names.append(CheckName.TOKENS_PER_REQUEST)
    if rollout.analysis.smoke is not None:
        names.append(CheckName.SMOKE)
    return names


def requested_checks(rollout: RolloutSpec) -> frozenset[CheckName]:
    """The checks the spec asks for, which must pass: the endpoints check always, and the smoke call
    when spec.rollout.analysis.smoke names one. The runtime's checks (readyz, errorRate, latency,
    and tokensPerRequest when its ratio is set) run on every rollout unasked; where they cannot run
    (an operator outside the cluster, which cannot reach pod addresses) they come back Skipped and
    the endpoints check decides alone."""
    if rollout.analysis.smoke is not None:
        return frozenset({CheckName.ENDPOINTS, CheckName.SMOKE})
    return frozenset({CheckName.ENDPOINTS})


Verdict = Literal["passed", "failed", "not_run"]


def _judge(i: RolloutInput, first: Check) -> tuple[list[Check], Verdict]:
    """The checks measured for this decision, and their verdict. A Skipped check that the spec asked
    for (or one it asked for that was not measured at all), or a Pending one (no answer from the
    pods), is no pass: the verdict is "not_run", and the step measures again until its deadline. A
    Skipped check it did not ask for is fine."""
    checks = [first, *(i.checks or [])]
    measured = {c.name for c in checks}
    requested = requested_checks(i.rollout)
    checks += [Check(name, AnalysisResult.SKIPPED, "not measured") for name in sorted(requested - measured)]
    if any(c.result == AnalysisResult.FAILED for c in checks):
        return checks, "failed"
    if _not_run(checks, requested):
        return checks, "not_run"
    return checks, "passed"


def _not_run(checks: Sequence[Check | AnalysisCheck], requested: frozenset[CheckName]) -> list[str]:
    """The checks without a result (Pending, or Skipped though requested), each named with what it said."""
    return [
        f"{c.name}: {c.result}" + (f" ({c.message})" if c.message else "")
        for c in checks
        if c.result != AnalysisResult.PASSED
        and c.result != AnalysisResult.FAILED
        and (c.result != AnalysisResult.SKIPPED or c.name in requested)
    ]


def _counted(roll: RolloutStatus, checks: Sequence[Check]) -> RolloutStatus:
    """The status with this measurement counted: one more in a row with a check a pod did not
    answer (Pending), or the count cleared."""
    unanswered = any(c.result == AnalysisResult.PENDING for c in checks)
    count = (roll.unanswered_measurements or 0) + 1 if unanswered else None
    return roll if count == roll.unanswered_measurements else roll.model_copy(update={"unanswered_measurements": count})


def _unanswered(checks: Sequence[Check]) -> str:
    """The checks a pod did not answer (Pending), each named with what it said; empty when none."""
    return "; ".join(f"{c.name}: {c.message}" for c in checks if c.result == AnalysisResult.PENDING)


def _unanswered_too_often(roll: RolloutStatus, checks: Sequence[Check]) -> str | None:
    """What to fail with when pods went unanswered in more measurements in a row than are waited out."""
    count = roll.unanswered_measurements or 0
    if count <= MAX_UNANSWERED_MEASUREMENTS:
        return None
    return (
        f"no answer in {count} measurements in a row ({MAX_UNANSWERED_MEASUREMENTS} are waited out): "
        f"{_unanswered(checks)}"
    )


def _failed(checks: Sequence[Check]) -> str:
    return "; ".join(f"{c.name}: {c.message}" for c in checks if c.result == AnalysisResult.FAILED)


def _waiting_clock(i: RolloutInput, roll: RolloutStatus) -> tuple[RolloutStatus, datetime]:
    """The status with the step's wait recorded (``waitingSince``, from the first call that could
    not pass), and the moment the wait runs out: spec.rollout.progressDeadlineSeconds later."""
    if roll.waiting_since is None:
        roll = roll.model_copy(update={"waiting_since": rfc3339_micro(i.now)})
    since = parse(roll.waiting_since) or i.now
    return roll, since + timedelta(seconds=i.rollout.progress_deadline_seconds)


def _done_waiting(roll: RolloutStatus) -> RolloutStatus:
    return roll if roll.waiting_since is None else roll.model_copy(update={"waiting_since": None})


def _wait_for_preview(
    i: RolloutInput, active: Color, roll: RolloutStatus, check: Check, reason: str, doing: str
) -> Decision:
    """The preview is short of ready pods in its Service's endpoints after it was ready once: the
    HPA changed spec.replicas (the preview is being scaled to the new count), or a pod is gone for
    a moment (evicted in a node drain). This is what Argo Rollouts does: a scale during a rollout
    is no failure, the preview is scaled and the rollout waits for it; only readiness missing for
    longer than the progress deadline aborts."""
    roll, until = _waiting_clock(i, roll)
    if i.now >= until:
        failed = replace(check, result=AnalysisResult.FAILED).as_status(rfc3339_micro(i.now))
        roll = roll.model_copy(update={"analysis": [failed, *roll.analysis[1:]]})  # endpoints is the first check
        return _abort(
            i,
            active,
            roll,
            AbortReason.PROGRESS_DEADLINE_EXCEEDED,
            f"the preview of revision {i.revision} was not ready for {i.rollout.progress_deadline_seconds} s "
            f"(spec.rollout.progressDeadlineSeconds): {check.message}",
        )
    return _in_rollout(
        i,
        active,
        roll,
        reason=reason,
        message=f"{doing}; waiting for the preview: {check.message}; aborted at {rfc3339(until)} unless it is ready",
        requeue_after=_seconds_until(until, i.now),
    )


def _analysis(i: RolloutInput, active: Color, roll: RolloutStatus) -> Decision:
    deadline = _deadline(i, roll)
    if i.now >= deadline and roll.waiting_since is None:
        return _analysis_deadline(i, active, roll)
    ready_at = parse(roll.preview_ready_at) or i.now
    window_end = ready_at + timedelta(seconds=i.rollout.analysis.window_seconds)
    if i.now < window_end:
        return _waiting(i, active, roll, window_end, Reason.ANALYSING, f"analysing revision {i.revision}")
    endpoints = _preview_check(i, active, preview_replicas(i.rollout, i.replicas))
    if endpoints.result != AnalysisResult.PASSED:
        return _wait_for_preview(i, active, roll, endpoints, Reason.ANALYSING, f"analysis of revision {i.revision}")
    roll = _done_waiting(roll)
    if i.checks is None:
        return _in_rollout(i, active, roll, reason=Reason.ANALYSING, message="measuring", measure="preview")
    checks, verdict = _judge(i, endpoints)
    roll = _counted(roll.model_copy(update={"analysis": [c.as_status(rfc3339_micro(i.now)) for c in checks]}), checks)
    if verdict == "failed":
        return _abort(
            i,
            active,
            roll,
            AbortReason.ANALYSIS_FAILED,
            f"analysis of revision {i.revision} failed: {_failed(checks)}",
        )
    if verdict == "not_run":
        if unanswered := _unanswered_too_often(roll, checks):
            return _abort(
                i, active, roll, AbortReason.ANALYSIS_FAILED, f"analysis of revision {i.revision} failed: {unanswered}"
            )
        if i.now >= deadline:
            return _analysis_deadline(i, active, roll)
        return _in_rollout(
            i,
            active,
            roll,
            reason=Reason.ANALYSING,
            message=(
                f"analysis of revision {i.revision} cannot pass yet, a check has no result: "
                f"{'; '.join(_not_run(checks, requested_checks(i.rollout)))}; measuring again until {rfc3339(deadline)}"
            ),
            requeue_after=min(REMEASURE_SECONDS, _seconds_until(deadline, i.now)),
        )
    return _awaiting(i, active, roll.model_copy(update={"step": Step.AWAITING_PROMOTION}))


def _analysis_deadline(i: RolloutInput, active: Color, roll: RolloutStatus) -> Decision:
    """The analysis did not pass by the progress deadline. When a check had no result (a requested
    one Skipped, or one whose pods never answered), that is an analysis failure, and the message
    names it."""
    not_run = _not_run(roll.analysis, requested_checks(i.rollout))
    if not_run:
        message = (
            f"analysis of revision {i.revision} failed: a check had no result "
            f"by the deadline ({i.rollout.progress_deadline_seconds} s): {'; '.join(not_run)}"
        )
        return _abort(i, active, roll, AbortReason.ANALYSIS_FAILED, message)
    return _abort(i, active, roll, AbortReason.PROGRESS_DEADLINE_EXCEEDED, _deadline_message(i))


def _awaiting(i: RolloutInput, active: Color, roll: RolloutStatus) -> Decision:
    count = preview_replicas(i.rollout, i.replicas)
    check = _preview_check(i, active, count)
    if check.result != AnalysisResult.PASSED:
        return _wait_for_preview(
            i, active, roll, check, Reason.PREVIEW_PROGRESSING, f"analysis of revision {i.revision} passed"
        )
    roll = _done_waiting(roll)
    if i.rollout.promotion == PromotionMode.MANUAL:
        if i.rollout.promote == i.revision:
            return _promoting(i, active, roll)
        return _in_rollout(
            i,
            active,
            roll,
            reason=Reason.AWAITING_PROMOTION,
            message=(
                f"analysis passed; approve revision {i.revision} with `kubectl ea promote NAME` "
                f"or spec.rollout.promote: {i.revision!r}"
            ),
            paused=True,
        )
    ready_at = parse(roll.preview_ready_at) or i.now
    promote_at = ready_at + timedelta(seconds=i.rollout.analysis.window_seconds + i.rollout.auto_promotion_seconds)
    if i.now < promote_at:
        return _waiting(i, active, roll, promote_at, Reason.AWAITING_PROMOTION, "analysis passed; promoting")
    return _promoting(i, active, roll)


def _promoting(i: RolloutInput, active: Color, roll: RolloutStatus) -> Decision:
    """Scale the preview to spec.replicas and wait until every pod is in its endpoints, then switch.
    spec.replicas may change meanwhile (the HPA): the preview follows it and the wait goes on, as in
    Argo Rollouts; only a wait longer than the progress deadline aborts (traffic never moved)."""
    colour = i.colours.get(active.other, Colour())
    full = colour.revision == i.revision and colour.rolled_out and colour.replicas == i.replicas
    if not full or i.preview_endpoints < i.replicas:
        roll, until = _waiting_clock(i, roll.model_copy(update={"step": Step.PROMOTING}))
        counts = f"{colour.available} available, {min(i.preview_endpoints, i.replicas)} in endpoints"
        if i.now >= until:
            return _abort(
                i,
                active,
                roll,
                AbortReason.PROGRESS_DEADLINE_EXCEEDED,
                f"the preview of revision {i.revision} did not reach {i.replicas} ready pods within "
                f"{i.rollout.progress_deadline_seconds} s (spec.rollout.progressDeadlineSeconds): {counts}",
            )
        return _in_rollout(
            i,
            active,
            roll,
            deployments=_during_rollout(i, active, i.replicas),
            reason=Reason.PROMOTING,
            message=f"scaling the preview to {i.replicas} before switching traffic: {counts}",
            requeue_after=_seconds_until(until, i.now),
        )
    return _promote(i, active, _done_waiting(roll))


def _promote(i: RolloutInput, active: Color, roll: RolloutStatus) -> Decision:
    new = active.other
    started = parse(roll.started_at)
    delay = i.rollout.scale_down_delay_seconds
    message = (
        f"traffic switched to {new.value} (revision {i.revision}); "
        f"{active.value} is kept for {delay} s for a fast rollback"
    )
    roll = roll.model_copy(
        update={
            "step": Step.POST_PROMOTION,
            "promoted_at": rfc3339_micro(i.now),
            "previous_revision": i.status.active_revision,
            "waiting_since": None,
            "message": message,
        }
    )
    return Decision(
        active_color=new,
        preview_color=new,
        deployments=(Layout(new, i.replicas, True), Layout(active, i.replicas, _colour_from_spec(i, active))),
        active_revision=i.revision,
        preview_revision=None,
        rollout=roll,
        reason=Reason.PROMOTED,
        message=message,
        requeue_after=float(delay),
        promotion_seconds=(i.now - started).total_seconds() if started else None,
    )


def _post_promotion(i: RolloutInput, active: Color, roll: RolloutStatus) -> Decision:
    """Traffic is on the new colour; the old one is kept until the scale-down delay has passed.
    Then the new colour is checked. Both colours follow spec.replicas meanwhile; a new colour short
    of ready pods (a scale in progress, an evicted pod, endpoints still following the selector
    switch) is waited for, as Argo Rollouts does, and only a wait longer than the progress deadline
    (or a failed check) switches traffic back."""
    old = active.other
    promoted = i.status.active_revision
    previous = roll.previous_revision
    if i.revision == previous and previous is not None:
        return _switch_back(i, active, roll, None, f"spec went back to revision {previous}: traffic switched back")
    if i.revision != promoted:
        return _start(i, active, None)  # a newer revision supersedes; the old colour becomes its preview
    if _abort_request(i) == promoted:
        return _switch_back(i, active, roll, AbortReason.ABORTED, "aborted on request; traffic switched back")
    promoted_at = parse(roll.promoted_at) or i.now
    scale_down_at = promoted_at + timedelta(seconds=i.rollout.scale_down_delay_seconds)
    keep = Decision(
        active_color=active,
        preview_color=active,
        deployments=(Layout(active, i.replicas, True), Layout(old, i.replicas, _colour_from_spec(i, old))),
        active_revision=promoted,
        preview_revision=None,
        rollout=roll,
        reason=Reason.PROMOTED,
        message=roll.message or f"traffic on {active.value}",
    )
    if i.now < scale_down_at:
        return replace(keep, requeue_after=_seconds_until(scale_down_at, i.now))
    colour = i.colours.get(active, Colour())
    healthy = colour.rolled_out and colour.replicas == i.replicas and i.active_endpoints >= i.replicas
    endpoints = Check(
        CheckName.ENDPOINTS,
        AnalysisResult.PASSED if healthy else AnalysisResult.FAILED,
        f"{colour.available}/{i.replicas} pods ready, {min(i.active_endpoints, i.replicas)}/{i.replicas} "
        "in the active Service's endpoints",
    )
    now = rfc3339_micro(i.now)
    deadline = f"{i.rollout.progress_deadline_seconds} s (spec.rollout.progressDeadlineSeconds)"
    if not healthy:
        waiting, until = _waiting_clock(i, roll)
        if i.now < until:
            return replace(
                keep,
                rollout=waiting,
                message=(
                    f"post-promotion check: waiting for {active.value} to be ready: {endpoints.message}; "
                    f"traffic switches back at {rfc3339(until)} unless it is"
                ),
                requeue_after=_seconds_until(until, i.now),
            )
        roll = waiting.model_copy(update={"analysis": [endpoints.as_status(now)]})
        return _switch_back(
            i,
            active,
            roll,
            AbortReason.ANALYSIS_FAILED,
            f"post-promotion check failed: endpoints: {endpoints.message} for {deadline}",
        )
    if i.checks is None:
        return replace(keep, message="post-promotion check: measuring", measure="active")
    checks, verdict = _judge(i, endpoints)
    roll = roll.model_copy(update={"analysis": [c.as_status(now) for c in checks]})
    if verdict == "failed":
        return _switch_back(
            i, active, roll, AbortReason.ANALYSIS_FAILED, f"post-promotion check failed: {_failed(checks)}"
        )
    if unanswered := _unanswered(checks):
        # These pods answered the analysis before promotion, so the path to them was programmed
        # then: no answer now is theirs (a crash, a hang), not the network's lag. Traffic goes back.
        message = f"post-promotion check failed: no answer from pods that answered the analysis: {unanswered}"
        return _switch_back(i, active, roll, AbortReason.ANALYSIS_FAILED, message)
    if verdict == "not_run":
        not_run = "; ".join(_not_run(checks, requested_checks(i.rollout)))
        waiting, until = _waiting_clock(i, roll)
        if i.now < until:
            return replace(
                keep,
                rollout=waiting,
                message=(
                    f"post-promotion check cannot pass yet, a check has no result: {not_run}; "
                    f"measuring again until {rfc3339(until)}"
                ),
                requeue_after=min(REMEASURE_SECONDS, _seconds_until(until, i.now)),
            )
        return _switch_back(
            i,
            active,
            waiting,
            AbortReason.ANALYSIS_FAILED,
            f"post-promotion check failed: a check had no result in {deadline}: {not_run}",
        )
    message = f"revision {promoted} promoted; {old.value} scaled down"
    roll = roll.model_copy(update={"step": Step.COMPLETED, "message": message, "waiting_since": None})
    done = _steady(i, active, roll)
    done.events.append(("Normal", Reason.ROLLOUT_COMPLETED, message))
    done.outcome = "promoted"
    return done


def _switch_back(
    i: RolloutInput, active: Color, roll: RolloutStatus, reason: AbortReason | None, message: str
) -> Decision:
    """Inside the scale-down window: traffic returns to the old colour, still running."""
    old = active.other
    previous = roll.previous_revision
    promoted = i.status.active_revision
    back = i.status.model_copy(update={"active_color": old, "active_revision": previous})
    if reason is None:  # the spec itself went back: a plain rollback, nothing failed
        roll = roll.model_copy(update={"step": Step.COMPLETED, "message": message, "waiting_since": None})
        decision = _steady(replace(i, status=back), old, roll)
        decision.events.append(("Warning", Reason.ROLLED_BACK, message))
        decision.outcome = "rolled_back"
        return decision
    roll = roll.model_copy(
        update={"step": Step.ABORTED, "abort_reason": reason, "message": message, "waiting_since": None}
    )
    return Decision(
        active_color=old,
        preview_color=old,
        deployments=(Layout(old, i.replicas, _colour_from_spec(i, old)), Layout(active, 0, True)),
        active_revision=previous,
        preview_revision=promoted,
        rollout=roll,
        reason=reason,
        message=message,
        degraded=True,
        outcome="aborted" if reason == AbortReason.ABORTED else "analysis_failed",
    )


_OUTCOMES: dict[AbortReason, Outcome] = {
    AbortReason.ABORTED: "aborted",
    AbortReason.ANALYSIS_FAILED: "analysis_failed",
    AbortReason.PROGRESS_DEADLINE_EXCEEDED: "deadline_exceeded",
}


def _abort(i: RolloutInput, active: Color, roll: RolloutStatus, reason: AbortReason, message: str) -> Decision:
    """Before promotion: traffic never left the stable colour; the preview is scaled down. (The
    status model cuts a message longer than the CRD allows.)"""
    roll = roll.model_copy(
        update={"step": Step.ABORTED, "abort_reason": reason, "message": message, "waiting_since": None}
    )
    return replace(_aborted(i, active, roll), outcome=_OUTCOMES[reason])


def _aborted(i: RolloutInput, active: Color, roll: RolloutStatus) -> Decision:
    reason = roll.abort_reason or AbortReason.ABORTED
    return Decision(
        active_color=active,
        preview_color=active,
        deployments=_during_rollout(i, active, 0),
        active_revision=i.status.active_revision,
        preview_revision=i.revision,
        rollout=roll,
        reason=reason.value,
        message=(roll.message or "rollout aborted") + f"; `kubectl ea retry NAME` tries revision {i.revision} again",
        degraded=True,
    )


def _deadline_message(i: RolloutInput) -> str:
    return (
        f"revision {i.revision} was not ready and analysed within "
        f"spec.rollout.progressDeadlineSeconds ({i.rollout.progress_deadline_seconds} s)"
    )


def same_course(first: Decision, second: Decision) -> bool:
    """Whether two decisions take the same step and differ at most in what the status says."""

    def course(d: Decision) -> tuple[Any, ...]:
        return (d.rollout, d.active_color, d.preview_color, d.active_revision, d.preview_revision, d.deployments)

    return course(first) == course(second) and (first.outcome, first.events) == (second.outcome, second.events)
