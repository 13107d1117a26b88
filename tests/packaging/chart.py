"""The Helm chart through a real helm binary (built from hack/tools at a pinned version)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from eao_devtools.cluster import ensure_tools
from tests.helpers import ROOT

CHART = ROOT / "charts" / "enterprise-agent-operator"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE, RELEASE_NAMESPACE = "eao", "eao-system"


def helm(*args: str, kubeconfig: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env_args = [f"--kubeconfig={kubeconfig}"] if kubeconfig else []
    return subprocess.run(
        [str(ensure_tools() / "helm"), *args, *env_args], capture_output=True, text=True, timeout=timeout, check=False
    )


def render(values: Path | None = None, *sets: str, namespace: str = RELEASE_NAMESPACE) -> list[dict[str, Any]]:
    """`helm template` of the chart; fails the test with helm's message when helm refuses."""
    args = ["template", RELEASE, str(CHART), "--namespace", namespace]
    if values is not None:
        args += ["--values", str(values)]
    for assignment in sets:
        args += ["--set", assignment]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]
