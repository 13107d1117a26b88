"""A real ``agent-runtime serve`` process on loopback, configured as the operator configures an agent's pod."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from agent_contract.config import RuntimeConfig
from agent_contract.keyfiles import write_key_files
from agent_operator.render.runtime_config import build_runtime_config
from agent_operator.spec import EnterpriseAgent
from eao_devtools.testkit.operator_process import free_port

AGENT_RUNTIME = str(Path(sys.executable).parent / "agent-runtime")


@contextmanager
def live_runtime(
    config: Path, stderr: int = subprocess.DEVNULL, port: int | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Starts the runtime, waits for /healthz, yields (process, base URL); kills it at the end."""
    port = port or free_port()
    server = subprocess.Popen(
        [AGENT_RUNTIME, "serve", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1):  # noqa: S310 - our loopback URL
                    break
            except OSError:
                # Raised, not asserted: the benchmarks may run with -O, which drops asserts.
                if server.poll() is not None:
                    raise AssertionError("the runtime exited while starting") from None
                if time.monotonic() > deadline:
                    raise AssertionError("the runtime did not start") from None
                time.sleep(0.1)
        yield server, base
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGKILL)
        server.wait()


def agent_runtime_layout(agent: EnterpriseAgent, directory: Path, key_files: Mapping[str, bytes]) -> Path:
    """The runtime config the operator renders for ``agent`` (its ConfigMap), with the pod's paths
    moved under ``directory`` and ``key_files`` as its key Secret: a stand-in for one agent pod."""
    data = build_runtime_config(agent).model_dump(by_alias=True, mode="json", exclude_none=True)
    write_key_files(directory / "keys", dict(key_files))
    data["auth"] = {**data["auth"], "keysDir": str(directory / "keys")}
    data["auth"].pop("usersFile", None)
    data["dataDir"] = str(directory / "data")
    data["audit"] = {**data.get("audit", {}), "stdout": False}
    config = directory / "config.yaml"
    config.write_text(RuntimeConfig.model_validate(data).to_yaml())
    return config
