"""Which spec an undo request puts back (agent_operator.undo), from the ControllerRevisions the
operator caches, and the guarded JSON patch that writes it. The operator's side end to end is in
tests/cluster/test_rollout.py (kubectl ea undo, the Argo CD action, a refused request)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest

from agent_operator import undo
from agent_operator.render.history import build_controller_revision, first_render
from agent_operator.spec import EnterpriseAgentStatus, UndoResult, read_status
from tests.helpers import example_agent

AGENT = example_agent("minimal")
OLD_SPEC = AGENT.spec.model_dump(by_alias=True, mode="json", exclude_unset=True)
NEW_SPEC = {**OLD_SPEC, "image": "example.com/agent:2"}


def status(**fields: Any) -> EnterpriseAgentStatus:
    return read_status(fields)


def revision_object(revision: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    record = first_render(AGENT.model_copy(update={"spec": type(AGENT.spec).model_validate(spec)}), revision)
    return build_controller_revision(AGENT, record)


def revisions(**objects: dict[str, Any]) -> undo.FindRevision:
    """ControllerRevisions of the agent by revision, as the cache holds them."""
    return objects.get


PROMOTED = status(activeColor="green", activeRevision="r2", rollout={"step": "Completed", "previousRevision": "r1"})


def decide(spec: Mapping[str, Any], state: EnterpriseAgentStatus, find: undo.FindRevision) -> undo.Undo:
    return undo.decide("hello-agent", "t1", spec, state, find)


def test_after_a_promotion_the_revision_before_comes_back_from_its_controller_revision() -> None:
    answer = decide(NEW_SPEC, PROMOTED, revisions(r1=revision_object("r1", OLD_SPEC)))
    assert answer.spec == OLD_SPEC
    assert (answer.answer.request, answer.answer.result, answer.answer.revision) == ("t1", UndoResult.UNDONE, "r1")


def test_during_a_rollout_the_serving_revision_comes_back() -> None:
    rolling = status(activeColor="blue", activeRevision="r1", previewRevision="r2", rollout={"step": "Analysis"})
    assert decide(NEW_SPEC, rolling, revisions(r1=revision_object("r1", OLD_SPEC))).spec == OLD_SPEC


def test_only_the_fields_that_make_a_revision_go_back() -> None:
    """Replicas, autoscaling, rollout settings and the NetworkPolicy's allow-lists stay as they are now."""
    now = {
        **NEW_SPEC,
        "replicas": 7,
        "rollout": {"promotion": "Manual"},
        "networkPolicy": {"allowedIngressNamespaces": ["web"], "allowedEgressHosts": ["new.example.com"]},
    }
    then = {**OLD_SPEC, "replicas": 2, "networkPolicy": {"allowedEgressHosts": ["old.example.com"]}}
    restored = decide(now, PROMOTED, revisions(r1=revision_object("r1", then))).spec
    assert restored is not None
    assert restored["image"] == OLD_SPEC["image"]
    assert (restored["replicas"], restored["rollout"]) == (7, {"promotion": "Manual"})
    # allowedEgressHosts is enforced by the runtime: part of the revision; the ingress list is not.
    assert restored["networkPolicy"] == {"allowedIngressNamespaces": ["web"], "allowedEgressHosts": ["old.example.com"]}


def test_a_section_the_revision_did_not_have_goes_with_its_kept_fields() -> None:
    now = {
        **NEW_SPEC,
        "model": {
            "provider": "openai",
            "baseUrl": "https://m.example/v1",
            "model": "m",
            "egressCIDRs": ["198.18.0.9/32"],
        },
    }
    restored = decide(now, PROMOTED, revisions(r1=revision_object("r1", OLD_SPEC))).spec
    assert restored is not None
    assert "model" not in restored  # not a model section holding only egressCIDRs


@pytest.mark.parametrize(
    ("state", "find", "reason"),
    [
        (status(), revisions(), "hello-agent has not served any revision yet"),
        (
            status(activeColor="blue", activeRevision="r1"),
            revisions(),
            "hello-agent has no previous revision to go back to",
        ),
        (PROMOTED, revisions(), "revision r1 of hello-agent is not recorded (no ControllerRevision); cannot undo"),
        (
            PROMOTED,
            revisions(r1=revision_object("r0", OLD_SPEC)),
            "revision r1 of hello-agent is not recorded (no ControllerRevision); cannot undo",
        ),
        (PROMOTED, revisions(r1=revision_object("r1", NEW_SPEC)), "hello-agent already runs the spec of revision r1"),
    ],
    ids=["never served", "first revision", "not recorded", "another revision's record", "already back"],
)
def test_nothing_to_go_back_to_is_refused_with_the_reason(
    state: EnterpriseAgentStatus, find: undo.FindRevision, reason: str
) -> None:
    answer = decide(NEW_SPEC, state, find)
    assert answer.spec is None
    assert (answer.answer.result, answer.answer.message) == (UndoResult.REFUSED, reason)


def test_each_token_is_answered_once() -> None:
    answered = status(activeColor="blue", lastUndo={"request": "t1", "result": "Undone", "revision": "r1"})
    assert not undo.pending("t1", answered, {})
    assert undo.pending("t2", answered, {})
    assert not undo.pending(None, answered, {})
    assert not undo.pending("", status(), {})
    assert not undo.pending(["not", "a", "string"], status(), {})
    assert undo.pending("t1", status(), {})


def test_a_spec_written_back_whose_status_write_was_lost_is_not_undone_again_but_recorded() -> None:
    """The spec patch marks its request (agents.enterprise.io/undone); the status may lag behind it."""
    lagging = status(activeColor="blue", activeRevision="r1", previewRevision="r2", rollout={"step": "Preview"})
    marked = {"agents.enterprise.io/undone": "t1"}
    assert not undo.pending("t1", lagging, marked)
    late = undo.unrecorded_answer("t1", lagging, marked)
    assert late is not None
    assert (late.request, late.result) == ("t1", UndoResult.UNDONE)
    recorded = lagging.model_copy(update={"last_undo": late})
    assert undo.unrecorded_answer("t1", recorded, marked) is None
    assert undo.unrecorded_answer("t2", lagging, marked) is None  # another request: decided as usual


def test_a_token_longer_than_the_status_keeps_is_answered_by_its_digest() -> None:
    token = "x" * 5000  # an annotation set by hand
    answer = undo.decide("hello-agent", token, NEW_SPEC, status(), revisions()).answer
    assert answer.request == undo.request_id(token)
    assert answer.request.startswith("sha256:")
    assert len(answer.request) <= undo.MAX_REQUEST_LENGTH
    assert not undo.pending(token, status(lastUndo=answer.model_dump(by_alias=True, mode="json")), {})


def test_the_spec_is_replaced_whole_only_over_the_agent_decided_on_and_marks_its_request() -> None:
    body: dict[str, Any] = {"metadata": {"resourceVersion": "41", "annotations": {"agents.enterprise.io/undo": "t1"}}}
    body["spec"] = {**NEW_SPEC, "env": [{"name": "ONLY_IN_NEW", "value": "1"}]}
    ops = undo.spec_patch("41", decide(body["spec"], PROMOTED, revisions(r1=revision_object("r1", OLD_SPEC))))
    assert ops[0] == {"op": "replace", "path": "/metadata/resourceVersion", "value": "41"}  # 409 if it moved
    assert apply_json_patch(body, ops) == {
        "metadata": {
            "resourceVersion": "41",
            "annotations": {"agents.enterprise.io/undo": "t1", "agents.enterprise.io/undone": "t1"},
        },
        "spec": OLD_SPEC,  # no field of the newer spec survives, as a merge patch would let it
    }


def apply_json_patch(document: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """The RFC 6902 subset the answer uses (replace, add to an object), with RFC 6901 pointers."""
    result = copy.deepcopy(document)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target = result
        for part in parents:
            target = target[part]
        assert op["op"] in ("replace", "add"), op
        assert op["op"] == "add" or last in target, op
        target[last] = op["value"]
    return result
