"""The operator as a separate process, started the way `make run` and the Helm chart start it
(``agent-operator run`` from the venv of the running interpreter)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

AGENT_OPERATOR = str(Path(sys.executable).parent / "agent-operator")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class OperatorProcess:
    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        namespaces: list[str],
        lease_namespace: str,
        lease_name: str,
        lease_seconds: int = 15,
        resync_seconds: float = 3.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.port = free_port()
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        self.args = [
            AGENT_OPERATOR, "run",
            "--metrics-host=127.0.0.1", f"--metrics-port={self.port}",
            f"--lease-namespace={lease_namespace}", f"--lease-name={lease_name}", f"--lease-seconds={lease_seconds}",
            f"--resync-seconds={resync_seconds}", "--operator-namespace=enterprise-agent-system", "--log-format=json",
            *[f"--namespace={n}" for n in namespaces], *extra_args,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def with_command(cls, command: list[str], env: dict[str, str], port: int, log_path: Path) -> OperatorProcess:
        """An operator started by an exact command line (a sandbox, a chart's arguments)."""
        process = cls(Path("/nonexistent"), log_path, namespaces=[], lease_namespace="", lease_name="")
        process.args, process.env, process.port = command, env, port
        return process

    def start(self) -> OperatorProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 60
        while not self.healthy():
            if self.process.poll() is not None:
                raise AssertionError(f"operator exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise AssertionError(f"operator did not answer /healthz; see {self.log_path}")
            time.sleep(0.1)
        return self

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except OSError:
            return 0, b""

    def healthy(self) -> bool:
        return self._get("/healthz")[0] == 200

    def is_leader(self) -> bool:
        status, body = self._get("/healthz")
        return status == 200 and bool(json.loads(body)["leader"])

    def metric(self, name: str, /, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        _, body = self._get("/metrics")
        total = 0.0
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def kill(self, signum: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(signum)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)
