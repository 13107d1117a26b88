"""A cluster reached through a kubeconfig and kubectl, as any client reaches it."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from eao_devtools.cluster import Cluster


@dataclass
class Kube:
    """A cluster reached through a kubeconfig; ``local`` is set when we started it ourselves."""

    kubeconfig: Path
    kubectl_path: str
    local: Cluster | None

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def wait_established(self, crd: str, resource: str | None = None, timeout: float = 60) -> None:
        """Until the CRD is Established and, when ``resource`` is given, discovery serves it.
        Polled: on a CRD whose status has no conditions yet, ``kubectl wait`` fails at once
        ("accessor error") instead of waiting."""
        established = '{.status.conditions[?(@.type=="Established")].status}'
        deadline = time.monotonic() + timeout
        while self.kubectl("get", "crd", crd, "-o", f"jsonpath={established}", check=False).stdout.strip() != "True":
            if time.monotonic() > deadline:
                raise AssertionError(f"the CRD {crd} never became Established")
            time.sleep(0.2)
        # Established comes a moment before discovery serves the new type (and its short name).
        while resource is not None and self.kubectl("get", resource, "-A", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{resource} never appeared in discovery")
            time.sleep(0.2)
