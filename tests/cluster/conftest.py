"""The cluster the integration and e2e tests run against.

If KUBECONFIG points at a cluster that answers (kind, a real one), the tests use it. Otherwise
they bring up the project's local control plane once per test run and tear it down at the end.
Either way the tests reach it only through a kubeconfig, as any client would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from eao_devtools.cluster import Cluster, ensure_binaries
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess
from tests.helpers import CRD_FILE


def _external_cluster(kubectl: str) -> Path | None:
    configured = os.environ.get("KUBECONFIG")
    if not configured:
        return None
    probe = subprocess.run(
        [kubectl, f"--kubeconfig={configured}", "get", "--raw=/readyz"], capture_output=True, timeout=15, check=False
    )
    return Path(configured) if probe.returncode == 0 else None


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    kubectl = str(ensure_binaries() / "kubectl")
    external = _external_cluster(shutil.which("kubectl") or kubectl)
    if external is not None:
        yield Kube(external, shutil.which("kubectl") or kubectl, None)
        return
    cluster = Cluster(tmp_path_factory.mktemp("control-plane"))
    cluster.up()
    try:
        yield Kube(cluster.kubeconfig, kubectl, cluster)
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def crd_installed(kube: Kube) -> Kube:
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    kube.wait_established("enterpriseagents.agents.enterprise.io", resource="ea")
    return kube


def temporary_namespace(kube: Kube, prefix: str) -> Iterator[str]:
    """A fresh namespace, deleted afterwards (without waiting for it to go)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A namespace per test, watched by the session operator (t-*)."""
    yield from temporary_namespace(kube, "t")


@pytest.fixture(scope="session")
def operator(crd_installed: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """One operator for the test run, watching the test namespaces (t-*)."""
    process = OperatorProcess(
        crd_installed.kubeconfig,
        tmp_path_factory.mktemp("operator") / "operator.log",
        namespaces=["t-*"],
        lease_namespace="default",
        lease_name="eao-tests",
        lease_seconds=6,
    ).start()
    try:
        yield process
    finally:
        process.stop()
