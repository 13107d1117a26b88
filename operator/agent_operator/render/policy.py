"""Scaling, disruption, identity and network policy of an agent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent_contract.layout import RUNTIME_PORT
from agent_operator.render.common import (
    Manifest,
    metadata,
    selector_labels,
    service_account_name,
)
from agent_operator.spec import API_VERSION, KIND, DatabaseEgress, EnterpriseAgent, ScalingRules


def _rules(rules: ScalingRules) -> dict[str, Any]:
    return {
        "stabilizationWindowSeconds": rules.stabilization_window_seconds,
        "selectPolicy": rules.select_policy.value,
        "policies": [
            {"type": p.type.value, "value": p.value, "periodSeconds": p.period_seconds} for p in rules.policies
        ],
    }


def build_hpa(agent: EnterpriseAgent) -> Manifest:
    """The HPA targets the EnterpriseAgent's scale subresource, so a colour switch never retargets it."""
    scaling = agent.spec.autoscaling
    metrics: list[dict[str, Any]] = [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_utilization},
            },
        }
    ]
    if scaling.target_memory_utilization is not None:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "memory",
                    "target": {"type": "Utilization", "averageUtilization": scaling.target_memory_utilization},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(agent, agent.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": agent.name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": metrics,
            "behavior": {
                "scaleUp": _rules(scaling.behavior.scale_up),
                "scaleDown": _rules(scaling.behavior.scale_down),
            },
        },
    }


def build_pdb(agent: EnterpriseAgent) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(agent, agent.name),
        "spec": {
            "maxUnavailable": agent.spec.disruption_budget.max_unavailable,
            "selector": {"matchLabels": selector_labels(agent)},
            # Pods that are not ready yet may be evicted; it keeps drains from sticking on a bad rollout.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def build_service_account(agent: EnterpriseAgent) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(agent, service_account_name(agent)),
        "automountServiceAccountToken": False,
    }


def _label_selector(labels: Mapping[str, str]) -> dict[str, Any]:
    """A selector on ``labels``; ``{}`` (everything) when there are none. Never an empty
    matchLabels, which the API server drops and the drift comparison would then see missing."""
    return {"matchLabels": dict(labels)} if labels else {}


def _database_peers(egress: DatabaseEgress) -> list[dict[str, Any]]:
    """spec.state.postgres.egress as NetworkPolicy peers: an ipBlock per CIDR, and the selectors
    together as one peer (pods matching podSelector in namespaces matching namespaceSelector)."""
    peers: list[dict[str, Any]] = [{"ipBlock": {"cidr": cidr}} for cidr in egress.cidrs]
    selectors: dict[str, Any] = {}
    if egress.namespace_selector is not None:
        selectors["namespaceSelector"] = _label_selector(egress.namespace_selector)
    if egress.pod_selector is not None:
        selectors["podSelector"] = _label_selector(egress.pod_selector)
    if selectors:
        peers.append(selectors)
    return peers


def build_network_policy(agent: EnterpriseAgent, operator_namespace: str) -> Manifest:
    """Default deny; allows callers from the listed places, DNS, the listed egress CIDRs, the model
    endpoint (its IP address or spec.model.egressCIDRs, on its port) and the shared-state database
    (spec.state.postgres.egress)."""
    policy = agent.spec.network_policy
    same_namespace_peer: dict[str, Any] = {"podSelector": _label_selector(policy.allowed_ingress_pod_labels)}
    callers = sorted({*policy.allowed_ingress_namespaces, operator_namespace} - {agent.namespace})
    peers: list[dict[str, Any]] = [same_namespace_peer]
    if callers:
        peers.append(
            {
                "namespaceSelector": {
                    "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": callers}]
                }
            }
        )
    egress: list[dict[str, Any]] = [
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
    ]
    if policy.allowed_egress_cidrs:
        to_cidrs: dict[str, Any] = {"to": [{"ipBlock": {"cidr": cidr}} for cidr in policy.allowed_egress_cidrs]}
        if policy.egress_ports:  # no ports: every port, as the API server reads an empty list too
            to_cidrs["ports"] = [{"protocol": "TCP", "port": port} for port in policy.egress_ports]
        egress.append(to_cidrs)
    model = agent.spec.model
    if model is not None and (model_cidrs := model.endpoint_cidrs()):
        egress.append(
            {
                "to": [{"ipBlock": {"cidr": cidr}} for cidr in model_cidrs],
                "ports": [{"protocol": "TCP", "port": model.port}],
            }
        )
    postgres = agent.spec.state.postgres
    if postgres is not None and postgres.egress is not None:
        egress.append(
            {"to": _database_peers(postgres.egress), "ports": [{"protocol": "TCP", "port": postgres.egress.port}]}
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(agent, agent.name),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(agent)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": RUNTIME_PORT}]}],
            "egress": egress,
        },
    }
