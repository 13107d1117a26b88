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
        deadline = time.monotonic() + 30
        established = ("wait", "--for=condition=Established", "crd/enterpriseagents.agents.enterprise.io")
        # Until the CRD has conditions at all, kubectl wait fails at once instead of waiting.
        while kube.kubectl(*established, check=False).returncode != 0:
            assert time.monotonic() < deadline, "the CRD was never Established"
            time.sleep(0.2)
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
    kube: Kube,
    tmp_path: Path,
    namespace: str,
    name: str = "operator",
    kubeconfig: Path | None = None,
    resync_seconds: float = 3.0,
    extra_args: tuple[str, ...] = (),
    lease_namespace: str | None = None,
) -> OperatorProcess:
    """An operator watching one namespace, with a Lease of its own (tests share no leader): in that
    namespace, unless the test deletes it."""
    return OperatorProcess(
        kubeconfig or kube.kubeconfig, tmp_path / f"{name}.log", namespaces=[namespace],
        lease_namespace=lease_namespace or namespace,
        lease_name=f"eao-faults-{namespace}" if lease_namespace else "eao-faults", lease_seconds=6, resync_seconds=resync_seconds, extra_args=extra_args,
    ).start()  # fmt: skip
