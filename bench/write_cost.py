"""bench/write_cost: what one write costs the API server and etcd, by kind of write.

The operator bench's time follows the CPU the API server spends on writes (two saturated cores);
this shows why an agent costs more there than its children. On one idle local control plane, N
writes of each kind, 8 at once, and the CPU the kube-apiserver and etcd processes used for them
(from /proc), per write:

- baseline: a ConfigMap (as a child is: server-side apply), created, then applied unchanged;
- ours: an EnterpriseAgent created (server-side apply), its status written (server-side apply, as
  the operator does; then as a JSON merge patch), and a status written unchanged;
- the same agent kind with a free-form spec (its schema cut to ``type: object``, the CEL rules
  dropped; a second CRD, group bench.enterprise.io): how much of an agent's cost is its schema.

    .venv/bin/python -m bench.write_cost --writes 300
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import kopf
import yaml

from agent_operator.kube import Kube
from agent_operator.kubeconfig import connection
from eao_devtools.cluster import Cluster, ensure_binaries
from eao_devtools.testkit.kube import Kube as Kubectl

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "crds" / "enterpriseagents.agents.enterprise.io.yaml"
AT_ONCE = 8
NAMESPACE = "writes"
FREEFORM_GROUP = "bench.enterprise.io"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


def cpu_seconds(binary: str, state_dir: Path) -> float:
    """CPU seconds used so far by the processes of ``binary`` that run from this control plane."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not argv[0].decode().endswith("/" + binary) or str(state_dir).encode() not in b" ".join(argv):
                continue
            total += process_cpu_seconds(int(pid))
        except OSError:
            continue  # gone meanwhile
    return total


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system) one process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def freeform_crd(crd: dict[str, Any]) -> dict[str, Any]:
    """Our CRD under another group, its spec free-form and without CEL rules; status as ours."""
    other = copy.deepcopy(crd)
    other["metadata"] = {"name": f"{other['spec']['names']['plural']}.{FREEFORM_GROUP}"}
    other["spec"]["group"] = FREEFORM_GROUP
    for version in other["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        schema["properties"]["spec"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        schema.pop("x-kubernetes-validations", None)
        version.pop("additionalPrinterColumns", None)
    return other


def status(index: int, phase: str) -> dict[str, Any]:
    """A status of the shape the operator writes (five conditions, replicas, revision, rollout)."""
    conditions = [
        {
            "type": kind,
            "status": "True" if (kind == "Ready") == (phase == "Ready") else "False",
            "reason": f"Reason{kind}",
            "message": f"agent {index}: {kind} while {phase}",
            "lastTransitionTime": "2026-12-04T10:00:00Z",
            "observedGeneration": 1,
        }
        for kind in ("Ready", "Available", "Progressing", "Degraded", "Stalled")
    ]
    return {
        "phase": phase,
        "message": f"agent {index} is {phase}",
        "observedGeneration": 1,
        "conditions": conditions,
        "replicas": 1,
        "readyReplicas": 1 if phase == "Ready" else 0,
        "activeColor": "blue",
        "activeRevision": "5d8f7c9b",
        "image": "ghcr.io/example/agent:1.0.0",
        "rollout": {"step": "Completed", "message": f"revision 5d8f7c9b {phase}"},
    }


class Run:
    def __init__(self, cluster: Cluster, kube: Kube, writes: int) -> None:
        self.cluster, self.kube, self.writes = cluster, kube, writes
        self.rows: list[tuple[str, str, float, float, float]] = []

    async def measure(self, side: str, label: str, write: Callable[[int], Awaitable[Any]]) -> None:
        limit = asyncio.Semaphore(AT_ONCE)

        async def one(index: int) -> None:
            async with limit:
                await write(index)

        state = self.cluster.state_dir
        before = (cpu_seconds("kube-apiserver", state), cpu_seconds("etcd", state), time.monotonic())
        await asyncio.gather(*(one(index) for index in range(self.writes)))
        after = (cpu_seconds("kube-apiserver", state), cpu_seconds("etcd", state), time.monotonic())
        api, etcd, wall = ((b - a) / self.writes * 1000 for a, b in zip(before, after, strict=True))
        self.rows.append((side, label, api, etcd, wall))
        print(f"{side:9} {label:52} {api:6.2f} {etcd:6.2f} {wall:6.2f}", flush=True)

    def agent(self, group: str, index: int, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": f"{group}/v1alpha1",
            "kind": "EnterpriseAgent",
            "metadata": {"name": f"agent-{index}", "namespace": NAMESPACE},
            "spec": spec,
        }

    # Requests the product's client does not send for this group (its kinds are ours only) or at
    # all (its status writes are server-side apply): the client's generic request sends them.
    def _path(self, group: str, index: int, subresource: str = "") -> str:
        return f"/apis/{group}/v1alpha1/namespaces/{NAMESPACE}/enterpriseagents/agent-{index}{subresource}"

    async def create_freeform(self, index: int, spec: dict[str, Any]) -> Any:
        body = self.agent(FREEFORM_GROUP, index, spec)
        query = [("fieldManager", "bench"), ("force", "true")]
        return await self.kube._request("PATCH", self._path(FREEFORM_GROUP, index), body, query, APPLY)

    async def status_patch(self, group: str, index: int, phase: str) -> Any:
        body = {"status": status(index, phase)}
        path = self._path(group, index, "/status")
        return await self.kube._request("PATCH", path, body, [("fieldManager", "bench")], MERGE)


def config_map(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"child-{index}", "namespace": NAMESPACE, "labels": {"app.kubernetes.io/name": "x"}},
        "data": {f"key-{k}": "v" * 100 for k in range(10)},
    }


async def run(cluster: Cluster, writes: int) -> list[tuple[str, str, float, float, float]]:
    kubectl = Kubectl(cluster.kubeconfig, str(ensure_binaries() / "kubectl"), cluster)
    crd = yaml.safe_load(CRD.read_text())
    for definition in (crd, freeform_crd(crd)):
        kubectl.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(definition))
        kubectl.kubectl("wait", "--for=condition=Established", f"crd/{definition['metadata']['name']}")
    kubectl.kubectl("create", "namespace", NAMESPACE)
    spec = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())["spec"]
    ours = crd["spec"]["group"]

    def login() -> kopf.ConnectionInfo:
        info = connection([cluster.kubeconfig])
        assert info is not None
        return info

    kube = Kube(login)
    bench = Run(cluster, kube, writes)
    print(f"{'':9} {'write (' + str(writes) + ' of each, 8 at once)':52} {'API srv':>6} {'etcd':>6} {'wall':>6}  ms")
    try:
        await bench.measure("baseline", "ConfigMap created (server-side apply)", lambda i: kube.apply(config_map(i)))
        await bench.measure("baseline", "ConfigMap applied unchanged", lambda i: kube.apply(config_map(i)))
        await bench.measure(
            "ours", "agent created (server-side apply)", lambda i: kube.apply(bench.agent(ours, i, spec))
        )
        await bench.measure(
            "ours",
            "agent status written (server-side apply)",
            lambda i: kube.apply_status(NAMESPACE, f"agent-{i}", status(i, "Progressing")),
        )
        await bench.measure(
            "ours", "agent status written (merge patch)", lambda i: bench.status_patch(ours, i, "Ready")
        )
        await bench.measure(
            "ours",
            "agent status applied unchanged",
            lambda i: kube.apply_status(NAMESPACE, f"agent-{i}", status(i, "Ready")),
        )
        await bench.measure("free-form", "agent created (server-side apply)", lambda i: bench.create_freeform(i, spec))
        await bench.measure(
            "free-form",
            "agent status written (merge patch)",
            lambda i: bench.status_patch(FREEFORM_GROUP, i, "Progressing"),
        )
        await bench.measure(
            "free-form",
            "agent status written again (merge patch)",
            lambda i: bench.status_patch(FREEFORM_GROUP, i, "Ready"),
        )
    finally:
        await kube.close()
    return bench.rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-writes-") as tmp:
        cluster = Cluster(Path(tmp) / "control-plane")
        cluster.up(nodes=1)
        try:
            rows = asyncio.run(run(cluster, args.writes))
        finally:
            cluster.down()
    cost = {(side, label): api for side, label, api, _, _ in rows}
    child = cost[("baseline", "ConfigMap created (server-side apply)")]
    agent_status = cost[("ours", "agent status written (server-side apply)")]
    freeform = cost[("free-form", "agent status written (merge patch)")]
    print(
        f"ratios: an agent's status write costs the API server {agent_status / child:.1f}x a ConfigMap's creation;"
        f" with a free-form spec {freeform / child:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
