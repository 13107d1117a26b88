"""A CRD and its first agent applied together (``make run``, one Argo CD sync): for up to 30 s the
API server refuses the agent's children, because its OwnerReferencesPermissionEnforcement admission
maps ownerReference kinds with a discovery cache it refreshes every 30 s. The operator waits that
out without reporting the agent Stalled. The operator runs with the chart's RBAC, as in a cluster:
a cluster-admin never meets this (the admission lets those who may update every finalizer pass
without mapping the kind)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent_operator.kinds import AGENT
from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from tests.cluster.agents import apply, get, wait_until
from tests.faults.conftest import OperatorAccount, start_operator
from tests.helpers import CRD_FILE

pytestmark = pytest.mark.cluster

CRD_NAME = "enterpriseagents.agents.enterprise.io"


def _owned_config_map(namespace: str) -> dict[str, Any]:
    """A ConfigMap owned by an agent, blocking its deletion: what the gc admission maps."""
    owner = {"apiVersion": AGENT.api_version, "kind": AGENT.kind, "name": "probe",
             "uid": "00000000-0000-0000-0000-000000000001", "blockOwnerDeletion": True}  # fmt: skip
    metadata = {"name": "mapping-probe", "namespace": namespace, "ownerReferences": [owner]}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}


def _admission_maps_agents(kube: Kube, namespace: str, user: str) -> bool:
    """Whether the API server's admission can map kind EnterpriseAgent for ``user`` now (a
    server-side dry run, impersonating it)."""
    probe = json.dumps(_owned_config_map(namespace))
    result = kube.kubectl("create", f"--as={user}", "--dry-run=server", "-f", "-", stdin=probe, check=False)
    if result.returncode == 0:
        return True
    assert "cannot find RESTMapping" in result.stderr, result.stderr  # refused for that, nothing else
    return False


def test_an_agent_applied_with_its_new_crd_waits_for_discovery_and_is_never_stalled(
    fault_cluster: Kube, fault_namespace: str, tmp_path: Path, operator_account: OperatorAccount
) -> None:
    kube, ns = fault_cluster, fault_namespace
    user, kubeconfig = operator_account.user, operator_account.kubeconfig({"token": operator_account.token()})
    assert _admission_maps_agents(kube, ns, user)
    try:
        kube.kubectl("delete", "crd", CRD_NAME, "--timeout=90s")
        # The first refusal marks one of the API server's refreshes: the next is 30 s away, which
        # is when an agent applied with the CRD installed again could first be written.
        wait_until(
            lambda: not _admission_maps_agents(kube, ns, user), timeout=60, interval=0.2,
            what="the API server's admission forgetting kind EnterpriseAgent",
        )  # fmt: skip
    finally:
        kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
        kube.wait_established(CRD_NAME, resource="ea")
    assert not _admission_maps_agents(kube, ns, user)  # the lag the operator meets
    apply(kube, agent_manifest(ns, name="early"))
    operator = start_operator(kube, tmp_path, ns, kubeconfig=kubeconfig)
    try:
        seen: list[dict[str, Any]] = []

        def ready() -> bool:
            status = (get(kube, ns, "ea", "early") or {}).get("status") or {}
            if status:
                seen.append(status)
            return status.get("phase") == "Ready"

        wait_until(ready, timeout=120, interval=0.2, what="agent early Ready")
    finally:
        operator.stop()
    phases = [status.get("phase") for status in seen]
    assert "Stalled" not in phases, phases
    stalled = [c for status in seen for c in status.get("conditions", []) if c["type"] == "Stalled"]
    assert all(c["status"] == "False" for c in stalled), stalled
    waiting = [
        s for s in seen if "waiting for the API server to recognise kind EnterpriseAgent" in s.get("message", "")
    ]
    assert waiting, f"the wait was never reported; statuses seen: {phases}"
    assert waiting[0]["phase"] == "Pending"
    assert "cannot find RESTMapping" in waiting[0]["message"]
