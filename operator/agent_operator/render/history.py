"""Revisions, kept where Kubernetes keeps them: one ControllerRevision per revision of an agent.

A revision names the user's input only: the spec fields that replace pods, as the user wrote them
(the defaults this operator version fills in do not count), the key versions, and what the Secrets
and ConfigMaps the spec references hold (render/references.py). What a revision
renders to is captured once, when it is first rendered, in a :class:`RevisionRecord`: the user's
spec, the pod template of each colour and the runtime config. That record is written as a
ControllerRevision (``<agent>-<revision>``) and every later render of the revision reads it back,
so a newer renderer never changes a revision's pods or its immutable ConfigMap, and a deleted
Deployment or ConfigMap comes back exactly as it was (as StatefulSets and DaemonSets keep theirs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import BaseModel

from agent_operator.render.common import LABEL_REVISION, Manifest, fingerprint, metadata, stable_hash
from agent_operator.render.keys import KeyVersions
from agent_operator.render.runtime_config import build_runtime_config
from agent_operator.render.workload import build_pod_template
from agent_operator.spec import GROUP, Color, EnterpriseAgent, EnterpriseAgentSpec

# The spec's hash over the user's input, on the ControllerRevision; its name is the revision.
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"
# Revisions kept beyond those in use (the colours', status's and the current spec's): what
# `kubectl ea undo` and a spec put back can still find, as a Deployment's revisionHistoryLimit.
REVISION_HISTORY_LIMIT = 3

# Spec fields that never replace pods: changing them scales, reroutes or re-times, and starts no
# rollout. (Of the network settings, allowedEgressHosts is enforced by the runtime: it counts.)
_NOT_REVISION_FIELDS: dict[str, Any] = {
    "replicas": True,
    "autoscaling": True,
    "disruption_budget": True,
    "rollout": True,
    "observability": {"service_monitor": True},
    "network_policy": {
        "enabled": True,
        "allowed_ingress_namespaces": True,
        "allowed_ingress_pod_labels": True,
        "allowed_egress_cidrs": True,
        "egress_ports": True,
    },
    "state": {"postgres": {"egress": True}},
    "model": {"egress_cidrs": True},  # the NetworkPolicy's only
}


def with_revision_fields_of(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` (a spec as the API holds it, JSON names) with every field that makes a revision
    taken from ``recorded`` (an earlier revision's spec) and the rest kept: what undo writes, so
    putting a revision back never reverts replicas, autoscaling or a tightened NetworkPolicy."""
    return _merge_revision_fields(recorded, current, EnterpriseAgentSpec, _NOT_REVISION_FIELDS)


def _merge_revision_fields(
    recorded: Mapping[str, Any], current: Mapping[str, Any], model: type[BaseModel], kept: Mapping[str, Any]
) -> dict[str, Any]:
    merged = dict(recorded)
    for name, inner in kept.items():
        info = model.model_fields[name]
        key = info.alias or name
        if inner is True:
            if key in current:
                merged[key] = current[key]
            else:
                merged.pop(key, None)
            continue
        (inner_model,) = [t for t in (info.annotation, *get_args(info.annotation)) if _is_model(t)]
        old, new = recorded.get(key), current.get(key)
        if not isinstance(old, Mapping) and (type(None) in get_args(info.annotation) or not isinstance(new, Mapping)):
            # An optional section the revision did not have (spec.model, spec.state.postgres): its
            # kept fields (the NetworkPolicy's CIDRs) mean nothing without it.
            merged.pop(key, None)
            continue
        merged[key] = _merge_revision_fields(
            old if isinstance(old, Mapping) else {}, new if isinstance(new, Mapping) else {}, inner_model, inner
        )
        if not merged[key] and not isinstance(old, Mapping):
            merged.pop(key)  # a section only the kept fields filled, now without them
    return merged


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def revision_input(agent: EnterpriseAgent) -> dict[str, Any]:
    """The spec fields that replace pods, canonical: a field at its default is left out, so a
    default written out by the user (or by the API server, from the CRD) hashes as one left out,
    and a field or default added by a newer operator changes no existing revision."""
    data: dict[str, Any] = agent.spec.model_dump(
        mode="json", by_alias=True, exclude_defaults=True, exclude=_NOT_REVISION_FIELDS
    )
    return data


def compute_revision(agent: EnterpriseAgent, keys: KeyVersions, references: str | None = None) -> str:
    """The revision of the user's input: the spec fields that replace pods, the key versions and
    ``references``, the digest of what the referenced Secrets and ConfigMaps hold
    (references.content_digest; None when the spec references none, so the revision of such an
    agent is what it was before that content counted). Nothing the operator renders takes part,
    so an operator upgrade alone never changes it."""
    data: dict[str, Any] = {"spec": revision_input(agent), "keys": keys.fingerprint()}
    if references is not None:
        data["references"] = references
    return stable_hash(data)


@dataclass(frozen=True)
class RevisionRecord:
    """What one revision needs to be rendered again exactly: the user's spec (JSON, as written),
    each colour's pod template and the runtime config (YAML), all as first rendered. ``number``
    orders revisions (ControllerRevision.revision); 0 until the record is first written."""

    revision: str
    spec_hash: str
    spec: Mapping[str, Any]
    pod_templates: Mapping[str, Manifest]
    runtime_config: str
    number: int = 0

    def pod_template(self, color: Color) -> Manifest:
        return dict(self.pod_templates[color.value])

    def fingerprint(self) -> bytes:
        """Equal for records that render the same: what a memo keeps instead of the record."""
        fields = (self.revision, self.spec_hash, self.spec, self.pod_templates, self.runtime_config, self.number)
        return fingerprint(fields)


def first_render(agent: EnterpriseAgent, revision: str, spec_hash: str | None = None) -> RevisionRecord:
    """The record of a revision rendered now, from ``agent``'s spec, by this operator version."""
    return RevisionRecord(
        revision=revision,
        spec_hash=spec_hash if spec_hash is not None else revision,
        spec=agent.spec.model_dump(by_alias=True, mode="json", exclude_unset=True),
        pod_templates={color.value: build_pod_template(agent, revision, color) for color in Color},
        runtime_config=build_runtime_config(agent).to_yaml(),
    )


def controller_revision_name(agent: EnterpriseAgent, revision: str) -> str:
    return controller_revision_name_for(agent.name, revision)


def controller_revision_name_for(agent_name: str, revision: str) -> str:
    return f"{agent_name}-{revision}"


def build_controller_revision(agent: EnterpriseAgent, record: RevisionRecord) -> Manifest:
    """The ControllerRevision that keeps ``record``. Its data never changes once written (the API
    server refuses that); only its labels and its number may."""
    meta = metadata(agent, controller_revision_name(agent, record.revision), {LABEL_REVISION: record.revision})
    meta["annotations"] = {ANNOTATION_SPEC_HASH: record.spec_hash}
    return {
        "apiVersion": "apps/v1",
        "kind": "ControllerRevision",
        "metadata": meta,
        "revision": record.number,
        "data": {
            "spec": dict(record.spec),
            "podTemplates": {color: dict(template) for color, template in record.pod_templates.items()},
            "runtimeConfig": record.runtime_config,
        },
    }


def read_controller_revision(manifest: Mapping[str, Any]) -> RevisionRecord | None:
    """The record a ControllerRevision keeps, or None when it is not one this operator wrote."""
    meta = manifest.get("metadata") or {}
    revision = (meta.get("labels") or {}).get(LABEL_REVISION)
    data = manifest.get("data")
    if not isinstance(revision, str) or not revision or not isinstance(data, Mapping):
        return None
    spec, templates, config = data.get("spec"), data.get("podTemplates"), data.get("runtimeConfig")
    if not isinstance(spec, Mapping) or not isinstance(templates, Mapping) or not isinstance(config, str):
        return None
    if not all(isinstance(templates.get(color.value), Mapping) for color in Color):
        return None
    number = manifest.get("revision")
    return RevisionRecord(
        revision=revision,
        spec_hash=str((meta.get("annotations") or {}).get(ANNOTATION_SPEC_HASH) or ""),
        spec=dict(spec),
        pod_templates={color.value: dict(templates[color.value]) for color in Color},
        runtime_config=config,
        number=number if isinstance(number, int) and not isinstance(number, bool) else 0,
    )
