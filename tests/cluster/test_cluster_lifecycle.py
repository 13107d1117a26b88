"""`cluster up` and `cluster down` of a second, throwaway control plane: clean stops, clear failures."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from eao_devtools import cluster as cluster_module
from eao_devtools.cluster import Cluster, ClusterError

pytestmark = pytest.mark.cluster


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # As a server binds: connections left in TIME_WAIT do not hold the port, a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_down_stops_everything_and_frees_the_ports(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "cp")
    timings = cluster.up(nodes=1)
    assert timings["start_seconds"] > 0
    pids = cluster.pids()
    ports = list(cluster.ports().values())
    assert all(cluster.running().values())
    assert cluster.healthy()

    stopped = cluster.down()

    assert sorted(stopped) == sorted(pids)
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    assert all(_port_is_free(port) for port in ports)
    assert not cluster.healthy()
    assert cluster.down() == []  # a second down has nothing to stop


def test_a_component_that_dies_is_named_with_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "bin"
    broken.mkdir()
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl"):
        script = broken / name
        script.write_text("#!/bin/sh\necho 'simulated failure' >&2\nexit 3\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(cluster_module, "ensure_binaries", lambda: broken)
    cluster = Cluster(tmp_path / "cp")

    with pytest.raises(ClusterError) as failure:
        cluster.up(nodes=1)

    message = str(failure.value)
    assert "etcd exited with code 3" in message
    log = cluster.logs / "etcd.log"
    assert str(log) in message
    assert "simulated failure" in log.read_text()
