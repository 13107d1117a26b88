"""A control plane of the fault suite's own: these tests restart the API server and stall the
operator's connections, which no other test's cluster should live through."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from eao_devtools.cluster import Cluster, ensure_binaries
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess
from tests.helpers import CRD_FILE


@pytest.fixture(scope="session")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    cluster = Cluster(tmp_path_factory.mktemp("fault-control-plane"))
    cluster.up()
    kube = Kube(cluster.kubeconfig, str(ensure_binaries() / "kubectl"), cluster)
    try:
        kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
        kube.kubectl("wait", "--for=condition=Established", "crd/enterpriseagents.agents.enterprise.io")
        deadline = time.monotonic() + 30
        while kube.kubectl("get", "ea", "-A", check=False).returncode != 0:
            assert time.monotonic() < deadline, "EnterpriseAgent never appeared in discovery"
            time.sleep(0.2)
        yield kube
    finally:
        cluster.down()


@pytest.fixture
def fault_namespace(fault_cluster: Kube) -> Iterator[str]:
    name = f"f-{uuid.uuid4().hex[:8]}"
    fault_cluster.kubectl("create", "namespace", name)
    yield name
    fault_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def start_operator(
    kube: Kube, tmp_path: Path, namespace: str, name: str = "operator", kubeconfig: Path | None = None
) -> OperatorProcess:
    """An operator watching one namespace, with a Lease of its own there (tests share no leader)."""
    return OperatorProcess(
        kubeconfig or kube.kubeconfig, tmp_path / f"{name}.log", namespaces=[namespace], lease_namespace=namespace,
        lease_name="eao-faults", lease_seconds=6, resync_seconds=3.0,
    ).start()  # fmt: skip
