"""Load against a real `agent-runtime serve` process on loopback, for the tests that must see a
process die or stop (kill -9, SIGTERM) or be fuzzed over the network. The process itself comes from
eao_devtools.testkit.runtime (live_runtime), which the benchmarks use too."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp

from tests.runtime.conftest import PASSWORD


def login(base: str, user: str = "ada") -> str:
    request = urllib.request.Request(
        f"{base}/v1/auth/login", data=json.dumps({"username": user, "password": PASSWORD}).encode()
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["access_token"])


async def load_then(
    base: str, token: str, workers: int, load_seconds: float, action: object, then_seconds: float | None = None
) -> dict[str, int]:
    """Sends pings with numbered request ids from ``workers`` clients; after ``load_seconds``
    calls ``action()`` (a kill, a SIGTERM) while they keep going, until the server stops
    answering (or, with ``then_seconds``, that long after the action). Returns the status of
    every request that got an answer, by request id."""
    answered: dict[str, int] = {}
    assert callable(action)
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession, worker: int) -> None:
        for sequence in range(1_000_000):
            if stop.is_set():
                return
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
        if then_seconds is not None:
            await asyncio.sleep(then_seconds)
            stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    return answered
