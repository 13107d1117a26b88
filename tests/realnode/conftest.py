"""A local cluster with one real node, the images built from images/Dockerfile imported into it, and
the operator installed by its Helm chart as real pods. Module-scoped: only one real node fits on a
host (one bridge, one containerd), so each module brings its own and gives the host back."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from eao_devtools.cluster import Cluster, ensure_binaries
from eao_devtools.hoststate import HostSnapshot
from eao_devtools.node import put_back_abandoned_node
from eao_devtools.testkit.kube import Kube
from tests.cluster.agents import wait_until
from tests.packaging.chart import CHART, helm

OPERATOR_NAMESPACE = "eao-system"
RELEASE = "eao"
requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="a real node needs root (bridge, mounts, netfilter)")


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    put_back_abandoned_node()  # a killed earlier run's node is not this host's own state
    before = HostSnapshot.capture()
    cluster = Cluster(tmp_path_factory.mktemp("real-node"))
    cluster.up(real_node=True)
    try:
        yield Kube(cluster.kubeconfig, str(ensure_binaries() / "kubectl"), cluster)
    finally:
        cluster.down()
    assert before.leftovers(cluster.node.mount_prefixes) == []


@pytest.fixture(scope="module")
def chart_operator(real_cluster: Kube) -> Kube:
    """The chart installed as a user installs it: default values, its image, two replicas."""
    install = helm(
        "install", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
        "--wait", "--timeout", "180s", kubeconfig=real_cluster.kubeconfig, timeout=240,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    return real_cluster


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed real-node test carries what a person would look at next: the agents' status, the
    events and pods of the namespaces, and the operator pods' logs (a flake seen once in CI is
    otherwise gone with its cluster)."""
    report = yield
    kube = getattr(item, "funcargs", {}).get("chart_operator")
    if report.when == "call" and report.failed and isinstance(kube, Kube):
        try:
            diagnostics = cluster_diagnostics(kube)
        except Exception as error:  # a broken cluster must not turn the failure into an INTERNALERROR
            diagnostics = f"could not gather them: {error!r}"
        report.sections.append(("real-node diagnostics", diagnostics))
    return report


def cluster_diagnostics(kube: Kube) -> str:
    def run(*args: str) -> str:
        try:
            result = kube.kubectl(*args, check=False, timeout=30)
        except subprocess.TimeoutExpired:
            return f"kubectl {' '.join(args)}: timed out\n"
        return f"$ kubectl {' '.join(args)}\n{result.stdout}{result.stderr}\n"

    parts = [
        run("get", "enterpriseagents", "-A", "-o", "yaml"),
        run("get", "pods,deployments,replicasets", "-A", "-o", "wide"),
        run("get", "events", "-A", "--sort-by=.lastTimestamp"),
    ]
    for pod in pods(kube, OPERATOR_NAMESPACE, "app.kubernetes.io/name=enterprise-agent-operator"):
        parts.append(run("logs", "-n", OPERATOR_NAMESPACE, pod["metadata"]["name"], "--tail=400"))
    return "".join(parts)


def pods(kube: Kube, namespace: str, selector: str) -> list[dict[str, Any]]:
    listing = kube.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(listing)["items"]
    return items


def restarts(pod: dict[str, Any]) -> int:
    return sum(int(status.get("restartCount", 0)) for status in pod["status"].get("containerStatuses", []))


def exec_python(
    kube: Kube, namespace: str, pod: str, code: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Python run inside a container of the pod (the images carry python and no shell tools we rely on)."""
    return kube.kubectl("exec", "-n", namespace, pod, "--", "python", "-c", code, check=False, timeout=timeout)


def can_connect(kube: Kube, namespace: str, pod: str, host: str, port: int, seconds: float = 3) -> bool:
    code = (
        "import socket,sys\n"
        f"try:\n socket.create_connection(({host!r}, {port}), timeout={seconds}).close()\n"
        "except OSError as e:\n print(type(e).__name__, e); sys.exit(3)\n"
    )
    result = exec_python(kube, namespace, pod, code)
    assert result.returncode in (0, 3), result.stderr  # anything else is the exec failing, not the network
    return result.returncode == 0


def cluster_ip(kube: Kube, namespace: str, service: str) -> str:
    return kube.kubectl("get", "service", service, "-n", namespace, "-o", "jsonpath={.spec.clusterIP}").stdout


@dataclass
class LoadResult:
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def failed(self) -> int:
        return self.total - self.statuses["200"]


class SteadyLoad:
    """Clients on the node sending steady requests to a URL, each on a new connection (as a client
    behind a Service does across a switch); every outcome is counted by status or error."""

    def __init__(self, url: str, body: bytes, token: str, clients: int = 4, pause: float = 0.02) -> None:
        self.url, self.body, self.token, self.pause = url, body, token, pause
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _once(self) -> str:
        request = urllib.request.Request(
            self.url, data=self.body, method="POST",
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
                return str(response.status)
        except urllib.error.HTTPError as error:
            return str(error.code)
        except urllib.error.URLError as error:  # before the request was sent: refused, unreachable
            return f"URLError({type(error.reason).__name__})"
        except (OSError, ValueError) as error:  # after: reset, timed out, cut short
            return type(error).__name__

    def _run(self) -> None:
        while not self._stop.is_set():
            outcome = self._once()
            with self._lock:
                self.result.statuses[outcome] += 1
            time.sleep(self.pause)

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        wait_until(lambda: self.result.statuses["200"] >= 10, timeout=30, what="the load's first answers")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


def final_container_states(kube: Kube, namespace: str, pod: str, timeout: float = 90) -> list[dict[str, Any]]:
    """Watches a pod until it is deleted; returns the terminated states its containers reported last."""
    watch = subprocess.Popen(
        [kube.kubectl_path, f"--kubeconfig={kube.kubeconfig}", "get", "pod", pod, "-n", namespace,
         "--watch", "--output-watch-events", "-o", "json"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    decoder, buffer = json.JSONDecoder(), ""
    last: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        assert watch.stdout is not None
        for line in watch.stdout:
            buffer += line
            try:
                event, end = decoder.raw_decode(buffer.strip())
            except json.JSONDecodeError:
                continue
            buffer = buffer.strip()[end:]
            statuses = event["object"]["status"].get("containerStatuses", [])
            last = {s["name"]: s["state"]["terminated"] for s in statuses if "terminated" in s.get("state", {})} or last
            if event["type"] == "DELETED" or time.monotonic() > deadline:
                break
    finally:
        watch.kill()
        watch.wait()
    return list(last.values())
