"""A slow rollout analysis (a smoke call may be given up to 600 s) must not hold the workers that
repair other agents."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess
from tests.cluster.agents import apply, get, wait_phase, wait_until

pytestmark = pytest.mark.cluster

V2 = "registry.example/enterprise-agent-runtime:0.2.0"


def test_an_analysis_that_hangs_does_not_starve_drift_repair_of_other_agents(
    fault_cluster: Kube, fault_namespace: str, tmp_path: Path
) -> None:
    kube, ns = fault_cluster, fault_namespace
    # Accepts connections (the kernel does) and never answers: every check waits for its timeout.
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:
        operator = OperatorProcess(
            kube.kubeconfig, tmp_path / "operator.log", namespaces=[ns], lease_namespace=ns, lease_name="eao-slow",
            lease_seconds=6, resync_seconds=3.0,
            extra_args=("--workers=1", f"--analysis-base-url=http://127.0.0.1:{silent.getsockname()[1]}"),
        ).start()  # fmt: skip
        try:
            apply(kube, agent_manifest(ns, name="other"))
            apply(kube, agent_manifest(ns, name="slow"))
            wait_phase(kube, ns, "other", "Ready")
            wait_phase(kube, ns, "slow", "Ready")
            smoke = {"operation": "analyze_data", "timeoutSeconds": 300}
            rollout = {"analysis": {"windowSeconds": 0, "smoke": smoke}, "scaleDownDelaySeconds": 0}
            apply(kube, agent_manifest(ns, name="slow", image=V2, rollout=rollout))
            wait_until(
                lambda: (
                    ((get(kube, ns, "ea", "slow") or {}).get("status") or {}).get("rollout", {}).get("step")
                    == "Analysis"
                ),
                what="the slow agent's analysis under way",
            )
            kube.kubectl("delete", "networkpolicy", "other", "-n", ns)
            # One worker, and the analysis would hold it for 5 + 5 + 300 s: repaired only if it does not.
            wait_until(lambda: get(kube, ns, "networkpolicy", "other"), timeout=30, what="the other agent repaired")
            slow = get(kube, ns, "ea", "slow") or {}
            assert slow["status"]["rollout"]["step"] == "Analysis"  # still measuring, nothing decided on a guess
            assert slow["status"]["activeColor"] == "blue"  # traffic has not moved
        finally:
            operator.stop()
