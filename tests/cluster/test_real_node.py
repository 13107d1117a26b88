"""A real node (kubelet, containerd, runc, the CNI bridge, kube-proxy): a container really runs, the
API server reaches its kubelet, and `cluster down` gives the host back exactly as it was."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from eao_devtools.cluster import Cluster, ClusterError
from eao_devtools.hoststate import HostSnapshot
from eao_devtools.node import (
    BRIDGE,
    CONTAINERD_SOCKET,
    HOST_CLAIM,
    K8S_NAMESPACE,
    NODE_NAME,
    PAUSE_IMAGE,
    POD_CIDR,
    put_back_abandoned_node,
)

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
    put_back_abandoned_node()  # a killed earlier run's node is not this host's own state
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
    assert not HOST_CLAIM.parent.exists()
    # The unpacked images and pod volumes (gigabytes) are gone with it; the logs stay.
    assert not (cluster.node.state_dir / "containerd").exists()
    assert not cluster.node.kubelet_root.exists()
    assert (cluster.state_dir / "logs").is_dir()


def _container_pids() -> list[int]:
    tasks = subprocess.run(
        ["ctr", f"--address={CONTAINERD_SOCKET}", "-n", K8S_NAMESPACE, "tasks", "list"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    return [int(line.split()[1]) for line in tasks.splitlines()[1:] if "RUNNING" in line]


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited; only its parent has not reaped it


def test_a_node_killed_without_down_is_put_back_by_the_next_and_a_running_one_is_not_taken(tmp_path: Path) -> None:
    """What a killed session or CI job leaves (chains, ipsets, the bridge, running containers)
    must not become the next node's idea of a clean host."""
    put_back_abandoned_node()  # a killed earlier run's node is not this host's own state
    before = HostSnapshot.capture()
    first, second = Cluster(tmp_path / "first"), Cluster(tmp_path / "second")
    first.up(real_node=True)
    try:
        first.kubectl("apply", "-f", "-", input_text=json.dumps(POD))
        first.kubectl("wait", "--for=condition=Ready", "pod/holds-namespaces", "--timeout=90s")
        orphans = _container_pids()
        assert orphans
        with pytest.raises(ClusterError, match=f"another real node runs on this host from {first.node.state_dir}"):
            second.up(real_node=True)
        assert first.healthy()  # the refused node touched nothing of the running one
        for pid in first.pids().values():  # killed the way a session's end kills it: no `down`
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while first.node.is_running() and time.monotonic() < deadline:
            time.sleep(0.1)  # SIGKILL is delivered asynchronously
        assert first.node.is_running() is False
        assert before.leftovers(first.node.mount_prefixes) != []  # the host really is dirty now
        second.up(real_node=True)
        recorded = HostSnapshot.load(second.node.snapshot_file)
        assert (recorded.firewall, recorded.ipsets, recorded.links) == (before.firewall, before.ipsets, before.links)
        assert not any(_alive(pid) for pid in orphans)  # the first node's containers
        second.kubectl("apply", "-f", "-", input_text=json.dumps(POD))
        second.kubectl("wait", "--for=condition=Ready", "pod/holds-namespaces", "--timeout=90s")
    finally:
        second.down()
        first.down()  # nothing left to undo: the second node put it back
    assert before.leftovers(first.node.mount_prefixes + second.node.mount_prefixes) == []
    assert not HOST_CLAIM.parent.exists()  # the host is free for the next node
