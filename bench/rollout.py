"""bench/rollout: time from a spec change until traffic is switched, for an analysis window W.

For each W: an agent (2 replicas, Auto promotion, analysis window W) is Ready on blue; a real
agent-runtime on loopback stands in for its preview pods (kwok pods have no network), so the
analysis's HTTP checks (readyz, metrics) really run. Then the image changes and we time
`kubectl apply` -> the active Service selecting green.

Baseline, measured in the same run: a plain Deployment with the same pod template and replicas
gets the same image change, timed until its rollout is complete. That is what the cluster needs
to bring new pods up; the rest of ours is the window W plus the operator's own overhead.
Target: W + < 5 s.

With --real-node the cluster has one real node (eao-dev cluster up --real-node, as root): the pods
really run from the image built from images/Dockerfile, the operator is installed by its chart and
runs as pods, its analysis goes to the preview pods over their Service and pod IPs, and the change
is an environment variable (one image) for both ours and the baseline.

    .venv/bin/python -m bench.rollout --windows 0 5 10 --runs 3 [--real-node]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client, config

from agent_operator.manifest import parse_agent
from eao_devtools.cluster import Cluster, ensure_binaries, ensure_tools
from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess, free_port
from eao_devtools.testkit.runtime import agent_runtime_layout, live_runtime

CHART = Path(__file__).resolve().parent.parent / "charts" / "enterprise-agent-operator"

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "crds" / "enterpriseagents.agents.enterprise.io.yaml"
V1, V2 = "registry.example/enterprise-agent-runtime:0.1.0", "registry.example/enterprise-agent-runtime:0.2.0"
POLL_SECONDS = 0.05


def raw(read: Any, *args: str) -> dict[str, Any]:
    """An API read as plain JSON (the client's models make every field optional)."""
    found: dict[str, Any] = json.loads(read(*args, _preload_content=False).data)
    return found


def wait_for(test: Any, timeout: float = 300) -> float:
    """Polls ``test()`` until true; returns the monotonic time it first was."""
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(POLL_SECONDS)
    return time.monotonic()


class Bench:
    def __init__(self, cluster: Cluster, workdir: Path, real_node: bool) -> None:
        self.kube = Kube(cluster.kubeconfig, str(ensure_binaries() / "kubectl"), cluster)
        self.workdir = workdir
        self.real_node = real_node
        config.load_kube_config(str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
        self.core = client.CoreV1Api()
        self.apps = client.AppsV1Api()
        self.custom = client.CustomObjectsApi()

    def apply(self, document: dict[str, Any]) -> None:
        self.kube.kubectl("apply", "-f", "-", stdin=json.dumps(document))

    def agent(self, namespace: str) -> dict[str, Any]:
        return raw(
            self.custom.get_namespaced_custom_object,
            "agents.enterprise.io",
            "v1alpha1",
            namespace,
            "enterpriseagents",
            "hello-agent",
        )

    def selector_colour(self, namespace: str) -> str:
        service = raw(self.core.read_namespaced_service, "hello-agent", namespace)
        return str(service["spec"]["selector"].get("agents.enterprise.io/color"))

    def version(self, namespace: str, release: int, **spec: Any) -> dict[str, Any]:
        """The agent at a release: a new image on kwok, a new environment variable on a real node
        (one image is built there)."""
        if self.real_node:
            return agent_manifest(namespace, replicas=2, env=[{"name": "RELEASE", "value": str(release)}], **spec)
        return agent_manifest(namespace, image=(V1, V2)[release - 1], replicas=2, **spec)

    def ours(self, window: int, run: int, port: int) -> float:
        namespace = f"bench-rollout-w{window}-{run}"
        self.kube.kubectl("create", "namespace", namespace)
        rollout = {"analysis": {"windowSeconds": window}, "scaleDownDelaySeconds": 30}
        self.apply(self.version(namespace, 1, rollout=rollout))
        wait_for(lambda: (self.agent(namespace).get("status") or {}).get("phase") == "Ready")
        agent = parse_agent(self.agent(namespace))
        secret = self.core.read_namespaced_secret("hello-agent-keys", namespace)
        files = {name: base64.b64decode(value) for name, value in (secret.data or {}).items()}
        layout = agent_runtime_layout(agent, self.workdir / namespace, files)
        with contextlib.nullcontext() if self.real_node else live_runtime(layout, port=port):
            started = time.monotonic()
            self.apply(self.version(namespace, 2, rollout=rollout))
            switched = wait_for(lambda: self.selector_colour(namespace) == "green")
            # The status is written just after the Service: wait for it to say so, then check it.
            wait_for(lambda: self.agent(namespace)["status"].get("activeColor") == "green")
            status = self.agent(namespace)["status"]
            checks = {c["name"]: c["result"] for c in status.get("rollout", {}).get("analysis", [])}
            assert checks.get("readyz") == "Passed", f"analysis did not run over HTTP: {checks}"
        self.kube.kubectl("delete", "namespace", namespace, "--wait=false")
        return switched - started

    def baseline(self, run: int) -> float:
        """The same pod template as a plain Deployment: time for its image change to roll out."""
        namespace = f"bench-rollout-raw-{run}"
        self.kube.kubectl("create", "namespace", namespace)
        self.apply(self.version(namespace, 1))
        wait_for(lambda: (self.agent(namespace).get("status") or {}).get("phase") == "Ready")
        plain = raw(self.apps.read_namespaced_deployment, "hello-agent-blue", namespace)
        # Its own name and labels, so neither the operator nor the agent's Deployment claims its pods.
        plain["metadata"] = {"name": "plain", "namespace": namespace, "labels": {"bench": "plain"}}
        plain["spec"]["selector"] = {"matchLabels": {"bench": "plain"}}
        plain["spec"]["template"]["metadata"]["labels"] = {"bench": "plain"}
        plain.pop("status", None)
        self.apply(plain)
        wait_for(lambda: self._complete(namespace, "plain"))
        started = time.monotonic()
        container = self.version(namespace, 2)["spec"]
        change = {"env": container["env"]} if self.real_node else {"image": V2}
        # A strategic merge of the container by name: the env list is merged by variable name.
        patch = {"spec": {"template": {"spec": {"containers": [{"name": "agent", **change}]}}}}
        self.apps.patch_namespaced_deployment("plain", namespace, patch)
        done = wait_for(lambda: self._complete(namespace, "plain"))
        self.kube.kubectl("delete", "namespace", namespace, "--wait=false")
        return done - started

    def _complete(self, namespace: str, name: str) -> bool:
        deployment = raw(self.apps.read_namespaced_deployment, name, namespace)
        spec, status = deployment["spec"], deployment.get("status") or {}
        replicas = spec.get("replicas", 0)
        return bool(
            status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)
            and status.get("updatedReplicas", 0) == replicas
            and status.get("availableReplicas", 0) == replicas
            and status.get("replicas", 0) == replicas
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 5, 10])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--real-node", action="store_true", help="real pods on a real node (root)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        workdir = Path(tmp)
        cluster = Cluster(workdir / "control-plane")
        cluster.up(nodes=3, real_node=args.real_node)
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
        bench = Bench(cluster, workdir, args.real_node)
        port = free_port()
        try:
            with _operator(bench, cluster, workdir, port):
                baseline = [bench.baseline(run) for run in range(args.runs)]
                rows = [
                    (window, [bench.ours(window, run, port) for run in range(args.runs)]) for window in args.windows
                ]
        finally:
            cluster.down()
    base = statistics.median(baseline)
    where = "real pods on a real node" if args.real_node else "kwok nodes, analysis against a loopback runtime"
    print(f"\nspec change -> traffic switched, 2 replicas, median of {args.runs} runs, {os.cpu_count()} cores, {where}")
    print(f"baseline (plain Deployment image change until rolled out): median {base:.1f} s, runs {_runs(baseline)}")
    print(
        f"{'W':>5} {'ours (median)':>14} {'ours - W':>9} {'baseline + W':>13} {'ours - that':>12} {'target W+5':>11}  runs"
    )
    for window, times in rows:
        median = statistics.median(times)
        print(
            f"{window:>4}s {median:>12.1f} s {median - window:>7.1f} s {base + window:>11.1f} s "
            f"{median - base - window:>10.1f} s {window + 5:>9.1f} s  {_runs(times)}  "
            f"{'met' if median < window + 5 else 'MISSED'}"
        )
    return 0


@contextlib.contextmanager
def _operator(bench: Bench, cluster: Cluster, workdir: Path, port: int) -> Iterator[None]:
    """On a real node, the chart's operator pods; on kwok, a local operator whose analysis goes to
    the loopback runtime standing in for the preview pods."""
    if bench.real_node:
        helm = [str(ensure_tools() / "helm"), f"--kubeconfig={cluster.kubeconfig}"]
        subprocess.run(
            [*helm, "install", "eao", str(CHART), "-n", "eao-system", "--create-namespace", "--wait"], check=True
        )
        yield
        return
    bench.kube.kubectl("apply", "--server-side", "-f", str(CRD))
    bench.kube.kubectl("wait", "--for=condition=Established", "crd/enterpriseagents.agents.enterprise.io")
    operator = OperatorProcess(
        cluster.kubeconfig,
        workdir / "operator.log",
        ["bench-rollout-*"],
        "default",
        "bench-rollout",
        resync_seconds=600,
        extra_args=(f"--analysis-base-url=http://127.0.0.1:{port}",),
    ).start()
    try:
        yield
    finally:
        operator.stop()


def _runs(values: list[float]) -> str:
    return " ".join(f"{value:.1f}" for value in values)


if __name__ == "__main__":
    sys.exit(main())
