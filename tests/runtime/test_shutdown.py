"""SIGTERM under load: in-flight requests complete, nothing is answered with an error, every
answered request has its audit record, and the trail ends with a final checkpoint."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from agent_runtime.audit import verify_lines
from agent_runtime.keys import KeyRing
from tests.cluster.operator_process import free_port
from tests.runtime.conftest import PASSWORD, make_layout

AGENT_RUNTIME = str(Path(sys.executable).parent / "agent-runtime")


async def test_sigterm_under_load_finishes_in_flight_work(tmp_path: Path) -> None:
    config = make_layout(tmp_path / "agent")
    port = free_port()
    server = subprocess.Popen(
        [AGENT_RUNTIME, "serve", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    answered: dict[str, int] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"{base}/healthz"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            async with session.post(
                f"{base}/v1/auth/login", json={"username": "ada", "password": PASSWORD}
            ) as response:
                token = (await response.json())["access_token"]
            stop_at = time.monotonic() + 1.0

            async def client(worker: int) -> None:
                for sequence in range(100_000):
                    request_id = f"w{worker:02d}-{sequence:06d}"
                    try:
                        async with session.post(
                            f"{base}/v1/operations/ping",
                            json={},
                            headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id},
                        ) as response:
                            await response.read()
                            answered[request_id] = response.status
                    except aiohttp.ClientError:
                        return  # the listener is closed: not accepted, which is allowed

            workers = [asyncio.create_task(client(i)) for i in range(16)]
            while time.monotonic() < stop_at:
                await asyncio.sleep(0.05)
            server.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*workers), timeout=30)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert len(answered) > 100
    assert set(answered.values()) == {200}, {status for status in answered.values() if status != 200}
    lines = (tmp_path / "agent" / "data" / "audit.log").read_text().splitlines(keepends=True)
    result = verify_lines(lines, KeyRing.load(tmp_path / "agent" / "keys"))
    assert result.ok, result.describe()
    recorded = {json.loads(line).get("request_id") for line in lines}
    assert [request_id for request_id in answered if request_id not in recorded] == []
    assert json.loads(lines[-1])["type"] == "checkpoint"  # closed cleanly: the final checkpoint is there
