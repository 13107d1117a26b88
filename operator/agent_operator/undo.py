"""Undo: which spec an agent goes back to, found in what the operator keeps anyway (pure).

`kubectl ea undo` and the Argo CD action `undo` ask for it the same way, with the
``agents.enterprise.io/undo`` annotation (an action sees only the agent, never the earlier spec,
which lives in a ControllerRevision). The operator answers in one write: the spec set back and
the annotation removed, guarded by the agent's resourceVersion; or, when there is nothing to go
back to, the annotation removed and a Warning Event that says why.

The revision to go back to: during a rollout, or after one that failed, the one serving (the
active colour's); otherwise the one the other colour ran before the last promotion. Its spec comes
from its ControllerRevision, or (a Deployment an operator before ControllerRevisions made) from
that Deployment's spec annotation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent_operator.render.common import (
    ANNOTATION_SPEC,
    ANNOTATION_UNDO,
    LABEL_REVISION,
    decode_spec,
    deployment_name_for,
)
from agent_operator.render.history import controller_revision_name_for, read_controller_revision
from agent_operator.spec import Color, EnterpriseAgentStatus

# (kind, name) -> the object as the API server holds it, or None: the cache's or a GET's.
Lookup = Callable[[str, str], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Undo:
    """What an undo request comes to: the revision and spec to put back, or why it cannot act."""

    revision: str | None = None
    spec: Mapping[str, Any] | None = None
    refused: str | None = None


def target_colour(status: EnterpriseAgentStatus) -> Color | None:
    active = status.active_color
    if active is None:
        return None
    return active if status.preview_revision else active.other


def status_revision(status: EnterpriseAgentStatus) -> str | None:
    """The revision to go back to as the status alone tells it (what an Argo CD action can see)."""
    if status.active_color is None:
        return None
    if status.preview_revision:
        return status.active_revision
    return status.rollout.previous_revision if status.rollout is not None else None


def decide(name: str, spec: Mapping[str, Any], status: EnterpriseAgentStatus, find: Lookup) -> Undo:
    """The spec agent ``name`` (now at ``spec``) goes back to, from objects ``find`` returns."""
    colour = target_colour(status)
    if colour is None:
        return Undo(refused=f"{name} has not served any revision yet")
    deployment = find("Deployment", deployment_name_for(name, colour))
    labels = ((deployment or {}).get("metadata") or {}).get("labels") or {}
    revision = labels.get(LABEL_REVISION) or status_revision(status)
    if not revision:
        return Undo(refused=f"{name} has no previous revision to go back to")
    previous = _recorded_spec(find("ControllerRevision", controller_revision_name_for(name, revision)), deployment)
    if previous is None:
        return Undo(revision=revision, refused=f"revision {revision} of {name} is not recorded; cannot undo")
    if previous == dict(spec):
        return Undo(revision=revision, refused=f"{name} already runs the spec of revision {revision}")
    return Undo(revision=revision, spec=previous)


def _recorded_spec(
    controller_revision: Mapping[str, Any] | None, deployment: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    record = read_controller_revision(controller_revision) if controller_revision is not None else None
    if record is not None:
        return dict(record.spec)
    text = (((deployment or {}).get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC)
    try:
        spec = decode_spec(text or "")
    except ValueError:
        return None
    return spec if isinstance(spec, dict) else None


def answer_patch(resource_version: str, undo: Undo) -> list[dict[str, Any]]:
    """The JSON patch that answers an undo request: only over the agent the decision was made on
    (the API server answers 409 to another resourceVersion), the annotation removed, and the
    spec replaced whole when there is one to put back (a merge patch would keep fields the old
    spec did not have)."""
    ops: list[dict[str, Any]] = [
        {"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version},
        {"op": "remove", "path": "/metadata/annotations/" + ANNOTATION_UNDO.replace("~", "~0").replace("/", "~1")},
    ]
    if undo.spec is not None:
        ops.append({"op": "replace", "path": "/spec", "value": dict(undo.spec)})
    return ops
