"""Undo: which spec an agent goes back to, found in what the operator keeps anyway (pure).

`kubectl ea undo` and the Argo CD action `undo` ask for it the same way, with the
``agents.enterprise.io/undo`` annotation set to a new token (an action sees only the agent, never
the earlier spec, which lives in a ControllerRevision). The operator answers each token once, in
``status.lastUndo``: Undone (the revision's fields of the spec set back, in one write guarded by
the agent's resourceVersion) or Refused with the reason, plus an Event. The annotation stays, as
the abort and retry annotations do: a token already answered is never acted on again, so a
request committed to Git or re-applied by a sync does not undo twice.

The revision to go back to is the status's (the operator's own record): during a rollout, or after
one that failed, the serving one; otherwise the one before the last promotion. Its spec comes from
its ControllerRevision only (the operator's record of what the revision was). Only the fields that
make a revision are put back (history.revision_fields): replicas, autoscaling, the rollout
settings and the NetworkPolicy's allow-lists stay as they are now, as Argo Rollouts' undo restores
the pod template and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent_operator.render.history import read_controller_revision, with_revision_fields_of
from agent_operator.spec import EnterpriseAgentStatus, UndoResult, UndoStatus

# A ControllerRevision of this agent by revision (the cache's, filtered to the agent's own), or None.
FindRevision = Callable[[str], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Undo:
    """What an undo request comes to: the spec to write (None when refused) and the answer."""

    spec: Mapping[str, Any] | None
    answer: UndoStatus


def pending(token: str | None, status: EnterpriseAgentStatus) -> bool:
    """An undo token not answered yet."""
    return bool(token) and (status.last_undo is None or status.last_undo.request != token)


def status_revision(status: EnterpriseAgentStatus) -> str | None:
    """The revision to go back to as the status tells it (all an Argo CD action can see, too)."""
    if status.active_color is None:
        return None
    if status.preview_revision:
        return status.active_revision
    return status.rollout.previous_revision if status.rollout is not None else None


def decide(name: str, token: str, spec: Mapping[str, Any], status: EnterpriseAgentStatus, find: FindRevision) -> Undo:
    """The answer to undo request ``token`` for agent ``name``, whose spec is ``spec`` now."""

    def refused(message: str, revision: str | None = None) -> Undo:
        return Undo(None, UndoStatus(request=token, result=UndoResult.REFUSED, revision=revision, message=message))

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
    return Undo(restored, UndoStatus(request=token, result=UndoResult.UNDONE, revision=revision, message=message))


def spec_patch(resource_version: str, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSON patch that puts ``spec`` back: only over the agent the decision was made on (the
    API server answers 409 to another resourceVersion), the spec replaced whole (a merge patch
    would keep fields the restored spec does not have)."""
    return [
        {"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version},
        {"op": "replace", "path": "/spec", "value": dict(spec)},
    ]
