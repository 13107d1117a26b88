"""The key Secret is the first thing an agent needs; a quota that refuses it is said in the status."""

from __future__ import annotations

from pathlib import Path

import pytest

from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from tests.cluster.agents import apply, condition, wait_phase
from tests.faults.conftest import create_quota, start_operator

pytestmark = pytest.mark.cluster


def test_a_quota_that_refuses_the_key_secret_is_stalled_then_converges(
    fault_cluster: Kube, fault_namespace: str, tmp_path: Path
) -> None:
    kube, ns = fault_cluster, fault_namespace
    create_quota(kube, ns, "no-secrets", "secrets=0")
    operator = start_operator(kube, tmp_path, ns)
    try:
        apply(kube, agent_manifest(ns, name="keyless"))
        stalled = condition(wait_phase(kube, ns, "keyless", "Stalled"), "Stalled")
        assert stalled["reason"] == "Forbidden"
        assert stalled["message"].startswith("spec: Secret keyless-keys: 403")
        kube.kubectl("delete", "quota", "no-secrets", "-n", ns)
        assert condition(wait_phase(kube, ns, "keyless", "Ready", timeout=90), "Stalled")["status"] == "False"
    finally:
        operator.stop()
