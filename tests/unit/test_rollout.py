"""Every transition of the blue-green state machine, as a table: observed state in, step out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent_operator.rollout import Check, Colour, Decision, Layout, RolloutInput, decide
from agent_operator.spec import AnalysisResult, CheckName, Color, EnterpriseAgentStatus, RolloutSpec, Step
from agent_operator.timefmt import rfc3339

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OLD, NEW, NEWER = "aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc"
BLUE, GREEN = Color.BLUE, Color.GREEN
PASS = [Check(CheckName.READYZ, AnalysisResult.PASSED), Check(CheckName.ERROR_RATE, AnalysisResult.PASSED)]
FAIL = [
    Check(CheckName.READYZ, AnalysisResult.PASSED),
    Check(CheckName.ERROR_RATE, AnalysisResult.FAILED, "20% of 50 failed"),
]
SKIP = [Check(CheckName.READYZ, AnalysisResult.SKIPPED, "outside the cluster")]


def at(seconds: float) -> str:
    return rfc3339(T0 + timedelta(seconds=seconds))


def up(revision: str, replicas: int = 3) -> Colour:
    return Colour(revision, replicas, replicas, rolled_out=True)


def starting(revision: str, replicas: int = 3, available: int = 0) -> Colour:
    return Colour(revision, replicas, available, rolled_out=False)


def steady(revision: str = OLD, color: Color = BLUE) -> dict[str, Any]:
    return {"activeColor": color.value, "activeRevision": revision}


def rolling(step: Step, **fields: Any) -> dict[str, Any]:
    """Status mid-rollout of NEW onto green, started at T0, preview ready at T0+10."""
    roll = {"step": step.value, "previewColor": "green", "startedAt": at(0), "previewReadyAt": at(10), **fields}
    return {**steady(), "previewRevision": NEW, "rollout": roll}


def promoted(**fields: Any) -> dict[str, Any]:
    """Status after NEW was promoted to green at T0+60; blue (OLD) is in its scale-down window."""
    roll = {
        "step": "PostPromotion",
        "previewColor": "green",
        "startedAt": at(0),
        "promotedAt": at(60),
        "previousRevision": OLD,
        **fields,
    }
    return {"activeColor": "green", "activeRevision": NEW, "rollout": roll}


@dataclass
class Case:
    name: str
    status: dict[str, Any]
    colours: dict[Color, Colour]
    now: float = 0  # seconds after T0
    revision: str = NEW
    spec: dict[str, Any] = field(default_factory=dict)  # spec.rollout fields
    preview_endpoints: int = 0
    active_endpoints: int = 3
    abort: str | None = None
    retry: str | None = None
    checks: list[Check] | None = None
    # expected
    step: str | None = None
    active: Color = BLUE
    preview: Color | None = None  # the preview Service's colour; defaults to `active`
    layouts: tuple[tuple[Color, int, bool], ...] | None = None
    reason: str | None = None
    ready: bool = False
    degraded: bool = False
    paused: bool = False
    measure: str | None = None
    outcome: str | None = None
    active_revision: str | None = OLD
    requeue: float | None = None

    def run(self) -> Decision:
        return decide(
            RolloutInput(
                revision=self.revision,
                replicas=3,
                rollout=RolloutSpec.model_validate({"analysis": {"windowSeconds": 30}, **self.spec}),
                status=EnterpriseAgentStatus.model_validate(self.status),
                colours=self.colours,
                preview_endpoints=self.preview_endpoints,
                active_endpoints=self.active_endpoints,
                now=T0 + timedelta(seconds=self.now),
                abort_requested=self.abort,
                retry_requested=self.retry,
                checks=self.checks,
            )
        )


CASES = [
    # --- no rollout ---
    Case("a new agent is created in place", {}, {}, step=None, layouts=((BLUE, 3, True),), reason="Creating",
         active_revision=None),
    Case("the first revision becomes ready in place", {}, {BLUE: up(NEW)}, reason="Available", ready=True,
         active_revision=NEW),
    Case("a replicas-only change scales the active colour, no rollout", steady(NEW), {BLUE: up(NEW, 2)},
         layouts=((BLUE, 3, True),), reason="RollingOut", active_revision=NEW),
    Case("the idle colour is kept at zero from its own spec", steady(NEW), {BLUE: up(NEW), GREEN: up(OLD, 0)},
         layouts=((BLUE, 3, True), (GREEN, 0, False)), reason="Available", ready=True, active_revision=NEW),
    # --- start ---
    Case("a new revision starts a preview on the other colour", steady(), {BLUE: up(OLD)}, step="Preview",
         preview=GREEN, layouts=((BLUE, 3, False), (GREEN, 3, True)), reason="PreviewProgressing", requeue=600),
    Case("previewReplicas sizes the preview", steady(), {BLUE: up(OLD)}, spec={"previewReplicas": 1},
         step="Preview", preview=GREEN, layouts=((BLUE, 3, False), (GREEN, 1, True))),
    # --- preview ---
    Case("preview pods not ready yet: wait, until the deadline", rolling(Step.PREVIEW),
         {BLUE: up(OLD), GREEN: starting(NEW, available=1)}, now=5, step="Preview", preview=GREEN, requeue=595),
    Case("ready pods that are not in the preview endpoints do not count", rolling(Step.PREVIEW),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=5, preview_endpoints=2, step="Preview", preview=GREEN),
    Case("ready and in the endpoints: analysis starts", rolling(Step.PREVIEW), {BLUE: up(OLD), GREEN: up(NEW)},
         now=5, preview_endpoints=3, step="Analysis", preview=GREEN, reason="Analysing", requeue=30),
    Case("progress deadline passed: aborted, preview scaled down", rolling(Step.PREVIEW),
         {BLUE: up(OLD), GREEN: starting(NEW)}, now=600, step="Aborted", layouts=((BLUE, 3, False), (GREEN, 0, True)),
         reason="ProgressDeadlineExceeded", degraded=True, outcome="deadline_exceeded"),
    Case("the preview Deployment's own deadline also aborts", rolling(Step.PREVIEW),
         {BLUE: up(OLD), GREEN: Colour(NEW, 3, 0, deadline_exceeded=True)}, now=100, step="Aborted",
         reason="ProgressDeadlineExceeded", degraded=True, outcome="deadline_exceeded"),
    Case("abort requested during the preview", rolling(Step.PREVIEW), {BLUE: up(OLD), GREEN: starting(NEW)},
         abort=NEW, step="Aborted", reason="Aborted", degraded=True, outcome="aborted",
         layouts=((BLUE, 3, False), (GREEN, 0, True))),
    Case("an abort request for another revision is ignored", rolling(Step.PREVIEW),
         {BLUE: up(OLD), GREEN: starting(NEW)}, abort=OLD, step="Preview", preview=GREEN),
    # --- analysis ---
    Case("analysis window still running", rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)}, now=20,
         preview_endpoints=3, step="Analysis", preview=GREEN, reason="Analysing", requeue=20),
    Case("window over: the decision asks for measurements", rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)},
         now=40, preview_endpoints=3, step="Analysis", preview=GREEN, measure="preview"),
    Case("checks pass, Auto: promoted, traffic switched", rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)},
         now=40, preview_endpoints=3, checks=PASS, step="PostPromotion", active=GREEN, reason="Promoted",
         layouts=((GREEN, 3, True), (BLUE, 3, False)), active_revision=NEW, requeue=30),
    Case("skipped checks do not fail a rollout", rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)},
         now=40, preview_endpoints=3, checks=SKIP, step="PostPromotion", active=GREEN, active_revision=NEW),
    Case("checks pass, Manual: waits for approval (Paused)", rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)},
         now=40, preview_endpoints=3, checks=PASS, spec={"promotion": "Manual"}, step="AwaitingPromotion",
         preview=GREEN, reason="AwaitingPromotion", paused=True),
    Case("an approval already in the spec promotes as soon as analysis passes", rolling(Step.ANALYSIS),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=40, preview_endpoints=3, checks=PASS,
         spec={"promotion": "Manual", "promote": NEW}, step="PostPromotion", active=GREEN, active_revision=NEW),
    Case("a failed check aborts; traffic never left blue", rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)},
         now=40, preview_endpoints=3, checks=FAIL, step="Aborted", reason="AnalysisFailed", degraded=True,
         outcome="analysis_failed", layouts=((BLUE, 3, False), (GREEN, 0, True))),
    Case("preview pods that left the endpoints fail the analysis without measuring", rolling(Step.ANALYSIS),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=40, preview_endpoints=1, step="Aborted", reason="AnalysisFailed",
         degraded=True, outcome="analysis_failed"),
    Case("the deadline also covers the analysis", rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)},
         now=601, preview_endpoints=3, step="Aborted", reason="ProgressDeadlineExceeded", degraded=True,
         outcome="deadline_exceeded"),
    # --- awaiting promotion ---
    Case("Auto with autoPromotionSeconds waits", rolling(Step.AWAITING_PROMOTION), {BLUE: up(OLD), GREEN: up(NEW)},
         now=45, preview_endpoints=3, spec={"autoPromotionSeconds": 60}, step="AwaitingPromotion", preview=GREEN,
         requeue=55),
    Case("Auto promotes when autoPromotionSeconds have passed", rolling(Step.AWAITING_PROMOTION),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=100, preview_endpoints=3, spec={"autoPromotionSeconds": 60},
         step="PostPromotion", active=GREEN, active_revision=NEW),
    Case("Manual waits past the deadline: approval time does not count", rolling(Step.AWAITING_PROMOTION),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=5000, preview_endpoints=3, spec={"promotion": "Manual"},
         step="AwaitingPromotion", preview=GREEN, paused=True),
    Case("Manual approval in the spec promotes", rolling(Step.AWAITING_PROMOTION), {BLUE: up(OLD), GREEN: up(NEW)},
         now=50, preview_endpoints=3, spec={"promotion": "Manual", "promote": NEW}, step="PostPromotion",
         active=GREEN, active_revision=NEW),
    Case("an approval of another revision does not promote", rolling(Step.AWAITING_PROMOTION),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=50, preview_endpoints=3, spec={"promotion": "Manual", "promote": OLD},
         step="AwaitingPromotion", preview=GREEN, paused=True),
    Case("a preview that lost readiness while waiting is aborted", rolling(Step.AWAITING_PROMOTION),
         {BLUE: up(OLD), GREEN: starting(NEW, available=2)}, now=50, preview_endpoints=2,
         spec={"promotion": "Manual"}, step="Aborted", reason="AnalysisFailed", degraded=True,
         outcome="analysis_failed"),
    Case("a smaller preview is scaled up before traffic moves", rolling(Step.AWAITING_PROMOTION),
         {BLUE: up(OLD), GREEN: up(NEW, 1)}, now=50, preview_endpoints=1, spec={"previewReplicas": 1},
         step="Promoting", preview=GREEN, layouts=((BLUE, 3, False), (GREEN, 3, True)), reason="Promoting"),
    Case("promoting waits for every pod in the endpoints", rolling(Step.PROMOTING), {BLUE: up(OLD), GREEN: up(NEW)},
         now=60, preview_endpoints=2, spec={"previewReplicas": 1}, step="Promoting", preview=GREEN),
    Case("promoting switches once all are in", rolling(Step.PROMOTING), {BLUE: up(OLD), GREEN: up(NEW)}, now=60,
         preview_endpoints=3, spec={"previewReplicas": 1}, step="PostPromotion", active=GREEN, active_revision=NEW),
    # --- after promotion ---
    Case("inside the scale-down window both colours stay", promoted(), {GREEN: up(NEW), BLUE: up(OLD)}, now=70,
         step="PostPromotion", active=GREEN, layouts=((GREEN, 3, True), (BLUE, 3, False)), active_revision=NEW,
         requeue=20),
    Case("window over: the post-promotion check is measured", promoted(), {GREEN: up(NEW), BLUE: up(OLD)}, now=95,
         step="PostPromotion", active=GREEN, measure="active", active_revision=NEW),
    Case("check passed: the old colour is scaled down", promoted(), {GREEN: up(NEW), BLUE: up(OLD)}, now=95,
         checks=PASS, step="Completed", active=GREEN, layouts=((GREEN, 3, True), (BLUE, 0, False)),
         reason="Available", ready=True, outcome="promoted", active_revision=NEW),
    Case("check failed: traffic switches back inside the window", promoted(), {GREEN: up(NEW), BLUE: up(OLD)},
         now=95, checks=FAIL, step="Aborted", active=BLUE, layouts=((BLUE, 3, False), (GREEN, 0, True)),
         reason="AnalysisFailed", degraded=True, outcome="analysis_failed"),
    Case("right after the switch, the check waits for the active endpoints to follow", promoted(),
         {GREEN: up(NEW), BLUE: up(OLD)}, now=95, active_endpoints=1, step="PostPromotion", active=GREEN,
         layouts=((GREEN, 3, True), (BLUE, 3, False)), active_revision=NEW, requeue=1),
    Case("new pods still missing from the active endpoints fail the check", promoted(), {GREEN: up(NEW), BLUE: up(OLD)},
         now=121, active_endpoints=1, step="Aborted", active=BLUE, reason="AnalysisFailed", degraded=True,
         outcome="analysis_failed"),
    Case("abort inside the window switches traffic back", promoted(), {GREEN: up(NEW), BLUE: up(OLD)}, now=70,
         abort=NEW, step="Aborted", active=BLUE, reason="Aborted", degraded=True, outcome="aborted"),
    Case("undo inside the window is an instant rollback", promoted(), {GREEN: up(NEW), BLUE: up(OLD)}, now=70,
         revision=OLD, step="Completed", active=BLUE, layouts=((BLUE, 3, True), (GREEN, 0, False)),
         reason="Available", ready=True, outcome="rolled_back"),
    Case("a newer revision supersedes: the old colour becomes its preview", promoted(),
         {GREEN: up(NEW), BLUE: up(OLD)}, now=70, revision=NEWER, step="Preview", active=GREEN, preview=BLUE,
         layouts=((GREEN, 3, False), (BLUE, 3, True)), active_revision=NEW),
    # --- aborted ---
    Case("aborted stays aborted while the spec is unchanged", rolling(Step.ABORTED, abortReason="AnalysisFailed"),
         {BLUE: up(OLD), GREEN: up(NEW, 0)}, now=900, step="Aborted", reason="AnalysisFailed", degraded=True,
         layouts=((BLUE, 3, False), (GREEN, 0, True))),
    Case("retry starts the same revision again", rolling(Step.ABORTED, abortReason="Aborted"),
         {BLUE: up(OLD), GREEN: up(NEW, 0)}, now=900, retry="t1", step="Preview", preview=GREEN),
    Case("a retry token already served does nothing", rolling(Step.ABORTED, abortReason="Aborted", retriedFor="t1"),
         {BLUE: up(OLD), GREEN: up(NEW, 0)}, now=900, retry="t1", step="Aborted", degraded=True),
    Case("a spec change after an abort starts a new rollout", rolling(Step.ABORTED, abortReason="Aborted"),
         {BLUE: up(OLD), GREEN: up(NEW, 0)}, now=900, revision=NEWER, step="Preview", preview=GREEN),
    # --- spec changes mid-rollout ---
    Case("spec back to the stable revision cancels the preview", rolling(Step.ANALYSIS),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=20, revision=OLD, step=None, layouts=((BLUE, 3, True), (GREEN, 0, False)),
         reason="Available", ready=True),
    Case("a newer revision restarts the preview", rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)}, now=20,
         revision=NEWER, step="Preview", preview=GREEN, layouts=((BLUE, 3, False), (GREEN, 3, True))),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_transition(case: Case) -> None:
    decision = case.run()
    assert (decision.rollout.step if decision.rollout else None) == case.step
    assert decision.active_color == case.active
    assert decision.preview_color == (case.preview or case.active)
    if case.layouts is not None:
        assert decision.deployments == tuple(Layout(*layout) for layout in case.layouts)
    if case.reason is not None:
        assert decision.reason == case.reason
    assert (decision.ready, decision.degraded, decision.paused) == (case.ready, case.degraded, case.paused)
    assert decision.measure == case.measure
    assert decision.outcome == case.outcome
    assert decision.active_revision == case.active_revision
    if case.requeue is not None:
        assert decision.requeue_after == pytest.approx(case.requeue)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_step_repeated_from_its_own_status_changes_nothing(case: Case) -> None:
    """Resuming after kill -9: feeding a decision's status back in (with the children it asked
    for) must not take a second, different step unless time or the cluster moved."""
    first = case.run()
    if first.measure is not None or first.outcome is not None or first.rollout is None:
        return  # a measurement or a final step is not a resting state
    step = first.rollout.step
    status = {
        **case.status,
        "activeColor": first.active_color.value,
        "activeRevision": first.active_revision,
        "previewRevision": first.preview_revision,
        "rollout": first.rollout.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    again = replace(case, status=status, checks=None).run()
    assert again.rollout is not None
    assert again.rollout.step == step
    assert again.active_color == first.active_color
    assert again.deployments == first.deployments


def test_analysis_results_are_recorded_in_status() -> None:
    case = next(c for c in CASES if c.name.startswith("a failed check aborts"))
    decision = case.run()
    assert decision.rollout is not None
    results = {a.name: a.result for a in decision.rollout.analysis}
    assert results == {"endpoints": "Passed", "readyz": "Passed", "errorRate": "Failed"}
    assert "20% of 50 failed" in decision.message


def test_promotion_duration_is_measured_from_the_start() -> None:
    case = next(c for c in CASES if c.name.startswith("checks pass, Auto"))
    assert case.run().promotion_seconds == pytest.approx(40)
