"""A control plane of the fault suite's own: these tests restart the API server and stall the
operator's connections, which no other test's cluster should live through."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from eao_devtools.cluster import Cluster, ensure_binaries
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess
from tests.cluster.agents import get, wait_until
from tests.helpers import CRD_FILE
from tests.packaging.chart import render


@pytest.fixture(scope="session")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    cluster = Cluster(tmp_path_factory.mktemp("fault-control-plane"))
    cluster.up()
    kube = Kube(cluster.kubeconfig, str(ensure_binaries() / "kubectl"), cluster)
    try:
        kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
        kube.wait_established("enterpriseagents.agents.enterprise.io", resource="ea")
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


def create_quota(kube: Kube, namespace: str, name: str, hard: str) -> None:
    """A ResourceQuota that admission already holds: only once the quota controller has computed its
    status (seen taking 20 s on a loaded machine) are objects over it refused; before, they pass."""
    kube.kubectl("create", "quota", name, f"--hard={hard}", "-n", namespace)
    wait_until(
        lambda: (get(kube, namespace, "resourcequota", name) or {}).get("status", {}).get("hard"),
        timeout=60, interval=0.2, what=f"quota {name}'s status computed",
    )  # fmt: skip


RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")


@dataclass(frozen=True)
class OperatorAccount:
    """The chart's ServiceAccount, with the chart's RBAC for one watched namespace: the operator's
    identity in a cluster (a cluster-admin passes checks the operator meets)."""

    kube: Kube
    namespace: str
    name: str
    directory: Path

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    def token(self) -> str:
        return self.kube.kubectl("create", "token", self.name, "-n", self.namespace, "--duration=1h").stdout.strip()

    def kubeconfig(self, user: dict[str, Any], name: str = "operator.kubeconfig") -> Path:
        """The test cluster's kubeconfig with this kubeconfig user entry (a token, a plugin) instead."""
        config = yaml.safe_load(self.kube.kubeconfig.read_text())
        for entry in config["users"]:
            entry["user"] = user
        path = self.directory / name
        path.write_text(yaml.safe_dump(config))
        return path


@pytest.fixture
def operator_account(fault_cluster: Kube, fault_namespace: str, tmp_path: Path) -> Iterator[OperatorAccount]:
    kube, ns = fault_cluster, fault_namespace
    # Released in the watched namespace, with the Lease start_operator names.
    chart = render(None, f"watchNamespaces={{{ns}}}", "leaderElection.leaseName=eao-faults", namespace=ns)
    rbac = [o for o in chart if o["kind"] in RBAC_KINDS]
    (name,) = [o["metadata"]["name"] for o in rbac if o["kind"] == "ServiceAccount"]
    manifests = yaml.safe_dump_all(rbac)
    kube.kubectl("apply", "-f", "-", stdin=manifests)
    try:
        yield OperatorAccount(kube, ns, name, tmp_path)
    finally:
        kube.kubectl("delete", "-f", "-", "--ignore-not-found", stdin=manifests, check=False)
