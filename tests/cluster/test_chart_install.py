"""The Helm chart installed into the local control plane, and the operator running with exactly
what the chart gives it.

kwok has no container runtime, so the chart's operator pods are simulated: helm --wait sees the
Deployment become Available, but the program in them does not run. The operator under test runs
beside them as a local process, as its pod would: the chart's container arguments, the chart's
ServiceAccount token and the cluster CA mounted at the in-cluster paths, KUBERNETES_SERVICE_HOST
set, uid 10001 and a read-only root with only /tmp writable (bubblewrap, see
tests/packaging/sandbox.py), from a venv built by the Dockerfile's own commands. Any right the chart's RBAC lacks shows up as a 403 and the agent
never becomes Ready.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess, free_port
from tests.cluster.agents import apply, condition, wait_phase, wait_until
from tests.gitops import assert_gitops_reads
from tests.packaging.chart import CHART, helm
from tests.packaging.sandbox import entrypoint, pod_env, sandboxed

pytestmark = pytest.mark.cluster
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def cluster_endpoint(kube: Kube) -> tuple[str, int, bytes]:
    """(host, port, CA certificate) of the API server, from the admin kubeconfig."""
    config = yaml.safe_load(kube.kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    server = urlparse(cluster["server"])
    if "certificate-authority-data" in cluster:
        ca = base64.b64decode(cluster["certificate-authority-data"])
    else:
        ca = Path(cluster["certificate-authority"]).read_bytes()
    assert server.hostname is not None
    assert server.port is not None
    return server.hostname, server.port, ca


@pytest.fixture
def agent_namespace(kube: Kube) -> Iterator[str]:
    name = f"chart-{uuid.uuid4().hex[:8]}"  # not t-*: the session operator must not manage it
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.parametrize("mode", ["namespaced", "cluster-wide"])
def test_the_installed_chart_runs_the_operator_with_its_own_rights(
    crd_installed: Kube, agent_namespace: str, mode: str, tmp_path: Path, image_venv: Path
) -> None:
    kube = crd_installed
    release = f"eao-{uuid.uuid4().hex[:6]}"
    release_namespace = f"{release}-system"
    sets = [f"watchNamespaces={{{agent_namespace}}}"] if mode == "namespaced" else []
    install = helm(
        "install", release, str(CHART), "--namespace", release_namespace, "--create-namespace",
        *[arg for s in sets for arg in ("--set", s)], "--wait", "--timeout", "180s",
        kubeconfig=kube.kubeconfig, timeout=240,
    )  # fmt: skip
    try:
        assert install.returncode == 0, install.stderr
        deployment = json.loads(kube.kubectl("get", "deployment", "-n", release_namespace, "-o", "json").stdout)[
            "items"
        ][0]
        assert deployment["status"]["availableReplicas"] == 2  # the simulated pods (kwok)
        run_operator_like_its_pod(kube, deployment, agent_namespace, mode, tmp_path, image_venv)
    finally:
        helm("uninstall", release, "--namespace", release_namespace, "--wait", kubeconfig=kube.kubeconfig)
        kube.kubectl("delete", "namespace", release_namespace, "--wait=false", check=False)


def run_operator_like_its_pod(
    kube: Kube, deployment: dict[str, Any], agent_namespace: str, mode: str, tmp_path: Path, venv_bin: Path
) -> None:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    namespace = deployment["metadata"]["namespace"]
    token = kube.kubectl("create", "token", pod["serviceAccountName"], "-n", namespace, "--duration=1h").stdout.strip()
    host, api_port, ca = cluster_endpoint(kube)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(token)
    (account / "ca.crt").write_bytes(ca)
    (account / "namespace").write_text(namespace)
    port = free_port()
    args = [a for a in container["args"] if not a.startswith("--metrics-port=")]
    # Loopback only here (the pod listens on its own IP); in cluster-wide mode, only this test's
    # namespace, since the others belong to the session's operator.
    args += [f"--metrics-port={port}", "--metrics-host=127.0.0.1"]
    if mode == "cluster-wide":
        args.append(f"--namespace={agent_namespace}")
    env = pod_env(container, {"metadata.namespace": namespace}) | {
        "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": str(api_port), "HOSTNAME": "eao-test-pod",
    }  # fmt: skip
    writable = {mount["mountPath"]: tmp_path / mount["name"] for mount in container["volumeMounts"]}
    assert list(writable) == ["/tmp"]
    command = sandboxed(
        [*entrypoint("operator"), *args], env=env, read_only={SERVICE_ACCOUNT_DIR: account}, venv_bin=venv_bin
    )
    log = tmp_path / "operator.log"
    operator = OperatorProcess.with_command(command, env={}, port=port, log_path=log).start()
    try:
        wait_until(operator.is_leader, timeout=60, what="the operator took the chart's Lease")
        apply(kube, agent_manifest(agent_namespace))
        ready = wait_phase(kube, agent_namespace, "hello-agent", "Ready", timeout=90)
        assert condition(ready, "Ready")["status"] == "True"
        assert_gitops_reads(ready, "Healthy", "Current")
        kinds = kube.kubectl("get", "deployments,services,configmaps,secrets,serviceaccounts,poddisruptionbudgets,"
                             "horizontalpodautoscalers,networkpolicies", "-n", agent_namespace, "-o", "name").stdout  # fmt: skip
        for child in ("deployment.apps/hello-agent-blue", "service/hello-agent", "secret/hello-agent-keys",
                      "networkpolicy.networking.k8s.io/hello-agent"):  # fmt: skip
            assert child in kinds.split(), kinds
        lease = json.loads(
            kube.kubectl("get", "lease", "enterprise-agent-operator", "-n", namespace, "-o", "json").stdout
        )
        assert lease["spec"]["holderIdentity"]
    finally:
        operator.stop()
    text = log.read_text()
    assert "403" not in text, text[-3000:]
    assert "Forbidden" not in text, text[-3000:]
