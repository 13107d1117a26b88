"""bench/operator: N EnterpriseAgents applied at once, until all are Ready.

Prints a table per N with, side by side:
- ours: N agents applied with one `kubectl apply --server-side` (`--agents-apply client-side` for
  a plain `kubectl apply`), the operator making every child, until every agent is Ready;
- baseline: the same children (rendered offline by `agent-operator render`) applied directly with
  one `kubectl apply --server-side`, no operator, until every Deployment is Available.

The baseline is what the cluster itself needs for the same objects; the difference is the
operator's cost. Both wait on one watch. Also printed: the operator's peak RSS, its API writes
(leader Lease excluded) and writes per agent, where its time went, a timeline of each run, and the
CPU each process of the control plane, the operator and kubectl used in each run. Runs on the
local control plane in a fresh state directory.

    .venv/bin/python -m bench.operator --agents 100 1000 [--agents-apply client-side]

With --memray FILE the operator runs under memray (Python allocators traced: slower, and its RSS
is memray's too), which writes FILE with the agent count in its name (peak.bin: peak.1000.bin), and
the bench prints the sites that held the most memory at the operator's peak; `memray flamegraph`
on that file draws them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from agent_operator.defaults import WORKERS
from agent_operator.manifest import dump_yaml_all, load_agents
from agent_operator.render import RenderPlan, build_children
from eao_devtools.cluster import Cluster, ensure_binaries
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess

from .write_cost import cpu_seconds, process_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "crds" / "enterpriseagents.agents.enterprise.io.yaml"


def agents(namespace: str, count: int) -> list[dict[str, Any]]:
    base = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
    result = []
    for index in range(count):
        document = json.loads(json.dumps(base))
        document["metadata"] = {"name": f"agent-{index:04d}", "namespace": namespace}
        result.append(document)
    return result


# What ``Bench.wait_all`` reads of each object from its watch, and the value that passes. Custom
# columns, not a JSONPath template: kubectl applies a template to the first list as a whole.
WATCHED_FIELD = {"ready": ".status.phase", "available": '.status.conditions[?(@.type=="Available")].status'}
WATCHED_VALUE = {"ready": "Ready", "available": "True"}


class Bench:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.kube = Kube(cluster.kubeconfig, str(ensure_binaries() / "kubectl"), cluster)

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return self.kube.kubectl(*args, stdin=stdin, timeout=1800).stdout

    def wait_all(self, kind: str, namespace: str, test: str, total: int, timeout: float = 1800) -> float:
        """Until ``total`` objects of the kind pass the test, seen through one watch (``kubectl get
        --watch``): each change crosses it once. Listing every object every half second, as this
        bench did before, cost the API server and kubectl a full list each time (see ``timeline``),
        on the same two cores as the run being measured, and more the more objects there were."""
        started = time.monotonic()
        process = subprocess.Popen(
            [self.kube.kubectl_path, f"--kubeconfig={self.kube.kubeconfig}", "get", kind, "-n", namespace,
             "--watch", "--no-headers", "-o", f"custom-columns=NAME:.metadata.name,VALUE:{WATCHED_FIELD[test]}"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        passed: set[str] = set()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                name, _, value = line.strip().partition(" ")
                value = value.strip()
                if value == WATCHED_VALUE[test]:
                    passed.add(name)
                else:
                    passed.discard(name)
                if len(passed) >= total:
                    return time.monotonic() - started
        finally:
            timer.cancel()
            process.kill()
            process.wait()
        raise RuntimeError(f"not all {kind} {test} within {timeout}s (the watch ended with {len(passed)})")

    def clean_up(self, namespace: str) -> None:
        """Deletes a run's namespace and waits until it is gone: its thousands of objects are
        deleted by the namespace controller, the garbage collector and kwok, and until 4 December's
        evening that work overlapped the next run and about doubled its control plane's CPU."""
        self.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=1500s")

    def listed(self, kind: str, namespace: str) -> tuple[list[dict[str, Any]], str]:
        """Every object of the kind, and what one such list cost: what the bench paid per poll
        when it waited by listing."""
        started = time.monotonic()
        text = self.kubectl("get", kind, "-n", namespace, "-o", "json")
        cost = f"{kind} {len(text) / 2**20:.1f} MiB in {time.monotonic() - started:.2f} s"
        return json.loads(text)["items"], cost


def _since(stamp: str | None, start: float) -> float | None:
    """Seconds from ``start`` (epoch) to an API server timestamp (whole seconds, RFC 3339)."""
    return None if not stamp else datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - start


def _transition(item: dict[str, Any], condition: str) -> str | None:
    for c in (item.get("status") or {}).get("conditions") or []:
        if c["type"] == condition and c["status"] == "True":
            return str(c.get("lastTransitionTime") or "") or None
    return None


def _spread(values: list[float]) -> str:
    if not values:
        return "none"
    ordered = sorted(values)
    p90 = ordered[math.ceil(len(ordered) * 0.9) - 1]
    return f"median +{statistics.median(ordered):.0f}, p90 +{p90:.0f}, last +{ordered[-1]:.0f}"


class CpuMeter:
    """CPU seconds spent since the meter was made by each control-plane process, the operator and
    the bench's kubectl, and the machine's idle share: where the two cores went during a run."""

    COMPONENTS = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok")

    def __init__(self, cluster: Cluster, operator_pid: int | None = None) -> None:
        self.cluster, self.operator_pid = cluster, operator_pid
        self.before = self._read()

    def _read(self) -> dict[str, float]:
        state_dir = self.cluster.state_dir
        spent = {name: cpu_seconds(name, state_dir) for name in self.COMPONENTS}
        if self.operator_pid is not None:
            spent["operator"] = process_cpu_seconds(self.operator_pid)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # kubectl: the bench's waited children
        spent["kubectl"] = children.ru_utime + children.ru_stime
        ticks = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        spent["idle"], spent["all"] = (
            (ticks[3] + ticks[4]) / os.sysconf("SC_CLK_TCK"),
            sum(ticks) / os.sysconf("SC_CLK_TCK"),
        )
        return spent

    def report(self) -> str:
        after = self._read()
        spent = {name: after[name] - self.before[name] for name in after}
        idle = spent.pop("idle") / max(spent.pop("all"), 1e-9)
        busy = ", ".join(f"{name} {seconds:.1f}" for name, seconds in spent.items())
        return f"CPU seconds during the run: {busy}; the machine idle {idle:.0%} of the time"


def timeline(bench: Bench, namespace: str, start: float, agents_too: bool) -> None:
    """When things happened, in seconds after the apply, from the objects' own timestamps (whole
    seconds): the Deployments made and Available, and for ours the agents made and Ready and how
    long each took after its Deployment was Available. Where ours loses time to the baseline shows here."""
    deployments, costs = bench.listed("deployments", namespace)
    created = [_since(d["metadata"].get("creationTimestamp"), start) for d in deployments]
    available = {
        (d["metadata"].get("labels") or {}).get("app.kubernetes.io/instance", d["metadata"]["name"]): _since(
            _transition(d, "Available"), start
        )
        for d in deployments
    }
    line = (
        f"timeline, s after the apply: Deployments made {_spread([t for t in created if t is not None])};"
        f" Available {_spread([t for t in available.values() if t is not None])}"
    )
    if agents_too:
        listed, agents_cost = bench.listed("enterpriseagents", namespace)
        costs += f", {agents_cost}"
        made = [_since(a["metadata"].get("creationTimestamp"), start) for a in listed]
        ready = {a["metadata"]["name"]: _since(_transition(a, "Ready"), start) for a in listed}
        lag = [r - a for name, r in ready.items() if r is not None and (a := available.get(name)) is not None]
        line += f"; agents made (by the user's kubectl apply) {_spread([t for t in made if t is not None])}"
        line += f"; agents Ready {_spread([t for t in ready.values() if t is not None])}; Ready after its Deployment's Available {_spread(lag)}"
    print(line, flush=True)
    print(f"one full list with kubectl (JSON): {costs}", flush=True)
    names = bench.kubectl("get", "replicasets,pods", "-n", namespace, "-o", "name").split()
    counts = {kind: sum(1 for name in names if name.startswith(kind + "/")) for kind in ("replicaset.apps", "pod")}
    print(f"made by the controllers: {counts['replicaset.apps']} ReplicaSets, {counts['pod']} pods", flush=True)


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


WRITE_KINDS = [
    ("patch", plural)
    for plural in (
        "deployments",
        "services",
        "configmaps",
        "secrets",
        "serviceaccounts",
        "poddisruptionbudgets",
        "networkpolicies",
        "controllerrevisions",
        "enterpriseagents",
        "enterpriseagents/status",
    )
] + [("post", "secrets"), ("post", "events"), ("delete", "configmaps"), ("delete", "deployments")]


def run_ours(
    bench: Bench,
    count: int,
    workdir: Path,
    apply_mode: str = "server-side",
    workers: int = WORKERS,
    memray_file: Path | None = None,
) -> dict[str, float]:
    namespace = f"bench-ours-{count}"
    bench.kubectl("create", "namespace", namespace)
    operator = OperatorProcess(
        bench.cluster.kubeconfig,
        workdir / f"operator-{count}.log",
        [namespace],
        namespace,
        "bench",
        resync_seconds=600,
        extra_args=(f"--workers={workers}",),
    )
    if memray_file is not None:
        memray_file.unlink(missing_ok=True)
        memray = [sys.executable, "-m", "memray", "run", "--aggregate", "--trace-python-allocators", "-q"]
        operator.args = [*memray, "-o", str(memray_file), *operator.args]
    operator.start()
    try:
        while not operator.is_leader():
            time.sleep(0.1)
        documents = agents(namespace, count)
        assert operator.process is not None
        meter = CpuMeter(bench.cluster, operator.process.pid)
        started, started_epoch = time.monotonic(), time.time()
        # Applied as the baseline applies its children (server-side, one PATCH each), unless asked:
        # client-side apply GETs each agent first and keeps it whole in an annotation.
        how = ["--server-side", "--field-manager=bench"] if apply_mode == "server-side" else []
        bench.kubectl("apply", *how, "-f", "-", stdin=dump_yaml_all(documents))
        applied = time.monotonic() - started
        seconds = applied + bench.wait_all("enterpriseagents", namespace, "ready", count)
        cpu = meter.report()
        rss = _peak_rss_mib(operator.process.pid)
        writes = operator.metric("agent_operator_api_writes_total") - operator.metric(
            "agent_operator_api_writes_total", resource="leases"
        )
        breakdown = {
            f"{verb} {resource}": operator.metric("agent_operator_api_writes_total", verb=verb, resource=resource)
            / count
            for verb, resource in WRITE_KINDS
        }
        print(
            "writes per agent by request: " + ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items() if v), flush=True
        )
        time_spent(operator, operator.process.pid, seconds, workers)
        timeline(bench, namespace, started_epoch, agents_too=True)
        print(cpu, flush=True)
    finally:
        operator.stop()
    if memray_file is not None:
        print_peak_memory(memray_file)
    bench.clean_up(namespace)
    return {"seconds": seconds, "rss_mib": rss, "writes": writes, "writes_per_agent": writes / count}


def print_peak_memory(memray_file: Path, top: int = 15) -> None:
    """The allocation sites holding the most at the operator's peak, each by the first frame of
    the project's or kopf's code on its stack (what called into the libraries)."""
    from memray import FileReader

    held: dict[str, int] = {}
    records = list(FileReader(memray_file).get_high_watermark_allocation_records(merge_threads=True))
    for record in records:
        frames = list(record.stack_trace())  # (function, file, line), innermost first
        ours = [f for f in frames if "agent_operator" in f[1] or "/kopf/" in f[1]]
        function, file, line = (ours or frames or [("?", "?", 0)])[0]
        site = f"{function} {Path(file).parent.name}/{Path(file).name}:{line}"
        held[site] = held.get(site, 0) + record.size
    total = sum(held.values())
    print(f"held at the operator's peak (memray, Python allocators traced): {total / 2**20:.1f} MiB", flush=True)
    for site, size in sorted(held.items(), key=lambda item: -item[1])[:top]:
        print(f"  {size / 2**20:7.1f} MiB  {site}", flush=True)


def time_spent(operator: OperatorProcess, pid: int, wall: float, workers: int) -> None:
    """Where the operator's time to Ready went, from its own metrics: reconciles (our CPU and the
    API requests they await), API requests, the queue; its CPU time from /proc."""
    cpu = process_cpu_seconds(pid)
    reconciles = operator.metric("agent_operator_reconcile_duration_seconds_count")
    reconcile_seconds = operator.metric("agent_operator_reconcile_duration_seconds_sum")
    requests = operator.metric("agent_operator_api_request_duration_seconds_count")
    request_seconds = operator.metric("agent_operator_api_request_duration_seconds_sum")
    queued = operator.metric("agent_operator_workqueue_wait_seconds_count")
    queue_seconds = operator.metric("agent_operator_workqueue_wait_seconds_sum")
    print(
        f"where the time went ({wall:.1f} s to all Ready): operator CPU {cpu:.1f} s;"
        f" {reconciles:.0f} reconciles, {reconcile_seconds:.1f} s in them ({reconcile_seconds / max(reconciles, 1) * 1000:.0f} ms"
        f" each, {workers} at once); {requests:.0f} API requests, {request_seconds:.1f} s awaiting them"
        f" ({request_seconds / max(requests, 1) * 1000:.0f} ms each); {queued:.0f} waits in the queue,"
        f" {queue_seconds / max(queued, 1):.1f} s each on average",
        flush=True,
    )
    by_verb = {  # a list is a GET too, and counted with them
        verb: operator.metric("agent_operator_api_request_duration_seconds_count", verb=verb)
        for verb in ("get", "post", "patch", "put", "delete")
    }
    print(
        "API requests by verb (lists among the GETs): "
        + ", ".join(f"{verb} {n:.0f}" for verb, n in by_verb.items() if n),
        flush=True,
    )


def run_baseline(bench: Bench, count: int) -> dict[str, float]:
    namespace = f"bench-raw-{count}"
    bench.kubectl("create", "namespace", namespace)
    objects: list[dict[str, Any]] = []
    for document in agents(namespace, count):
        (agent,) = load_agents(yaml.safe_dump(document))
        objects += build_children(agent, RenderPlan.initial(agent))
    meter = CpuMeter(bench.cluster)
    started, started_epoch = time.monotonic(), time.time()
    bench.kubectl("apply", "--server-side", "--field-manager=bench", "-f", "-", stdin=dump_yaml_all(objects))
    seconds = time.monotonic() - started + bench.wait_all("deployments", namespace, "available", count)
    cpu = meter.report()
    print(f"baseline ({count} agents' children):", end=" ", flush=True)
    timeline(bench, namespace, started_epoch, agents_too=False)
    print(cpu, flush=True)
    bench.clean_up(namespace)
    return {"seconds": seconds, "writes": float(len(objects)), "writes_per_agent": len(objects) / count}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--agents-apply",
        choices=["server-side", "client-side"],
        default="server-side",
        help="how the agents are applied (the baseline's children are applied server-side)",
    )
    parser.add_argument("--workers", type=int, default=WORKERS, help="the operator's concurrent reconciles")
    parser.add_argument("--memray", type=Path, help="run the operator under memray, writing this file (see above)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        workdir = Path(tmp)
        cluster = Cluster(workdir / "control-plane")
        cluster.up(nodes=10)
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
        bench = Bench(cluster)
        bench.kubectl("apply", "--server-side", "-f", str(CRD))
        bench.kubectl("wait", "--for=condition=Established", "crd/enterpriseagents.agents.enterprise.io")
        children_per_agent = 8  # ServiceAccount, Secret, ConfigMap, Deployment, 2 Services, PDB, NetworkPolicy
        try:
            for count in args.agents:
                baseline = run_baseline(bench, count)
                memray_file = args.memray.with_suffix(f".{count}{args.memray.suffix}") if args.memray else None
                ours = run_ours(bench, count, workdir, args.agents_apply, args.workers, memray_file)
                print(
                    f"\nN = {count} agents (replicas 1, {children_per_agent} children each), local control plane, {os.cpu_count()} cores"
                )
                print(f"{'':34}{'operator (ours)':>18}{'kubectl apply (baseline)':>27}")
                print(f"{'time until all Ready/Available':34}{ours['seconds']:>16.1f} s{baseline['seconds']:>25.1f} s")
                print(f"{'API writes':34}{ours['writes']:>18.0f}{baseline['writes']:>27.0f}")
                print(f"{'writes per agent':34}{ours['writes_per_agent']:>18.1f}{baseline['writes_per_agent']:>27.1f}")
                print(f"{'operator peak RSS':34}{ours['rss_mib']:>14.0f} MiB{'-':>27}")
                print(
                    f"ratios: time {ours['seconds'] / baseline['seconds']:.1f}x the baseline (target <= 1.3x);"
                    f" {ours['writes_per_agent']:.1f} writes per agent, children + 2 = {children_per_agent + 1 + 2}"
                    f" (the ControllerRevision counted); peak RSS {ours['rss_mib']:.0f} MiB (target < 200 MiB)"
                )
                sys.stdout.flush()
        finally:
            cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
