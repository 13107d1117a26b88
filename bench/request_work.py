"""bench/request_work: the Python work a request costs each server, counted, not timed.

    .venv/bin/python -m bench.request_work [--requests 1600] [--top 30]

On this 2-core machine req/s and CPU time per request swing by a third between runs (other
tenants' CPU steal), which hides any change to the request path under a tenth. Counting is exact:
each server runs in this one process, in turn, and a minimal client of this module sends the same
keep-alive POSTs over 16 connections while ``sys.settrace`` counts the bytecode instructions
(opcodes) and Python calls of everything but the client (the client's sockets are uvloop's, in C).
The interpreter's work was 70 % of the loop thread's CPU in a ``perf`` profile of ours (the kernel's
socket and scheduling work most of the rest), so opcodes a request track where ours spends; they
do not count C (JSON, hashing, the HTTP parser, syscalls), and the tracer slows everything, so
nothing here is a time.

Servers: ours (``create_app``, as ``agent-runtime serve`` builds it: bearer token, RBAC, the audit
record fsynced by its appender, metrics, 0 % or 100 % of requests traced), a bare aiohttp handler,
and FastAPI's hello on uvicorn (httptools), the two baselines of ``bench.runtime``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import uvloop
from aiohttp import web

from bench.runtime import PASSWORD, layout
from eao_devtools.testkit.operator_process import free_port

CONNECTIONS = 16
HERE = str(Path(__file__).resolve())


class Counts:
    def __init__(self) -> None:
        self.opcodes = 0
        self.calls = 0
        self.by_code: collections.Counter[CodeType] = collections.Counter()

    def tracer(self, frame: FrameType, event: str, _arg: object) -> Callable[..., Any] | None:
        if frame.f_code.co_filename == HERE:
            return None  # the client's own lines
        frame.f_trace_opcodes = True
        if event == "opcode":
            self.opcodes += 1
            self.by_code[frame.f_code] += 1
        elif event == "call":
            self.calls += 1
        return self.tracer


def _request(path: str, bearer: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {bearer}\r\nContent-Length: 2\r\n\r\n{{}}"
    ).encode()


async def _client(port: int, request: bytes, count: int) -> None:
    """``count`` requests, one at a time, on one keep-alive connection; each answer must be a 200."""
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setblocking(False)
        buffered = b""
        for _ in range(count):
            await loop.sock_sendall(sock, request)
            while (end := buffered.find(b"\r\n\r\n")) < 0:
                buffered += await loop.sock_recv(sock, 65536)
            head, buffered = buffered[:end], buffered[end + 4 :]
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"not a 200: {head[:200]!r}")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(buffered) < length:
                buffered += await loop.sock_recv(sock, 65536)
            buffered = buffered[length:]


async def _load(port: int, request: bytes, requests: int) -> None:
    await asyncio.gather(*(_client(port, request, requests // CONNECTIONS) for _ in range(CONNECTIONS)))


async def count(port: int, request: bytes, requests: int) -> Counts:
    await _load(port, request, 4 * CONNECTIONS)  # warm: caches filled, connections' first requests done
    counts = Counts()
    sys.settrace(counts.tracer)
    try:
        await _load(port, request, requests)
    finally:
        sys.settrace(None)
    return counts


async def _ours(ratio: float, work: Path) -> tuple[web.AppRunner, int, str]:
    from agent_runtime.app import create_app
    from agent_runtime.settings import Settings

    port = free_port()
    config = layout(Path(tempfile.mkdtemp(dir=work)), Path(tempfile.mkdtemp(dir=work)), ratio)
    runner = web.AppRunner(create_app(Settings.load(str(config), port=port)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    login = json.dumps({"username": "bench", "password": PASSWORD}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/auth/login HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(login)}\r\nConnection: close\r\n\r\n".encode()
        + login
    )
    answer = await reader.read()
    writer.close()
    return runner, port, str(json.loads(answer.split(b"\r\n\r\n", 1)[1])["access_token"])


async def _bare() -> tuple[web.AppRunner, int, str]:
    async def ping(_: web.Request) -> web.Response:
        return web.json_response({"operation": "ping", "result": {"pong": True}})

    app = web.Application()
    app.router.add_post("/v1/operations/ping", ping)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port, "unused"


async def _fastapi() -> tuple[Callable[[], Awaitable[None]], int]:
    import uvicorn

    from bench.servers.fastapi_hello import app

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http="httptools", access_log=False, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)

    async def stop() -> None:
        server.should_exit = True
        await task

    return stop, port


async def main_async(args: argparse.Namespace) -> int:
    results: dict[str, Counts] = {}
    with tempfile.TemporaryDirectory(prefix="bench-work-") as tmp:
        for name, ratio in (("ours: audited, 0% traced", 0.0), ("ours: audited, 100% traced", 1.0)):
            runner, port, bearer = await _ours(ratio, Path(tmp))
            gc.collect()
            results[name] = await count(port, _request("/v1/operations/ping", bearer), args.requests)
            await runner.cleanup()
        runner, port, _ = await _bare()
        results["bare aiohttp handler"] = await count(port, _request("/v1/operations/ping", "x"), args.requests)
        await runner.cleanup()
        stop, port = await _fastapi()
        results["FastAPI + uvicorn (httptools) hello"] = await count(
            port, _request("/v1/operations/ping", "x"), args.requests
        )
        await stop()
    requests = args.requests // CONNECTIONS * CONNECTIONS
    fastapi = results["FastAPI + uvicorn (httptools) hello"].opcodes / requests
    print(f"\nPython work a request ({requests} POSTs over {CONNECTIONS} keep-alive connections, counted)")
    print(f"{'server':40}{'opcodes':>10}{'calls':>8}{'vs FastAPI':>12}")
    for name, counts in results.items():
        opcodes = counts.opcodes / requests
        print(f"{name:40}{opcodes:>10.0f}{counts.calls / requests:>8.0f}{fastapi / opcodes:>11.2f}x")
    if args.top:
        ours = results["ours: audited, 0% traced"]
        print(f"\nours (0% traced), the {args.top} functions with the most opcodes of their own a request:")
        for code, opcodes in ours.by_code.most_common(args.top):
            where = code.co_filename.split("site-packages/")[-1]
            print(f"{opcodes / requests:>8.1f}  {code.co_name} ({where}:{code.co_firstlineno})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1600, help="requests counted per server")
    parser.add_argument("--top", type=int, default=0, help="also list ours' busiest functions")
    args = parser.parse_args()
    if args.requests < CONNECTIONS:
        parser.error(f"--requests: at least {CONNECTIONS}")
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
