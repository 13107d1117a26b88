"""The status models keep every message within the CRD's bound, on every path that builds one:
a longer message would make the whole status write fail (422) and the agent show nothing."""

from __future__ import annotations

from datetime import UTC, datetime

from agent_operator import conditions as cond
from agent_operator.reconcile import reconcile
from agent_operator.rollout import Check, Colour, RolloutInput, decide
from agent_operator.spec import (
    MAX_MESSAGE_LENGTH,
    AnalysisCheck,
    AnalysisResult,
    CheckName,
    Color,
    ConditionType,
    EnterpriseAgentStatus,
    RolloutSpec,
    RolloutStatus,
    read_status,
)
from tests.helpers import observe, served

LONG = "operation-" * 1000  # 10,000 characters
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _bounded(text: str | None, limit: int = MAX_MESSAGE_LENGTH) -> bool:
    return text is not None and len(text) == limit and text.endswith("...")


def test_a_long_status_message_is_cut_with_an_ellipsis_when_the_status_is_built() -> None:
    status = EnterpriseAgentStatus(message=LONG, rollout=RolloutStatus(message=LONG))
    assert _bounded(status.message)
    assert status.message is not None
    assert status.message.startswith("operation-operation-")
    assert status.rollout is not None
    assert _bounded(status.rollout.message)


def test_a_long_message_set_by_model_copy_is_cut_too() -> None:
    # pydantic's own model_copy(update=...) skips validation; the status models' does not.
    status = EnterpriseAgentStatus().model_copy(update={"message": LONG, "rollout": RolloutStatus()})
    assert _bounded(status.message)
    roll = RolloutStatus().model_copy(update={"message": LONG})
    assert _bounded(roll.message)


def test_the_written_status_is_within_the_bound_even_for_a_status_built_without_validation() -> None:
    status = EnterpriseAgentStatus.model_construct(message=LONG)
    assert _bounded(status.model_dump(mode="json", by_alias=True, exclude_none=True)["message"])


def test_condition_and_check_messages_are_cut_to_their_own_bounds() -> None:
    conditions = cond.set_condition([], ConditionType.READY, False, "RollingOut", LONG * 4, 1, "2026-01-01T00:00:00Z")
    assert _bounded(conditions[0].message, 32768)
    check = AnalysisCheck(name=CheckName.SMOKE, result=AnalysisResult.FAILED, message=LONG)
    assert _bounded(check.message, 1024)


def test_a_status_read_back_with_a_long_message_keeps_the_message_cut() -> None:
    status = read_status({"phase": "Degraded", "message": LONG, "activeColor": "blue"})
    assert (status.phase, status.active_color) == ("Degraded", Color.BLUE)
    assert _bounded(status.message)


def test_a_failed_analysis_with_long_check_messages_writes_a_bounded_status() -> None:
    failing = [Check(name, AnalysisResult.FAILED, LONG) for name in (CheckName.READYZ, CheckName.SMOKE)]
    decision = decide(
        RolloutInput(
            revision="bbbbbbbbbb",
            replicas=1,
            rollout=RolloutSpec.model_validate({"analysis": {"windowSeconds": 0}}),
            status=EnterpriseAgentStatus.model_validate(
                {
                    "activeColor": "blue",
                    "activeRevision": "aaaaaaaaaa",
                    "previewRevision": "bbbbbbbbbb",
                    "rollout": {"step": "Analysis", "startedAt": "2026-01-01T00:00:00Z"},
                }
            ),
            colours={Color.BLUE: Colour("aaaaaaaaaa", 1, 1, True), Color.GREEN: Colour("bbbbbbbbbb", 1, 1, True)},
            preview_endpoints=1,
            active_endpoints=1,
            now=NOW,
            checks=failing,
        )
    )
    assert decision.outcome == "analysis_failed"
    assert decision.rollout is not None
    assert _bounded(decision.rollout.message)
    assert all(len(check.message) <= 1024 for check in decision.rollout.analysis)


def test_an_agent_whose_status_message_would_be_too_long_gets_a_cut_one_through_the_entry_point() -> None:
    body = served("minimal")
    body["spec"] = {**body["spec"], "operations": [f"op_{i:02d}_" + "x" * 56 for i in range(64)]}
    plan = reconcile(observe(body), NOW, operator_namespace="ops")
    written = plan.status_body()
    assert _bounded(written["message"])
    assert written["message"].startswith("spec.operations[0]: unknown operation")
    assert all(len(c["message"]) <= MAX_MESSAGE_LENGTH for c in written["conditions"])


def test_the_abort_request_acted_on_is_recorded_in_the_status() -> None:
    body = served("minimal")
    body["metadata"] = {**body["metadata"], "annotations": {"agents.enterprise.io/abort": "aaaaaaaaaa"}}
    plan = reconcile(observe(body), NOW, operator_namespace="ops")
    assert plan.status.abort_request_seen == "aaaaaaaaaa"
    assert plan.status_body()["abortRequestSeen"] == "aaaaaaaaaa"
    assert read_status(plan.status_body()) == plan.status
