"""Pure builders: an EnterpriseAgent (plus the operator's decisions) in, child manifests out.

Nothing here does I/O or imports the kubernetes client; every function returns plain dicts, so
the whole desired state can be computed, diffed and tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent_contract.config import RuntimeConfig
from agent_operator import defaults
from agent_operator.render.common import Manifest, label_selector_string, selector_labels, stable_hash
from agent_operator.render.keys import KeyVersions, build_key_secret
from agent_operator.render.policy import build_hpa, build_network_policy, build_pdb, build_service_account
from agent_operator.render.runtime_config import build_config_map, build_runtime_config
from agent_operator.render.services import build_service, build_service_monitor
from agent_operator.render.workload import build_deployment, build_pod_template
from agent_operator.spec import Color, EnterpriseAgent


def compute_revision(agent: EnterpriseAgent, keys: KeyVersions, config: RuntimeConfig | None = None) -> str:
    """A hash over everything that must start a rollout: the pod template (image, env, resources,
    scheduling), the runtime config and the key versions. Replicas, autoscaling, rollout and
    network settings are left out: changing them does not replace pods."""
    return stable_hash(
        {
            "podTemplate": build_pod_template(agent, revision="", color=None),
            "runtimeConfig": (config or build_runtime_config(agent)).to_yaml(),
            "keys": keys.fingerprint(),
        }
    )


@dataclass(frozen=True)
class ColorPlan:
    """One colour's Deployment: its replicas and, when it is not the current spec (the stable
    colour during a rollout), the spec and revision it keeps running."""

    color: Color
    replicas: int
    source: EnterpriseAgent | None = None
    revision: str | None = None


@dataclass(frozen=True)
class RenderPlan:
    """The operator's decisions that the spec alone does not determine: which colours run what,
    and which colour each Service selects."""

    deployments: tuple[ColorPlan, ...]
    active_color: Color
    preview_color: Color
    keys: KeyVersions = field(default_factory=KeyVersions)
    key_data: dict[str, str] | None = None
    key_rotated_for: str | None = None
    operator_namespace: str = defaults.OPERATOR_NAMESPACE
    # The current spec's revision and runtime config, when the caller has computed them already.
    revision: str | None = None
    runtime_config: RuntimeConfig | None = None

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
    """Every child of the agent. A colour renders the current spec unless the plan gives it
    the spec it was created from; each running revision keeps its own ConfigMap."""
    config = plan.runtime_config or build_runtime_config(agent)
    revision = plan.revision or compute_revision(agent, plan.keys, config)
    children: list[Manifest] = [
        build_service_account(agent),
        build_key_secret(agent, plan.key_data, plan.key_rotated_for),
        build_config_map(agent, config, revision),
    ]
    config_maps = {revision}
    for colour in plan.deployments:
        source = colour.source or agent
        colour_revision = colour.revision or revision
        children.append(build_deployment(source, colour.color, colour_revision, colour.replicas))
        if colour.replicas > 0 and colour_revision not in config_maps:
            config_maps.add(colour_revision)
            children.append(build_config_map(source, build_runtime_config(source), colour_revision))
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
