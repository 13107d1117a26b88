"""Undo: which spec an agent goes back to, found in what the operator keeps anyway (pure).

`kubectl ea undo` and the Argo CD action `undo` ask for it the same way, with the
``agents.enterprise.io/undo`` annotation set to a new token (an action sees only the agent, never
the earlier spec, which lives in a ControllerRevision). The operator answers each token once, in
``status.lastUndo``: Undone (the revision's fields of the spec set back, in one write guarded by
the agent's resourceVersion) or Refused with the reason, plus an Event. The annotation stays, as
the abort and retry annotations do: a token already answered is never acted on again, so a
request committed to Git or re-applied by a sync does not undo twice. The spec write itself also
records its token (annotation ``agents.enterprise.io/undone``), so a status write lost after it
(a conflict, a crash, a step-down) cannot make the next reconcile undo once more.

The revision to go back to is the status's (the operator's own record): during a rollout, or after
one that failed, the serving one; otherwise the one before the last promotion. Its spec comes from
its ControllerRevision only (the operator's record of what the revision was). Only the fields that
make a revision are put back (history.with_revision_fields_of): replicas, autoscaling, the rollout
settings and the NetworkPolicy's allow-lists stay as they are now, as Argo Rollouts' undo restores
the pod template and nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent_operator.render.common import ANNOTATION_UNDONE
from agent_operator.render.history import read_controller_revision, with_revision_fields_of
from agent_operator.spec import EnterpriseAgentStatus, UndoResult, UndoStatus

# A ControllerRevision of this agent by revision (the cache's, filtered to the agent's own), or None.
FindRevision = Callable[[str], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Undo:
    """What an undo request comes to: the spec to write (None when refused) and the answer."""

    spec: Mapping[str, Any] | None
    answer: UndoStatus


# The status keeps a request's token up to this length; a longer one (set by hand) by its digest.
MAX_REQUEST_LENGTH = 128


def request_id(token: str) -> str:
    """How the status and the undone annotation name request ``token``."""
    if len(token) <= MAX_REQUEST_LENGTH:
        return token
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def pending(token: Any, status: EnterpriseAgentStatus, annotations: Mapping[str, Any]) -> bool:
    """An undo token not answered yet: neither in the status nor by a spec written back for it."""
    if not isinstance(token, str) or not token:
        return False
    answered = {status.last_undo.request if status.last_undo is not None else None, annotations.get(ANNOTATION_UNDONE)}
    return request_id(token) not in answered


def unrecorded_answer(token: Any, status: EnterpriseAgentStatus, annotations: Mapping[str, Any]) -> UndoStatus | None:
    """The answer to a request whose spec was written back but whose status write was lost: the
    status must still say so (kubectl ea undo waits for it), without deciding again."""
    if not isinstance(token, str) or not token or annotations.get(ANNOTATION_UNDONE) != request_id(token):
        return None
    if status.last_undo is not None and status.last_undo.request == request_id(token):
        return None
    message = "spec set back to the previous revision's"
    return UndoStatus(request=request_id(token), result=UndoResult.UNDONE, message=message)


def status_revision(status: EnterpriseAgentStatus) -> str | None:
    """The revision to go back to as the status tells it (all an Argo CD action can see, too)."""
    if status.active_color is None:
        return None
    if status.preview_revision:
        return status.active_revision
    return status.rollout.previous_revision if status.rollout is not None else None


def decide(name: str, token: str, spec: Mapping[str, Any], status: EnterpriseAgentStatus, find: FindRevision) -> Undo:
    """The answer to undo request ``token`` for agent ``name``, whose spec is ``spec`` now."""

    request = request_id(token)

    def refused(message: str, revision: str | None = None) -> Undo:
        return Undo(None, UndoStatus(request=request, result=UndoResult.REFUSED, revision=revision, message=message))

    if status.active_color is None:
        return refused(f"{name} has not served any revision yet")
    revision = status_revision(status)
    if not revision:
        return refused(f"{name} has no previous revision to go back to")
    found = find(revision)
    record = read_controller_revision(found) if found is not None else None
    if record is None or record.revision != revision:
        return refused(f"revision {revision} of {name} is not recorded (no ControllerRevision); cannot undo", revision)
    restored = with_revision_fields_of(record.spec, spec)
    if restored == dict(spec):
        return refused(f"{name} already runs the spec of revision {revision}", revision)
    message = f"spec set back to revision {revision}; it now differs from Git"
    return Undo(restored, UndoStatus(request=request, result=UndoResult.UNDONE, revision=revision, message=message))


def spec_patch(resource_version: str, undo: Undo) -> list[dict[str, Any]]:
    """The JSON patch that puts the spec back: only over the agent the decision was made on (the
    API server answers 409 to another resourceVersion), the spec replaced whole (a merge patch
    would keep fields the restored spec does not have), and the request marked as done in the same
    write (the agent carries the undo annotation, so its annotations exist)."""
    assert undo.spec is not None
    return [
        {"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version},
        {"op": "add", "path": "/metadata/annotations/" + _pointer(ANNOTATION_UNDONE), "value": undo.answer.request},
        {"op": "replace", "path": "/spec", "value": dict(undo.spec)},
    ]


def _pointer(key: str) -> str:
    """``key`` as one RFC 6901 JSON pointer segment."""
    return key.replace("~", "~0").replace("/", "~1")
