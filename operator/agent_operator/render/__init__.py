"""Pure builders: an EnterpriseAgent (plus the operator's decisions) in, child manifests out.

Nothing here does I/O or imports the kubernetes client; every function returns plain dicts, so
the whole desired state can be computed, diffed and tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent_operator import defaults
from agent_operator.render.common import Manifest, label_selector_string, selector_labels
from agent_operator.render.history import (
    RevisionRecord,
    build_controller_revision,
    compute_revision,
    first_render,
)
from agent_operator.render.keys import KeyVersions, build_key_secret
from agent_operator.render.policy import build_hpa, build_network_policy, build_pdb, build_service_account
from agent_operator.render.runtime_config import build_config_map
from agent_operator.render.services import build_service, build_service_monitor
from agent_operator.render.workload import build_deployment
from agent_operator.spec import Color, EnterpriseAgent


@dataclass(frozen=True)
class ColorPlan:
    """One colour's Deployment: its replicas and, when it keeps a revision other than the current
    spec's (the stable colour during a rollout), that revision's record."""

    color: Color
    replicas: int
    record: RevisionRecord | None = None


@dataclass(frozen=True)
class RenderPlan:
    """The operator's decisions that the spec alone does not determine: which colours run what,
    which colour each Service selects, and which revisions are kept."""

    deployments: tuple[ColorPlan, ...]
    active_color: Color
    preview_color: Color
    keys: KeyVersions = field(default_factory=KeyVersions)
    key_data: dict[str, str] | None = None
    key_rotated_for: str | None = None
    operator_namespace: str = defaults.OPERATOR_NAMESPACE
    # The current spec's revision as recorded (its ControllerRevision), or None to render it now.
    current: RevisionRecord | None = None
    # The revisions whose ControllerRevisions are kept, numbered; the reconciler decides them.
    history: tuple[RevisionRecord, ...] = ()

    @classmethod
    def initial(
        cls,
        agent: EnterpriseAgent,
        keys: KeyVersions | None = None,
        operator_namespace: str = defaults.OPERATOR_NAMESPACE,
    ) -> RenderPlan:
        """The plan for a new agent: blue is active at spec.replicas, nothing in preview."""
        return cls(
            deployments=(ColorPlan(Color.BLUE, agent.spec.replicas),),
            active_color=Color.BLUE,
            preview_color=Color.BLUE,
            keys=keys or KeyVersions(),
            operator_namespace=operator_namespace,
        )


def active_selector(agent: EnterpriseAgent, color: Color) -> str:
    """status.selector: the active colour's pods, which the HPA reads through the scale subresource."""
    return label_selector_string(selector_labels(agent, color))


def build_children(agent: EnterpriseAgent, plan: RenderPlan) -> list[Manifest]:
    """Every child of the agent. Each colour's Deployment and ConfigMap are rendered from its
    revision's record (the current spec's unless the plan gives another), never re-rendered; each
    running revision keeps its own ConfigMap; each kept revision its ControllerRevision."""
    current = plan.current or first_render(agent, compute_revision(agent, plan.keys))
    children: list[Manifest] = [
        build_service_account(agent),
        build_key_secret(agent, plan.key_data, plan.key_rotated_for),
        build_config_map(agent, current.runtime_config, current.revision),
    ]
    config_maps = {current.revision}
    for colour in plan.deployments:
        record = colour.record or current
        template = record.pod_template(colour.color)
        children.append(build_deployment(agent, colour.color, record.revision, colour.replicas, template, record.spec))
        if colour.replicas > 0 and record.revision not in config_maps:
            config_maps.add(record.revision)
            children.append(build_config_map(agent, record.runtime_config, record.revision))
    children += [
        build_service(agent, "active", plan.active_color),
        build_service(agent, "preview", plan.preview_color),
        build_pdb(agent),
    ]
    if agent.spec.autoscaling.enabled:
        children.append(build_hpa(agent))
    if agent.spec.network_policy.enabled:
        children.append(build_network_policy(agent, plan.operator_namespace))
    if agent.spec.observability.service_monitor.enabled:
        children.append(build_service_monitor(agent))
    children += [build_controller_revision(agent, record) for record in plan.history]
    return children


__all__ = [
    "ColorPlan",
    "KeyVersions",
    "Manifest",
    "RenderPlan",
    "RevisionRecord",
    "active_selector",
    "build_children",
    "compute_revision",
    "first_render",
]
