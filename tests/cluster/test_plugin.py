"""`kubectl ea` as a person types it: kubectl finds the plugin on PATH."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess
from tests.cluster.agents import apply, wait_phase

pytestmark = pytest.mark.cluster
VENV_BIN = str(Path(sys.executable).parent)


def kubectl_ea(kube: Kube, *args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "KUBECONFIG": str(kubeconfig or kube.kubeconfig),
    }
    return subprocess.run(
        [kube.kubectl_path, "ea", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_get_and_status(crd_installed: Kube, operator: OperatorProcess, namespace: str) -> None:
    apply(crd_installed, agent_manifest(namespace))
    apply(crd_installed, agent_manifest(namespace, name="broken", operations=["nope"]))
    ready = wait_phase(crd_installed, namespace, "hello-agent", "Ready")
    wait_phase(crd_installed, namespace, "broken", "Stalled")

    listing = kubectl_ea(crd_installed, "get", "-n", namespace)
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "ACTIVE", "READY", "REVISION", "IMAGE", "AGE"]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert by_name["hello-agent"][1:5] == ["Ready", "blue", "1/1", ready["status"]["activeRevision"]]
    assert by_name["broken"][1] == "Stalled"

    status = kubectl_ea(crd_installed, "status", "hello-agent", "-n", namespace)
    assert status.returncode == 0, status.stderr
    assert "Phase:       Ready" in status.stdout
    assert f"Active:      blue at revision {ready['status']['activeRevision']}  (1/1 ready)" in status.stdout
    assert re.search(r"^  Ready +True ", status.stdout, re.MULTILINE), status.stdout
    assert re.search(r"^  SharedStateMissing +False +AsExpected$", status.stdout, re.MULTILINE), status.stdout

    stalled = kubectl_ea(crd_installed, "status", "broken", "-n", namespace)
    assert stalled.returncode == 1
    assert "unknown operation 'nope'" in stalled.stdout


def test_errors_have_meaningful_exit_codes(crd_installed: Kube, namespace: str, tmp_path: Path) -> None:
    missing = kubectl_ea(crd_installed, "status", "no-such-agent", "-n", namespace)
    assert missing.returncode == 2
    assert f'EnterpriseAgent "no-such-agent" not found in namespace "{namespace}"' in missing.stderr

    usage = kubectl_ea(crd_installed, "frobnicate")
    assert usage.returncode == 2
    assert "invalid choice" in usage.stderr

    unreachable = tmp_path / "kubeconfig"
    unreachable.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n"
    )
    down = kubectl_ea(crd_installed, "get", "-n", namespace, kubeconfig=unreachable)
    assert down.returncode == 3
    assert "cannot reach the API server" in down.stderr
    assert "Traceback" not in down.stderr
