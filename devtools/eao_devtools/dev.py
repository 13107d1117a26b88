"""`make run`: the operator against the current cluster, or else the local control plane, with
the minimal example applied and its status shown. The local control plane gets a real node (the
example's pods really run) when the machine allows it: root and the Debian packages a node needs;
otherwise kwok's simulated nodes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent_operator.main import RunOptions, run
from eao_devtools.checkout import REPO_ROOT_VARIABLE, repo_root
from eao_devtools.cluster import Cluster, ClusterError, default_state_dir, ensure_binaries
from eao_devtools.imagebuild import DEBIAN_PACKAGES as BUILDER_PACKAGES
from eao_devtools.node import missing_packages
from eao_devtools.testkit.kube import Kube

CRD_NAME = "enterpriseagents.agents.enterprise.io"


def _say(message: str) -> None:
    print(f"[make run] {message}", flush=True)


def _current_cluster(kubectl: str) -> Path | None:
    """The kubeconfig of the current context, if it answers within a few seconds."""
    configured = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if not Path(configured.split(os.pathsep)[0]).is_file():
        return None
    probe = subprocess.run([kubectl, "get", "--raw=/readyz", "--request-timeout=5s"], capture_output=True, check=False)
    return Path(configured) if probe.returncode == 0 else None


def _real_node_possible() -> str | None:
    """None when this machine can run a real node, else why not."""
    if os.geteuid() != 0:
        return "not root"
    missing = missing_packages() + [tool for tool in BUILDER_PACKAGES if shutil.which(tool) is None]
    return f"missing {', '.join(missing)} (make system-packages)" if missing else None


def _show_status_when_ready(kubectl: list[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        phase = subprocess.run(
            [*kubectl, "get", "ea", "hello-agent", "-n", "default", "-o", "jsonpath={.status.phase}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if phase in ("Ready", "Stalled", "Degraded"):
            break
        time.sleep(0.5)
    table = subprocess.run(
        [*kubectl, "get", "deployments,services", "-n", "default", "-l", "app.kubernetes.io/instance=hello-agent"],
        capture_output=True,
        text=True,
        check=False,
    )
    agent = subprocess.run(
        [*kubectl, "get", "ea", "hello-agent", "-n", "default"], capture_output=True, text=True, check=False
    )
    _say("the example agent:\n" + agent.stdout + "\n" + table.stdout)
    _say(f"watch it with: {' '.join(kubectl)} get ea -w   (Ctrl+C stops the operator; the cluster keeps running)")


def main() -> int:
    root = repo_root()
    crd_file, example = root / "crds" / f"{CRD_NAME}.yaml", root / "examples" / "minimal.yaml"
    # Checked before anything starts: outside a checkout there is nothing to apply.
    missing = [str(path) for path in (crd_file, example) if not path.is_file()]
    if missing:
        print(
            f"error: {', '.join(missing)} not found: run from a checkout (or set {REPO_ROOT_VARIABLE})", file=sys.stderr
        )
        return 1
    try:
        kubectl_path = shutil.which("kubectl")
        kubeconfig = _current_cluster(kubectl_path) if kubectl_path else None
        if kubeconfig is None:
            why_not = _real_node_possible()
            node = "with a real node" if why_not is None else f"with simulated (kwok) nodes: no real node, {why_not}"
            _say(f"no reachable cluster in the current context: starting the local control plane {node}")
            cluster = Cluster(default_state_dir())
            timings = cluster.up(real_node=why_not is None)
            if timings:
                _say(
                    f"local control plane up in {timings['total_seconds']:.1f}s (build {timings['build_seconds']:.1f}s)"
                )
            kubeconfig = cluster.kubeconfig
            kubectl_path = str(ensure_binaries() / "kubectl")
        else:
            _say(f"using the current context of {kubeconfig}")
        assert kubectl_path is not None
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    os.environ["KUBECONFIG"] = str(kubeconfig)
    kubectl = [kubectl_path, f"--kubeconfig={kubeconfig}"]
    subprocess.run([*kubectl, "apply", "--server-side", "--force-conflicts", "-f", str(crd_file)], check=True)
    Kube(Path(kubeconfig), kubectl_path, None).wait_established(CRD_NAME)
    subprocess.run([*kubectl, "apply", "-f", str(example)], check=True)
    threading.Thread(target=_show_status_when_ready, args=(kubectl,), daemon=True).start()
    _say("starting the operator in the foreground (metrics on http://127.0.0.1:8000/metrics)")
    return run(RunOptions(metrics_host="127.0.0.1", lease_namespace="default", operator_namespace="default"))
