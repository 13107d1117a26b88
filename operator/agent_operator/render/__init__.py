"""Pure builders: an EnterpriseAgent (plus the operator's decisions) in, child manifests out.

Nothing here does I/O or imports the kubernetes client; every function returns plain dicts, so
the whole desired state can be computed, diffed and tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent_operator.render.common import Manifest, label_selector_string, selector_labels, stable_hash
from agent_operator.render.keys import KeyVersions, build_key_secret
from agent_operator.render.policy import build_hpa, build_network_policy, build_pdb, build_service_account
from agent_operator.render.runtime_config import build_config_map, build_runtime_config
from agent_operator.render.services import build_service, build_service_monitor
from agent_operator.render.workload import build_deployment, build_pod_template
from agent_operator.spec import Color, EnterpriseAgent

DEFAULT_OPERATOR_NAMESPACE = "enterprise-agent-system"


def compute_revision(agent: EnterpriseAgent, keys: KeyVersions) -> str:
    """A hash over everything that must start a rollout: the pod template (image, env, resources,
    scheduling), the runtime config and the key versions. Replicas, autoscaling, rollout and
    network settings are left out: changing them does not replace pods."""
    return stable_hash(
        {
            "podTemplate": build_pod_template(agent, revision="", color=None),
            "runtimeConfig": build_runtime_config(agent).to_yaml(),
            "keys": keys.fingerprint(),
        }
    )


@dataclass(frozen=True)
class ColorPlan:
    """One colour's Deployment: the revision it runs and its replica count."""

    color: Color
    replicas: int


@dataclass(frozen=True)
class RenderPlan:
    """The operator's decisions that the spec alone does not determine."""

    active: ColorPlan
    preview: ColorPlan | None = None
    keys: KeyVersions = field(default_factory=KeyVersions)
    key_data: dict[str, str] | None = None
    key_rotated_for: str | None = None
    operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE

    @classmethod
    def initial(
        cls,
        agent: EnterpriseAgent,
        keys: KeyVersions | None = None,
        operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE,
    ) -> RenderPlan:
        """The plan for a new agent: blue is active at spec.replicas, nothing in preview."""
        return cls(
            active=ColorPlan(Color.BLUE, agent.spec.replicas),
            keys=keys or KeyVersions(),
            operator_namespace=operator_namespace,
        )


def active_selector(agent: EnterpriseAgent, color: Color) -> str:
    """status.selector: the active colour's pods, which the HPA reads through the scale subresource."""
    return label_selector_string(selector_labels(agent, color))


def build_children(agent: EnterpriseAgent, plan: RenderPlan) -> list[Manifest]:
    """Every child of the agent for the current spec. Each Deployment renders the current
    revision; keeping an old colour on its old template during a rollout is the rollout's job."""
    revision = compute_revision(agent, plan.keys)
    config = build_runtime_config(agent)
    preview_color = plan.preview.color if plan.preview else plan.active.color
    children: list[Manifest] = [
        build_service_account(agent),
        build_key_secret(agent, plan.key_data, plan.key_rotated_for),
        build_config_map(agent, config, revision),
        build_deployment(agent, plan.active.color, revision, plan.active.replicas),
    ]
    if plan.preview is not None:
        children.append(build_deployment(agent, plan.preview.color, revision, plan.preview.replicas))
    children += [
        build_service(agent, "active", plan.active.color),
        build_service(agent, "preview", preview_color),
        build_pdb(agent),
    ]
    if agent.spec.autoscaling.enabled:
        children.append(build_hpa(agent))
    if agent.spec.network_policy.enabled:
        children.append(build_network_policy(agent, plan.operator_namespace))
    if agent.spec.observability.service_monitor.enabled:
        children.append(build_service_monitor(agent))
    return children


__all__ = [
    "ColorPlan",
    "KeyVersions",
    "Manifest",
    "RenderPlan",
    "active_selector",
    "build_children",
    "compute_revision",
]
