"""The active and preview Services. Which colour each selects is the rollout's decision."""

from __future__ import annotations

from agent_contract.layout import SERVICE_PORT
from agent_operator.render.common import (
    LABEL_SERVICE_ROLE,
    Manifest,
    active_service_name,
    metadata,
    preview_service_name,
    selector_labels,
)
from agent_operator.spec import Color, EnterpriseAgent


def build_service(agent: EnterpriseAgent, role: str, color: Color) -> Manifest:
    """``role`` is "active" (production traffic) or "preview" (the colour under analysis)."""
    name = active_service_name(agent) if role == "active" else preview_service_name(agent)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(agent, name, {LABEL_SERVICE_ROLE: role}),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(agent, color),
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}
            ],
        },
    }


def build_service_monitor(agent: EnterpriseAgent) -> Manifest:
    """A Prometheus Operator ServiceMonitor scraping every colour through the agent's pods."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(agent, agent.name),
        "spec": {
            "selector": {"matchLabels": {**selector_labels(agent), LABEL_SERVICE_ROLE: "active"}},
            "endpoints": [
                {"port": "http", "path": "/metrics", "interval": agent.spec.observability.service_monitor.interval}
            ],
        },
    }
