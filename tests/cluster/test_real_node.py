"""A real node (kubelet, containerd, runc, the CNI bridge, kube-proxy): a container really runs, the
API server reaches its kubelet, and `cluster down` gives the host back exactly as it was."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path

import pytest

from eao_devtools.cluster import Cluster
from eao_devtools.hoststate import HostSnapshot
from eao_devtools.node import BRIDGE, CONTAINERD_SOCKET, K8S_NAMESPACE, NODE_NAME, PAUSE_IMAGE, POD_CIDR

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="a real node needs root (bridge, mounts, netfilter)"),
]

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "holds-namespaces", "namespace": "default"},
    "spec": {
        "containers": [{"name": "pause", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}],
        "terminationGracePeriodSeconds": 1,
    },
}


def test_a_pod_really_runs_and_down_leaves_nothing_behind(tmp_path: Path) -> None:
    before = HostSnapshot.capture()
    cluster = Cluster(tmp_path / "real")
    cluster.up(real_node=True)
    try:
        nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        assert [n["metadata"]["name"] for n in nodes] == [NODE_NAME]  # no simulated node to land on
        cluster.kubectl("apply", "-f", "-", input_text=json.dumps(POD))
        cluster.kubectl("wait", "--for=condition=Ready", "pod/holds-namespaces", "--timeout=90s")
        pod = json.loads(cluster.kubectl("get", "pod", "holds-namespaces", "-o", "json").stdout)
        assert pod["spec"]["nodeName"] == NODE_NAME
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(POD_CIDR)
        # The container is a process containerd runs, not a status someone wrote.
        tasks = subprocess.run(
            ["ctr", f"--address={CONTAINERD_SOCKET}", "-n", K8S_NAMESPACE, "tasks", "list"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        running = [line for line in tasks.splitlines()[1:] if "RUNNING" in line]
        assert len(running) >= 2, tasks  # the sandbox and the container
        pid = int(running[0].split()[1])
        assert Path(f"/proc/{pid}").exists()
        # The API server reaches the kubelet with its client certificate (logs, exec, port-forward).
        assert cluster.kubectl("logs", "holds-namespaces", check=False).returncode == 0
    finally:
        cluster.down()
    assert before.leftovers(cluster.node.mount_prefixes) == []
    assert subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True, check=False).returncode != 0
    assert not any(cluster.running().values())
