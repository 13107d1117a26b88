"""Which spec an undo request puts back (agent_operator.undo), from the objects the operator caches,
and the one JSON patch that answers it. The operator's side end to end is in
tests/cluster/test_rollout.py (kubectl ea undo, the Argo CD action, a refused request)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest

from agent_operator import undo
from agent_operator.render.common import ANNOTATION_SPEC, LABEL_REVISION, encode_spec
from agent_operator.render.history import build_controller_revision, first_render
from agent_operator.spec import EnterpriseAgentStatus, read_status
from tests.helpers import example_agent

AGENT = example_agent("minimal")
OLD_SPEC = AGENT.spec.model_dump(by_alias=True, mode="json", exclude_unset=True)
NEW_SPEC = {**OLD_SPEC, "image": "example.com/agent:2"}


def status(**fields: Any) -> EnterpriseAgentStatus:
    return read_status(fields)


def revision_object(revision: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    record = first_render(AGENT.model_copy(update={"spec": type(AGENT.spec).model_validate(spec)}), revision)
    return build_controller_revision(AGENT, record)


def deployment(revision: str | None, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": {LABEL_REVISION: revision} if revision else {}}
    if spec is not None:
        meta["annotations"] = {ANNOTATION_SPEC: encode_spec(spec)}
    return {"metadata": meta}


def cache(**objects: dict[str, Any]) -> undo.Lookup:
    """Objects by name (any kind): ``hello-agent-blue`` a Deployment, ``hello-agent-r1`` a revision."""

    def find(kind: str, name: str) -> Mapping[str, Any] | None:
        found = objects.get(name.replace("-", "_"))
        return found if found is not None and (kind == "Deployment") == ("revision" not in found) else None

    return find


PROMOTED = status(activeColor="green", activeRevision="r2", rollout={"step": "Completed", "previousRevision": "r1"})


def test_after_a_promotion_the_other_colours_revision_comes_back_from_its_controller_revision() -> None:
    found = cache(hello_agent_blue=deployment("r1"), hello_agent_r1=revision_object("r1", OLD_SPEC))
    assert undo.decide("hello-agent", NEW_SPEC, PROMOTED, found) == undo.Undo(revision="r1", spec=OLD_SPEC)


def test_during_a_rollout_the_serving_revision_comes_back() -> None:
    rolling = status(activeColor="blue", activeRevision="r1", previewRevision="r2", rollout={"step": "Analysis"})
    found = cache(hello_agent_blue=deployment("r1"), hello_agent_r1=revision_object("r1", OLD_SPEC))
    assert undo.decide("hello-agent", NEW_SPEC, rolling, found) == undo.Undo(revision="r1", spec=OLD_SPEC)


def test_the_deployments_label_wins_over_the_status_and_its_annotation_stands_in_for_a_lost_revision() -> None:
    # The other colour ran r0 (a spec put back since, say); no ControllerRevision is left for it.
    found = cache(hello_agent_blue=deployment("r0", OLD_SPEC))
    assert undo.decide("hello-agent", NEW_SPEC, PROMOTED, found) == undo.Undo(revision="r0", spec=OLD_SPEC)


@pytest.mark.parametrize(
    ("state", "found", "reason"),
    [
        (status(), cache(), "hello-agent has not served any revision yet"),
        (
            status(activeColor="blue", activeRevision="r1"),
            cache(),
            "hello-agent has no previous revision to go back to",
        ),
        (PROMOTED, cache(hello_agent_blue=deployment("r1")), "revision r1 of hello-agent is not recorded; cannot undo"),
        (
            PROMOTED,
            cache(hello_agent_r1=revision_object("r1", NEW_SPEC)),
            "hello-agent already runs the spec of revision r1",
        ),
    ],
    ids=["never served", "first revision", "not recorded", "already back"],
)
def test_nothing_to_go_back_to_is_refused_with_the_reason(
    state: EnterpriseAgentStatus, found: undo.Lookup, reason: str
) -> None:
    answer = undo.decide("hello-agent", NEW_SPEC, state, found)
    assert (answer.spec, answer.refused) == (None, reason)


def test_the_answer_is_one_guarded_patch_that_replaces_the_spec_whole_and_drops_the_request() -> None:
    body: dict[str, Any] = {"metadata": {"resourceVersion": "41", "annotations": {"agents.enterprise.io/undo": "t", "x": "y"}}}
    body["spec"] = {**NEW_SPEC, "env": [{"name": "ONLY_IN_NEW", "value": "1"}]}
    ops = undo.answer_patch("41", undo.Undo(revision="r1", spec=OLD_SPEC))
    assert ops[0] == {"op": "replace", "path": "/metadata/resourceVersion", "value": "41"}  # 409 if it moved
    assert apply_json_patch(body, ops) == {
        "metadata": {"resourceVersion": "41", "annotations": {"x": "y"}},
        "spec": OLD_SPEC,  # no field of the newer spec survives, as a merge patch would let it
    }
    refused = undo.answer_patch("41", undo.Undo(refused="nothing to go back to"))
    assert apply_json_patch(body, refused)["spec"] == body["spec"]
    assert "agents.enterprise.io/undo" not in apply_json_patch(body, refused)["metadata"]["annotations"]


def apply_json_patch(document: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """The RFC 6902 subset the answer uses (replace, remove), with RFC 6901 pointers."""
    result = copy.deepcopy(document)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target = result
        for part in parents:
            target = target[part]
        if op["op"] == "remove":
            del target[last]
        else:
            assert op["op"] == "replace", op
            assert last in target, op
            target[last] = op["value"]
    return result
