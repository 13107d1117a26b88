"""bench/watch_memory: the operator's memory and CPU beside N unrelated Secrets in another namespace.

Prints, side by side in one run on one local control plane:
- ours: the operator as shipped; the API server filters its child watches by the managed-by label;
- baseline: the same operator with those server-side selectors removed (a shim loaded through
  PYTHONPATH), so every Secret, ConfigMap and EndpointSlice in the cluster streams through it and
  is dropped by kopf's client-side label filter, as before the selectors were set.

Each operator watches all namespaces, brings one agent to Ready, then idles; printed are its peak
RSS, its RSS at rest and its CPU seconds until then.

    .venv/bin/python -m bench.watch_memory --secrets 5000 --size-kib 100
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from eao_devtools.cluster import Cluster, ensure_binaries
from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "crds" / "enterpriseagents.agents.enterprise.io.yaml"
WITHOUT_SELECTORS = """
import agent_operator.handlers as handlers

_configure = handlers.configure


def configure(settings):
    _configure(settings)
    for key in list(settings.watching.label_selectors):
        del settings.watching.label_selectors[key]


handlers.configure = configure
"""


def _proc(pid: int) -> tuple[float, float, float]:
    """Peak RSS and RSS (MiB), and CPU seconds, of one process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024, cpu


def fill(kube: Kube, namespace: str, count: int, size_kib: int) -> None:
    kube.kubectl("create", "namespace", namespace)
    for start in range(0, count, 50):
        items = [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": f"unrelated-{index:05d}", "namespace": namespace},
                "data": {"blob": base64.b64encode(os.urandom(size_kib * 1024)).decode()},
            }
            for index in range(start, min(start + 50, count))
        ]
        kube.kubectl("create", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def measure(
    kube: Kube, workdir: Path, label: str, shim: Path | None, idle_seconds: float
) -> tuple[float, float, float]:
    namespace = f"agents-{label}"
    kube.kubectl("create", "namespace", namespace)
    operator = OperatorProcess(kube.kubeconfig, workdir / f"{label}.log", [], namespace, "bench", resync_seconds=600)
    if shim is not None:
        operator.env["PYTHONPATH"] = str(shim)
    operator.start()
    try:
        while not operator.is_leader():
            time.sleep(0.2)
        kube.kubectl("apply", "-f", "-", stdin=json.dumps(agent_manifest(namespace, name="one")))
        deadline = time.monotonic() + 600
        while "Ready" not in kube.kubectl("get", "ea", "one", "-n", namespace, "-o", "jsonpath={.status.phase}").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: the agent did not become Ready; see {operator.log_path}")
            time.sleep(0.5)
        time.sleep(idle_seconds)  # a benchmark's settling time, not a test's condition
        assert operator.process is not None
        return _proc(operator.process.pid)
    finally:
        operator.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--secrets", type=int, default=5000)
    parser.add_argument("--size-kib", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-watch-memory-") as tmp:
        workdir = Path(tmp)
        shim = workdir / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(WITHOUT_SELECTORS)
        cluster = Cluster(workdir / "control-plane")
        cluster.up(nodes=1)
        try:
            kube = Kube(cluster.kubeconfig, str(ensure_binaries() / "kubectl"), cluster)
            kube.kubectl("apply", "--server-side", "-f", str(CRD))
            deadline = time.monotonic() + 60
            while kube.kubectl("get", "ea", "-A", check=False).returncode != 0:  # served once Established
                if time.monotonic() > deadline:
                    raise RuntimeError("the EnterpriseAgent CRD was never served")
                time.sleep(0.2)
            started = time.monotonic()
            fill(kube, "unrelated", args.secrets, args.size_kib)
            print(
                f"created {args.secrets} Secrets of {args.size_kib} KiB in {time.monotonic() - started:.0f} s",
                flush=True,
            )
            ours = measure(kube, workdir, "ours", None, args.idle_seconds)
            baseline = measure(kube, workdir, "baseline", shim, args.idle_seconds)
        finally:
            cluster.down()
    print(
        f"\n{args.secrets} unrelated Secrets of {args.size_kib} KiB in another namespace; one agent; {os.cpu_count()} cores"
    )
    print(f"{'':28}{'ours (server-side selector)':>30}{'baseline (client-side filter)':>32}")
    print(f"{'peak RSS':28}{ours[0]:>26.0f} MiB{baseline[0]:>28.0f} MiB")
    print(f"{'RSS at rest':28}{ours[1]:>26.0f} MiB{baseline[1]:>28.0f} MiB")
    print(f"{'CPU until Ready + idle':28}{ours[2]:>28.1f} s{baseline[2]:>30.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
