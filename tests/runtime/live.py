"""A real `agent-runtime serve` process on loopback, and load against it, for the tests that must
see a process die or stop (kill -9, SIGTERM) or be fuzzed over the network."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from agent_operator.render.runtime_config import build_runtime_config
from agent_operator.spec import EnterpriseAgent
from agent_runtime.config import RuntimeConfig
from agent_runtime.keys import write_key_files
from tests.cluster.operator_process import free_port
from tests.runtime.conftest import PASSWORD

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
                urllib.request.urlopen(f"{base}/healthz", timeout=1)
                break
            except OSError:
                assert server.poll() is None, "the runtime exited while starting"
                assert time.monotonic() < deadline, "the runtime did not start"
                time.sleep(0.1)
        yield server, base
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGKILL)
        server.wait()


def login(base: str, user: str = "ada") -> str:
    request = urllib.request.Request(
        f"{base}/v1/auth/login", data=json.dumps({"username": user, "password": PASSWORD}).encode()
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["access_token"])


async def load_then(base: str, token: str, workers: int, load_seconds: float, action: object) -> dict[str, int]:
    """Sends pings with numbered request ids from ``workers`` clients; after ``load_seconds``
    calls ``action()`` (a kill, a SIGTERM) while they keep going, until the server stops
    answering. Returns the status of every request that got an answer, by request id."""
    answered: dict[str, int] = {}
    assert callable(action)

    async def client(session: aiohttp.ClientSession, worker: int) -> None:
        for sequence in range(1_000_000):
            request_id = f"w{worker:02d}-{sequence:06d}"
            headers = {"Authorization": f"Bearer {token}", "X-Request-ID": request_id}
            try:
                async with session.post(f"{base}/v1/operations/ping", json={}, headers=headers) as response:
                    await response.read()
                    answered[request_id] = response.status
            except (TimeoutError, aiohttp.ClientError):
                return  # the server is gone or no longer accepts: not answered

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(client(session, i)) for i in range(workers)]
        await asyncio.sleep(load_seconds)
        action()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    return answered


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
