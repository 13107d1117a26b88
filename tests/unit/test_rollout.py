"""Every transition of the blue-green state machine, as a table: observed state in, step out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent_operator.rollout import Check, Colour, Decision, Layout, RolloutInput, decide
from agent_operator.spec import AnalysisResult, CheckName, Color, EnterpriseAgentStatus, RolloutSpec, Step
from agent_operator.timefmt import parse, rfc3339

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OLD, NEW, NEWER = "aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc"
BLUE, GREEN = Color.BLUE, Color.GREEN
PASS = [Check(CheckName.READYZ, AnalysisResult.PASSED), Check(CheckName.ERROR_RATE, AnalysisResult.PASSED)]
FAIL = [
    Check(CheckName.READYZ, AnalysisResult.PASSED),
    Check(CheckName.ERROR_RATE, AnalysisResult.FAILED, "20% of 50 failed"),
]
SKIP = [Check(CheckName.READYZ, AnalysisResult.SKIPPED, "outside the cluster")]
SMOKE = {"analysis": {"windowSeconds": 30, "smoke": {"operation": "ping"}}}
OIDC = "the agent takes OIDC tokens; the operator cannot sign one"
SMOKE_SKIPPED = [
    *PASS,
    Check(CheckName.LATENCY, AnalysisResult.PASSED),
    Check(CheckName.SMOKE, AnalysisResult.SKIPPED, OIDC),
]
UNREACHABLE = "unreachable: TimeoutError; measured again"
UNANSWERED = [
    Check(CheckName.READYZ, AnalysisResult.PENDING, UNREACHABLE),
    Check(CheckName.ERROR_RATE, AnalysisResult.PASSED),
]
SMOKE_PASSED = [*PASS, Check(CheckName.LATENCY, AnalysisResult.PASSED), Check(CheckName.SMOKE, AnalysisResult.PASSED)]


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
    replicas: int = 3  # spec.replicas (the HPA writes it through the agent's scale subresource)
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
    waiting_since: str | None = None  # status.rollout.waitingSince after the step

    def run(self) -> Decision:
        return decide(
            RolloutInput(
                revision=self.revision,
                replicas=self.replicas,
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
    Case("preview pods that left the endpoints at the window's end are waited for, not failed",
         rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)}, now=40, preview_endpoints=1, step="Analysis",
         preview=GREEN, reason="Analysing", requeue=600, waiting_since=at(40)),
    Case("a preview short of pods for longer than the progress deadline aborts the analysis",
         rolling(Step.ANALYSIS, waitingSince=at(40)), {BLUE: up(OLD), GREEN: up(NEW)}, now=640, preview_endpoints=1,
         step="Aborted", reason="ProgressDeadlineExceeded", degraded=True, outcome="deadline_exceeded",
         layouts=((BLUE, 3, False), (GREEN, 0, True))),
    Case("a preview that is ready again ends the wait: measured, even past the deadline from the start",
         rolling(Step.ANALYSIS, waitingSince=at(590)), {BLUE: up(OLD), GREEN: up(NEW)}, now=620,
         preview_endpoints=3, step="Analysis", preview=GREEN, measure="preview"),
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
    Case("a preview pod lost while waiting for approval (an eviction) is waited for", rolling(Step.AWAITING_PROMOTION),
         {BLUE: up(OLD), GREEN: starting(NEW, available=2)}, now=50, preview_endpoints=2,
         spec={"promotion": "Manual"}, step="AwaitingPromotion", preview=GREEN, reason="PreviewProgressing",
         layouts=((BLUE, 3, False), (GREEN, 3, True)), requeue=600, waiting_since=at(50)),
    Case("the wait goes on from when it began", rolling(Step.AWAITING_PROMOTION, waitingSince=at(50)),
         {BLUE: up(OLD), GREEN: starting(NEW, available=2)}, now=400, preview_endpoints=2,
         spec={"promotion": "Manual"}, step="AwaitingPromotion", preview=GREEN, requeue=250, waiting_since=at(50)),
    Case("a preview unready past the progress deadline while waiting for approval is aborted",
         rolling(Step.AWAITING_PROMOTION, waitingSince=at(50)), {BLUE: up(OLD), GREEN: starting(NEW, available=2)},
         now=650, preview_endpoints=2, spec={"promotion": "Manual"}, step="Aborted",
         reason="ProgressDeadlineExceeded", degraded=True, outcome="deadline_exceeded",
         layouts=((BLUE, 3, False), (GREEN, 0, True))),
    Case("a smaller preview is scaled up before traffic moves", rolling(Step.AWAITING_PROMOTION),
         {BLUE: up(OLD), GREEN: up(NEW, 1)}, now=50, preview_endpoints=1, spec={"previewReplicas": 1},
         step="Promoting", preview=GREEN, layouts=((BLUE, 3, False), (GREEN, 3, True)), reason="Promoting",
         waiting_since=at(50)),
    Case("promoting waits for every pod in the endpoints", rolling(Step.PROMOTING), {BLUE: up(OLD), GREEN: up(NEW)},
         now=60, preview_endpoints=2, spec={"previewReplicas": 1}, step="Promoting", preview=GREEN,
         waiting_since=at(60)),
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
         layouts=((GREEN, 3, True), (BLUE, 3, False)), active_revision=NEW, requeue=600, waiting_since=at(95)),
    Case("new pods missing from the active endpoints past the progress deadline fail the check",
         promoted(waitingSince=at(95)), {GREEN: up(NEW), BLUE: up(OLD)}, now=695, active_endpoints=1, step="Aborted",
         active=BLUE, reason="AnalysisFailed", degraded=True, outcome="analysis_failed",
         layouts=((BLUE, 3, False), (GREEN, 0, True))),
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
    # --- requested checks that came back Skipped ---
    Case("a requested smoke check that was Skipped is no pass: the analysis measures again", rolling(Step.ANALYSIS),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=40, preview_endpoints=3, spec=SMOKE, checks=SMOKE_SKIPPED,
         step="Analysis", preview=GREEN, reason="Analysing", requeue=10),
    Case("a requested check that was not measured at all is no pass either", rolling(Step.ANALYSIS),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=40, preview_endpoints=3, spec=SMOKE, checks=PASS, step="Analysis",
         preview=GREEN, reason="Analysing", requeue=10),
    Case("the smoke check passing on a later measurement promotes", rolling(Step.ANALYSIS),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=300, preview_endpoints=3, spec=SMOKE, checks=SMOKE_PASSED,
         step="PostPromotion", active=GREEN, active_revision=NEW),
    Case("still Skipped at the progress deadline: the analysis fails",
         rolling(Step.ANALYSIS, analysis=[{"name": "smoke", "result": "Skipped", "message": OIDC}]),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=600, preview_endpoints=3, spec=SMOKE,
         step="Aborted", reason="AnalysisFailed", degraded=True, outcome="analysis_failed",
         layouts=((BLUE, 3, False), (GREEN, 0, True))),
    Case("a requested check Skipped after promotion is measured again, traffic stays", promoted(),
         {GREEN: up(NEW), BLUE: up(OLD)}, now=95, spec=SMOKE, checks=SMOKE_SKIPPED, step="PostPromotion",
         active=GREEN, layouts=((GREEN, 3, True), (BLUE, 3, False)), active_revision=NEW, requeue=10,
         waiting_since=at(95)),
    Case("a requested check still Skipped past the deadline after promotion switches traffic back",
         promoted(waitingSince=at(95)), {GREEN: up(NEW), BLUE: up(OLD)}, now=695, spec=SMOKE, checks=SMOKE_SKIPPED,
         step="Aborted", active=BLUE, reason="AnalysisFailed", degraded=True, outcome="analysis_failed"),
    # --- checks the pods did not answer (a new endpoint not yet programmed on the node) ---
    Case("a check the preview did not answer is no failure: the analysis measures again", rolling(Step.ANALYSIS),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=40, preview_endpoints=3, checks=UNANSWERED, step="Analysis",
         preview=GREEN, reason="Analysing", requeue=10),
    Case("an answer after some without clears the count and promotes", rolling(Step.ANALYSIS, unansweredMeasurements=3),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=80, preview_endpoints=3, checks=PASS,
         step="PostPromotion", active=GREEN, active_revision=NEW),
    Case("a fifth measurement in a row without an answer fails the analysis",
         rolling(Step.ANALYSIS, unansweredMeasurements=4), {BLUE: up(OLD), GREEN: up(NEW)}, now=100,
         preview_endpoints=3, checks=UNANSWERED, step="Aborted", reason="AnalysisFailed", degraded=True,
         outcome="analysis_failed", layouts=((BLUE, 3, False), (GREEN, 0, True))),
    Case("a failed check beside one without an answer fails at once", rolling(Step.ANALYSIS),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=40, preview_endpoints=3,
         checks=[*UNANSWERED, Check(CheckName.LATENCY, AnalysisResult.FAILED, "p95 9 s")], step="Aborted",
         reason="AnalysisFailed", degraded=True, outcome="analysis_failed", layouts=((BLUE, 3, False), (GREEN, 0, True))),
    Case("still no answer at the progress deadline: the analysis fails",
         rolling(Step.ANALYSIS, analysis=[{"name": "readyz", "result": "Pending", "message": UNREACHABLE}]),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=600, preview_endpoints=3, checks=UNANSWERED,
         step="Aborted", reason="AnalysisFailed", degraded=True, outcome="analysis_failed",
         layouts=((BLUE, 3, False), (GREEN, 0, True))),
    Case("no answer after promotion switches traffic back at once: those pods answered the analysis", promoted(),
         {GREEN: up(NEW), BLUE: up(OLD)}, now=95, checks=UNANSWERED, step="Aborted", active=BLUE,
         reason="AnalysisFailed", degraded=True, outcome="analysis_failed"),
    # --- spec changes mid-rollout ---
    Case("spec back to the stable revision cancels the preview", rolling(Step.ANALYSIS),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=20, revision=OLD, step=None, layouts=((BLUE, 3, True), (GREEN, 0, False)),
         reason="Available", ready=True),
    Case("a newer revision restarts the preview", rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)}, now=20,
         revision=NEWER, step="Preview", preview=GREEN, layouts=((BLUE, 3, False), (GREEN, 3, True))),
]  # fmt: skip

# spec.replicas changing under the rollout (the HPA writes the agent's scale subresource), up (3 -> 5)
# and down (3 -> 2) at each step, and the step once the colours have followed. Never an abort.
SCALING = [
    # awaiting approval
    Case("scale up while awaiting approval: the preview follows, the rollout waits",
         rolling(Step.AWAITING_PROMOTION), {BLUE: up(OLD), GREEN: up(NEW)}, now=50, replicas=5, preview_endpoints=3,
         spec={"promotion": "Manual"}, step="AwaitingPromotion", preview=GREEN, reason="PreviewProgressing",
         layouts=((BLUE, 5, False), (GREEN, 5, True)), requeue=600, waiting_since=at(50)),
    Case("scale down while awaiting approval: the preview follows, the rollout waits",
         rolling(Step.AWAITING_PROMOTION), {BLUE: up(OLD), GREEN: up(NEW)}, now=50, replicas=2, preview_endpoints=3,
         spec={"promotion": "Manual"}, step="AwaitingPromotion", preview=GREEN,
         layouts=((BLUE, 2, False), (GREEN, 2, True)), waiting_since=at(50)),
    Case("scaled up while awaiting approval: waits for approval again", rolling(Step.AWAITING_PROMOTION,
         waitingSince=at(50)), {BLUE: up(OLD, 5), GREEN: up(NEW, 5)}, now=80, replicas=5, preview_endpoints=5,
         spec={"promotion": "Manual"}, step="AwaitingPromotion", preview=GREEN, reason="AwaitingPromotion",
         paused=True, layouts=((BLUE, 5, False), (GREEN, 5, True))),
    Case("scaled down while awaiting approval: waits for approval again", rolling(Step.AWAITING_PROMOTION,
         waitingSince=at(50)), {BLUE: up(OLD, 2), GREEN: up(NEW, 2)}, now=55, replicas=2, preview_endpoints=2,
         spec={"promotion": "Manual"}, step="AwaitingPromotion", preview=GREEN, paused=True),
    # the end of the analysis window
    Case("scale up at the analysis window's end: the preview follows, measured once it has",
         rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)}, now=40, replicas=5, preview_endpoints=3,
         step="Analysis", preview=GREEN, reason="Analysing", layouts=((BLUE, 5, False), (GREEN, 5, True)),
         requeue=600, waiting_since=at(40)),
    Case("scale down at the analysis window's end: the preview follows, measured once it has",
         rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)}, now=40, replicas=2, preview_endpoints=3,
         step="Analysis", preview=GREEN, layouts=((BLUE, 2, False), (GREEN, 2, True)), waiting_since=at(40)),
    Case("scaled up during the analysis: measured", rolling(Step.ANALYSIS, waitingSince=at(40)),
         {BLUE: up(OLD, 5), GREEN: up(NEW, 5)}, now=70, replicas=5, preview_endpoints=5, step="Analysis",
         preview=GREEN, measure="preview"),
    Case("scaled down during the analysis: promoted", rolling(Step.ANALYSIS, waitingSince=at(40)),
         {BLUE: up(OLD, 2), GREEN: up(NEW, 2)}, now=45, replicas=2, preview_endpoints=2, checks=PASS,
         step="PostPromotion", active=GREEN, active_revision=NEW, layouts=((GREEN, 2, True), (BLUE, 2, False))),
    # promoting
    Case("scale up while promoting: the preview follows, the switch waits", rolling(Step.PROMOTING),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=60, replicas=5, preview_endpoints=3, step="Promoting", preview=GREEN,
         reason="Promoting", layouts=((BLUE, 5, False), (GREEN, 5, True)), requeue=600, waiting_since=at(60)),
    Case("scale down while promoting: the preview follows, the switch waits", rolling(Step.PROMOTING),
         {BLUE: up(OLD), GREEN: up(NEW)}, now=60, replicas=2, preview_endpoints=3, step="Promoting", preview=GREEN,
         layouts=((BLUE, 2, False), (GREEN, 2, True)), waiting_since=at(60)),
    Case("scaled up while promoting: traffic switches", rolling(Step.PROMOTING, waitingSince=at(60)),
         {BLUE: up(OLD, 5), GREEN: up(NEW, 5)}, now=90, replicas=5, preview_endpoints=5, step="PostPromotion",
         active=GREEN, active_revision=NEW, layouts=((GREEN, 5, True), (BLUE, 5, False))),
    Case("scaled down while promoting: traffic switches", rolling(Step.PROMOTING, waitingSince=at(60)),
         {BLUE: up(OLD, 2), GREEN: up(NEW, 2)}, now=65, replicas=2, preview_endpoints=2, step="PostPromotion",
         active=GREEN, active_revision=NEW),
    Case("a preview that never fills while promoting is aborted at the progress deadline",
         rolling(Step.PROMOTING, waitingSince=at(60)), {BLUE: up(OLD, 5), GREEN: starting(NEW, 5, available=3)},
         now=660, replicas=5, preview_endpoints=3, step="Aborted", reason="ProgressDeadlineExceeded", degraded=True,
         outcome="deadline_exceeded", layouts=((BLUE, 5, False), (GREEN, 0, True))),
    # post-promotion
    Case("scale up after promotion: both colours follow, the check waits", promoted(),
         {GREEN: up(NEW), BLUE: up(OLD)}, now=95, replicas=5, step="PostPromotion", active=GREEN,
         layouts=((GREEN, 5, True), (BLUE, 5, False)), active_revision=NEW, requeue=600, waiting_since=at(95)),
    Case("scale down after promotion: both colours follow, the check waits", promoted(),
         {GREEN: up(NEW), BLUE: up(OLD)}, now=95, replicas=2, step="PostPromotion", active=GREEN,
         layouts=((GREEN, 2, True), (BLUE, 2, False)), active_revision=NEW, waiting_since=at(95)),
    Case("scaled up after promotion: the check is measured", promoted(waitingSince=at(95)),
         {GREEN: up(NEW, 5), BLUE: up(OLD, 5)}, now=120, replicas=5, active_endpoints=5, step="PostPromotion",
         active=GREEN, measure="active", active_revision=NEW, waiting_since=at(95)),
    Case("scaled down after promotion: completed", promoted(waitingSince=at(95)),
         {GREEN: up(NEW, 2), BLUE: up(OLD, 2)}, now=100, replicas=2, active_endpoints=2, checks=PASS,
         step="Completed", active=GREEN, layouts=((GREEN, 2, True), (BLUE, 0, False)), reason="Available",
         ready=True, outcome="promoted", active_revision=NEW),
    Case("a pod evicted after promotion is waited for", promoted(), {GREEN: Colour(NEW, 3, 2), BLUE: up(OLD)},
         now=95, active_endpoints=2, step="PostPromotion", active=GREEN, active_revision=NEW, waiting_since=at(95)),
]  # fmt: skip
CASES += SCALING


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
    waiting_since = decision.rollout.waiting_since if decision.rollout else None
    assert (parse(waiting_since) if waiting_since else None) == (
        parse(case.waiting_since) if case.waiting_since else None
    )


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
        "abortRequestSeen": first.abort_request_seen,
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


def test_a_requested_check_still_skipped_at_the_deadline_is_named() -> None:
    measuring = next(c for c in CASES if c.name.startswith("a requested smoke check that was Skipped")).run()
    assert measuring.rollout is not None
    assert {a.name: a.result for a in measuring.rollout.analysis}[CheckName.SMOKE] == "Skipped"
    assert "smoke: Skipped" in measuring.message
    failed = next(c for c in CASES if c.name.startswith("still Skipped at the progress deadline")).run()
    assert f"smoke: Skipped ({OIDC})" in failed.message
    after = next(c for c in CASES if c.name.startswith("a requested check still Skipped past the deadline")).run()
    assert "post-promotion check failed" in after.message
    assert "smoke: Skipped" in after.message


def test_a_check_without_an_answer_is_named_while_measured_again_and_at_the_deadline() -> None:
    measuring = next(c for c in CASES if c.name.startswith("a check the preview did not answer")).run()
    assert measuring.rollout is not None
    assert {a.name: a.result for a in measuring.rollout.analysis}[CheckName.READYZ] == "Pending"
    assert f"a check has no result: readyz: Pending ({UNREACHABLE})" in measuring.message
    failed = next(c for c in CASES if c.name.startswith("still no answer at the progress deadline")).run()
    assert f"a check had no result by the deadline (600 s): readyz: Pending ({UNREACHABLE})" in failed.message
    after = next(c for c in CASES if c.name.startswith("no answer after promotion switches traffic back")).run()
    assert after.message == (
        f"post-promotion check failed: no answer from pods that answered the analysis: readyz: {UNREACHABLE}"
    )


def test_measurements_without_an_answer_are_counted_and_at_most_four_in_a_row_waited_out() -> None:
    first = next(c for c in CASES if c.name.startswith("a check the preview did not answer")).run()
    assert first.rollout is not None
    assert first.rollout.unanswered_measurements == 1
    again = replace(next(c for c in CASES if c.name.startswith("a check the preview did not answer")),
                    status=rolling(Step.ANALYSIS, unansweredMeasurements=3)).run()  # fmt: skip
    assert again.rollout is not None
    assert again.rollout.unanswered_measurements == 4
    assert _step(again) == "Analysis"  # the fourth is still waited out
    answered = next(c for c in CASES if c.name.startswith("an answer after some without clears")).run()
    assert answered.rollout is not None
    assert answered.rollout.unanswered_measurements is None
    fifth = next(c for c in CASES if c.name.startswith("a fifth measurement in a row without an answer")).run()
    assert f"no answer in 5 measurements in a row (4 are waited out): readyz: {UNREACHABLE}" in fifth.message


def _step(decision: Decision) -> str | None:
    return decision.rollout.step if decision.rollout else None


def _next_status(decision: Decision) -> dict[str, Any]:
    """The status the controller writes for a decision, as the next reconcile reads it."""
    return {
        "activeColor": decision.active_color.value,
        "activeRevision": decision.active_revision,
        "previewRevision": decision.preview_revision,
        "rollout": decision.rollout.model_dump(mode="json", by_alias=True, exclude_none=True)
        if decision.rollout
        else None,
        "abortRequestSeen": decision.abort_request_seen,
    }


def test_an_abort_request_acts_once_and_a_retry_of_the_same_revision_proceeds() -> None:
    # Abort NEW during its preview.
    aborting = Case("", rolling(Step.PREVIEW), {BLUE: up(OLD), GREEN: starting(NEW)}, now=5, abort=NEW)
    aborted = aborting.run()
    assert (_step(aborted), aborted.outcome, aborted.abort_request_seen) == ("Aborted", "aborted", NEW)
    # Retry, with the abort annotation still on the agent (set by hand, or kept by a GitOps tool).
    retried = replace(aborting, status=_next_status(aborted), now=100, retry="t1").run()
    assert _step(retried) == "Preview"
    # The new rollout of the same revision proceeds to its analysis instead of aborting at once.
    ready = {BLUE: up(OLD), GREEN: up(NEW)}
    analysing = replace(
        aborting, status=_next_status(retried), colours=ready, preview_endpoints=3, now=120, retry="t1"
    ).run()
    assert (_step(analysing), analysing.outcome, analysing.degraded) == ("Analysis", None, False)
    # A new abort request (the annotation removed, then written again) acts.
    cleared = replace(aborting, status=_next_status(analysing), colours=ready, preview_endpoints=3, now=125, abort=None)
    assert cleared.run().abort_request_seen is None
    again = replace(cleared, status=_next_status(cleared.run()), abort=NEW).run()
    assert (_step(again), again.outcome) == ("Aborted", "aborted")


def test_an_abort_request_does_not_abort_the_same_revision_applied_again_later() -> None:
    aborting = Case("", rolling(Step.ANALYSIS), {BLUE: up(OLD), GREEN: up(NEW)}, now=20, preview_endpoints=3, abort=NEW)
    aborted = aborting.run()
    assert aborted.outcome == "aborted"
    # The spec goes back to the stable revision: no rollout; the annotation stays.
    reverted = replace(aborting, status=_next_status(aborted), revision=OLD, now=30).run()
    assert (_step(reverted), reverted.active_revision) == (None, OLD)
    # NEW applied again: a new rollout that proceeds.
    started = replace(aborting, status=_next_status(reverted), colours={BLUE: up(OLD), GREEN: up(NEW, 0)}, now=40).run()
    assert _step(started) == "Preview"
    previewing = replace(aborting, status=_next_status(started), now=45).run()
    assert (_step(previewing), previewing.outcome) == ("Analysis", None)


def test_an_abort_request_after_promotion_is_spent_by_the_switch_back() -> None:
    aborting = Case("", promoted(), {GREEN: up(NEW), BLUE: up(OLD)}, now=70, abort=NEW)
    switched = aborting.run()
    assert (_step(switched), switched.active_color, switched.abort_request_seen) == ("Aborted", BLUE, NEW)
    retried = replace(
        aborting, status=_next_status(switched), colours={BLUE: up(OLD), GREEN: up(NEW, 0)}, now=80, retry="t1"
    ).run()
    assert _step(retried) == "Preview"
    ready = {BLUE: up(OLD), GREEN: up(NEW)}
    going = replace(
        aborting, status=_next_status(retried), colours=ready, preview_endpoints=3, now=90, retry="t1"
    ).run()
    assert (_step(going), going.outcome) == ("Analysis", None)


def test_a_rollout_under_an_autoscaler_that_scales_at_every_step_completes() -> None:
    """The cluster follows every decision (a Deployment's pods are ready one reconcile after its
    replicas change) while spec.replicas moves up and down every third reconcile, at every step;
    the rollout must end promoted (approved on the way), and never abort."""
    counts = iter([count for count in (3, 5, 2, 4, 6, 3) * 10 for _ in range(3)])
    status: dict[str, Any] = steady()
    deployments: dict[Color, tuple[str, int]] = {BLUE: (OLD, 3)}
    ready: dict[Color, int] = {BLUE: 3}
    steps: list[str | None] = []
    for tick in range(120):
        replicas = next(counts)
        colours = {
            color: Colour(revision, count, ready.get(color, 0), rolled_out=ready.get(color, 0) == count)
            for color, (revision, count) in deployments.items()
        }
        active = Color(status["activeColor"])
        case = Case(
            "",
            status,
            colours,
            now=tick * 5,
            replicas=replicas,
            spec={"promotion": "Manual", "scaleDownDelaySeconds": 20, **({"promote": NEW} if tick >= 16 else {})},
            preview_endpoints=ready.get(active.other, 0) if colours.get(active.other, Colour()).rolled_out else 0,
            active_endpoints=ready.get(active, 0) if colours.get(active, Colour()).rolled_out else 0,
        )
        decision = case.run()
        if decision.measure is not None:
            decision = replace(case, checks=PASS).run()
        assert decision.outcome in (None, "promoted"), decision.message
        steps.append(_step(decision))
        if decision.outcome == "promoted":
            break
        status = _next_status(decision)
        ready = {color: deployments[color][1] for color in deployments}  # last round's pods are ready now
        for layout in decision.deployments:
            revision = NEW if layout.from_spec else deployments[layout.color][0]
            deployments[layout.color] = (revision, layout.replicas)
    assert steps[-1] == "Completed", steps
    assert {"Preview", "Analysis", "AwaitingPromotion", "PostPromotion"} <= set(steps), steps
