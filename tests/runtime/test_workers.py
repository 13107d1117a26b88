"""CPU-bound operations run in worker processes: the loop keeps answering meanwhile, a timeout
kills the worker (which is replaced), and bulkheads, input errors and crashes are answered as
before. Also: a body is read whole however it arrives, and never beyond the limit."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import hashlib
import json
import os
import pickle
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator
from multiprocessing import forkserver
from multiprocessing.process import BaseProcess
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent_contract.config import Permission, SecurityLevel
from agent_runtime import workers as workers_module
from agent_runtime.api import MAX_BODY_BYTES
from agent_runtime.operation_routes import INLINE_BODY_BYTES
from agent_runtime.operations import Operation
from agent_runtime.state import WORKERS
from tests.runtime.conftest import AppFactory, login
from tests.runtime.cpu_operations import OPERATIONS, echo, kept_pickled, same

Client = TestClient[web.Request, web.Application]


async def _headers(client: Client, user: str = "ada") -> dict[str, str]:
    return {"Authorization": f"Bearer {(await login(client, user))['access_token']}"}


@contextlib.asynccontextmanager
async def healthz_latencies(client: Client) -> AsyncIterator[list[float]]:
    """/healthz asked again and again while the block runs; yields the latencies, filled in.

    Client and server share this process, which holds the whole test session: a full garbage
    collection of it takes some 0.2 s, nothing to do with what is measured, so the objects there
    before the block are frozen out of the collector's way meanwhile."""
    latencies: list[float] = []
    done = asyncio.Event()
    gc.freeze()

    async def poll() -> None:
        while not done.is_set():
            started = time.perf_counter()
            response = await client.get("/healthz")
            await response.read()
            assert response.status == 200
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)  # a probe every 5 ms: any longer stall of the loop is seen

    poller = asyncio.create_task(poll())
    try:
        yield latencies
    finally:
        done.set()
        await poller
        gc.unfreeze()


async def test_cpu_bound_operations_run_in_a_worker_and_the_others_on_the_loop(make_client: AppFactory) -> None:
    client = await make_client(extra_operations=OPERATIONS)
    headers = await _headers(client)
    workers = client.app[WORKERS]
    assert len(workers.pids) == workers.size >= 1  # started with the app: it serves CPU-bound operations
    spun = await client.post("/v1/operations/spin", json={"input": {"seconds": 0}}, headers=headers)
    assert (await spun.json())["result"]["pid"] in workers.pids
    on_the_loop = await client.post("/v1/operations/spin_on_the_loop", json={"input": {}}, headers=headers)
    assert (await on_the_loop.json())["result"]["pid"] == os.getpid()  # undeclared: as before
    analysed = await client.post(
        "/v1/operations/analyze_data", json={"input": {"data": [{"v": 1}, {"v": 3}]}}, headers=headers
    )
    body: dict[str, Any] = await analysed.json()
    assert analysed.status == 200, body
    assert body["result"]["columns"]["v"]["mean"] == 2
    assert set(body) == {"operation", "result", "request_id", "trace_id", "actor"}


async def test_a_timeout_answers_504_kills_the_worker_and_a_fresh_one_replaces_it(make_client: AppFactory) -> None:
    client = await make_client(extra_operations=OPERATIONS, resilience={"operationTimeoutSeconds": 1})
    headers = await _headers(client)
    workers = client.app[WORKERS]
    before = workers.pids
    async with healthz_latencies(client) as latencies:
        started = time.monotonic()
        timed_out = await client.post("/v1/operations/spin", json={"input": {"seconds": 60}}, headers=headers)
        elapsed = time.monotonic() - started
    assert timed_out.status == 504
    assert (await timed_out.json())["code"] == "operation_timeout"
    assert 1.0 <= elapsed < 1.5
    assert len(latencies) >= 10  # the loop answered throughout...
    assert max(latencies) < 0.1, latencies  # ...and promptly
    killed = before - workers.pids
    assert len(killed) == 1  # the one that ran it, and only that one
    with pytest.raises(ProcessLookupError):
        os.kill(killed.pop(), 0)  # gone and reaped by the time the 504 was sent
    await workers.settled()
    assert len(workers.pids) == workers.size
    assert workers.replaced == 1
    again = await client.post("/v1/operations/spin", json={"input": {"seconds": 0}}, headers=headers)
    assert again.status == 200
    assert (await again.json())["result"]["pid"] in workers.pids


async def test_a_crashed_worker_answers_500_and_is_replaced(make_client: AppFactory) -> None:
    client = await make_client(extra_operations=OPERATIONS)
    headers = await _headers(client)
    workers = client.app[WORKERS]
    crashed = await client.post("/v1/operations/crash", json={"input": {}}, headers=headers)
    assert crashed.status == 500
    assert (await crashed.json())["code"] == "operation_failed"
    await workers.settled()
    assert (len(workers.pids), workers.replaced) == (workers.size, 1)
    assert (await client.post("/v1/operations/spin", json={"input": {}}, headers=headers)).status == 200


async def test_errors_raised_in_a_worker_are_answered_as_on_the_loop(make_client: AppFactory) -> None:
    client = await make_client(extra_operations=OPERATIONS)
    headers = await _headers(client)
    refused = await client.post("/v1/operations/refuse", json={"input": {}}, headers=headers)
    assert (refused.status, (await refused.json())["message"]) == (422, "input: nothing to work with")
    unknown = await client.post(
        "/v1/operations/analyze_data", json={"input": {"data": [{"v": 1}], "columns": ["w"]}}, headers=headers
    )
    assert (unknown.status, (await unknown.json())["message"]) == (422, "input: columns: not in the data: w")
    # A large body is parsed and validated in a worker: the same answers as the loop gives.
    padding = b" " * INLINE_BODY_BYTES
    for body, status, code in (
        (b"{not json" + padding, 400, "invalid_json"),
        (b"[1]" + padding, 400, "invalid_body"),
        (b'{"input": "text"}' + padding, 400, "invalid_field"),
        (json.dumps({"input": {"data": [1] * 50_000}}).encode(), 422, "invalid_input"),
    ):
        response = await client.post("/v1/operations/analyze_data", data=body, headers=headers)
        answer = await response.json()
        assert (response.status, answer["code"]) == (status, code), answer
    assert answer["message"].endswith("; and 49990 more")  # ten problems named, not 50,000


async def test_the_bulkhead_still_bounds_cpu_bound_operations(make_client: AppFactory) -> None:
    client = await make_client(
        extra_operations=OPERATIONS,
        resilience={"maxConcurrentPerOperation": 1, "maxQueuedPerOperation": 0, "operationTimeoutSeconds": 1},
    )
    headers = await _headers(client)
    calls = [client.post("/v1/operations/spin", json={"input": {"seconds": 60}}, headers=headers) for _ in range(2)]
    answers = await asyncio.gather(*calls)
    # One runs (and times out); the other finds the bulkhead full, however the two interleave.
    assert sorted(answer.status for answer in answers) == [503, 504]


def test_a_cpu_bound_operation_needs_a_handler_a_worker_can_import() -> None:
    async def inner(payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    with pytest.raises(TypeError, match="module-level function"):
        Operation("inner", Permission.EXECUTE, SecurityLevel.PUBLIC, inner, "a closure", cpu_bound=True)


async def test_closing_the_app_stops_its_workers(make_client: AppFactory) -> None:
    client = await make_client()
    pids = client.app[WORKERS].pids
    assert pids
    await client.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_an_agent_without_cpu_bound_operations_starts_its_workers_with_the_first_large_body(
    make_client: AppFactory,
) -> None:
    """Its pod does without the workers' memory until a body too large to parse on the loop comes."""
    client = await make_client(operations=["ping"])
    headers = await _headers(client)
    workers = client.app[WORKERS]
    small = await client.post("/v1/operations/ping", json={"input": {"n": 1}}, headers=headers)
    assert small.status == 200
    assert (workers.started, workers.pids) == (False, set())
    large = {"input": {"rows": [{"a": i} for i in range(INLINE_BODY_BYTES // 8)]}}
    answer = await client.post("/v1/operations/ping", json=large, headers=headers)
    assert answer.status == 200, await answer.text()
    assert workers.started
    assert len(workers.pids) == workers.size >= 1


async def test_first_calls_at_once_start_one_pool_and_a_deadline_during_the_start_leaks_no_worker(
    make_client: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(operations=["ping"], resilience={"operationTimeoutSeconds": 1})
    headers = await _headers(client)
    workers = client.app[WORKERS]
    fork = workers_module._fork

    def slow_fork(connection: socket.socket) -> BaseProcess:
        time.sleep(1.5)  # a start slower than the callers' deadline, as on a loaded node
        return fork(connection)

    monkeypatch.setattr(workers_module, "_fork", slow_fork)
    large = {"input": {"rows": [{"a": i} for i in range(INLINE_BODY_BYTES // 8)]}}
    answers = await asyncio.gather(*(client.post("/v1/operations/ping", json=large, headers=headers) for _ in range(6)))
    assert [answer.status for answer in answers] == [504] * 6  # every caller's deadline passed during the start
    await workers.settled()
    deadline = time.monotonic() + 30
    while not workers.started:  # the start went on without them
        assert time.monotonic() < deadline, "the pool never finished starting"
        await asyncio.sleep(0.05)
    assert len(workers.pids) == workers.size
    # Whatever the deadlines cut short, the fork server has no worker the pool does not know of.
    assert _fork_server_children() == workers.pids
    again = await client.post("/v1/operations/ping", json=large, headers=headers)
    assert again.status == 200


def _fork_server_children() -> set[int]:
    """The live (not zombie) children of multiprocessing's fork server, read from /proc: workers."""
    server = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                state, parent = stat.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue  # gone meanwhile
        if int(parent) == server and state != "Z":
            found.add(int(entry))
    return found


async def test_a_body_sent_in_pieces_is_read_whole(make_client: AppFactory) -> None:
    client = await make_client()
    headers = {**await _headers(client, "ana"), "Content-Type": "application/json"}
    body = json.dumps({"input": {"data": [{"a": i, "b": 2 * i} for i in range(8000)]}}).encode()
    assert 190_000 < len(body) < 200_000

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]
            await asyncio.sleep(0.05)  # a slow client: each 64 KiB write reaches the server alone

    response = await client.post("/v1/operations/analyze_data", data=pieces(), headers=headers)
    answer = await response.json()
    assert response.status == 200, answer
    assert answer["result"]["columns"]["a"]["count"] == 8000


async def test_a_body_beyond_the_limit_is_refused_without_a_content_length(make_client: AppFactory) -> None:
    client = await make_client()
    headers = await _headers(client)

    async def too_much() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536  # whitespace: valid JSON up to the limit, then too much of it

    response = await client.post("/v1/operations/ping", data=too_much(), headers=headers)
    assert (response.status, (await response.json())["code"]) == (413, "payload_too_large")


async def test_json_nested_too_deep_is_invalid_json_not_a_server_error(make_client: AppFactory) -> None:
    client = await make_client()
    headers = await _headers(client)
    for depth in (10_000, INLINE_BODY_BYTES + 1):  # parsed on the loop, and in a worker
        response = await client.post("/v1/operations/ping", data=b"[" * depth, headers=headers)
        assert (response.status, (await response.json())["code"]) == (400, "invalid_json")


async def test_a_large_body_is_still_held_for_approval_and_checked_for_consent(make_client: AppFactory) -> None:
    """A large CPU-bound body goes to one worker for its parsing and its run, unless the loop needs
    it: an input to hold for approval (SOX), a subject's consent to check (GDPR)."""
    rows = [{"amount": i % 100} for i in range(INLINE_BODY_BYTES // 8)]
    large = {"input": {"data": rows}}
    assert len(json.dumps(large)) > INLINE_BODY_BYTES
    plain = await make_client(operations=["analyze_data"])
    ran = await plain.post("/v1/operations/analyze_data", json=large, headers=await _headers(plain))
    answer = await ran.json()
    assert ran.status == 200, answer
    assert answer["result"]["columns"]["amount"]["count"] == len(rows)
    assert (answer["actor"], answer["request_id"]) == ("ada", ran.headers["X-Request-ID"])

    sox = await make_client(
        operations=["analyze_data"], compliance={"frameworks": ["SOX"], "financialOperations": ["analyze_data"]}
    )
    held = await sox.post("/v1/operations/analyze_data", json=large, headers=await _headers(sox, "otto"))
    assert (held.status, (await held.json())["status"]) == (202, "pending_approval")
    checker = await _headers(sox)
    (pending,) = (await (await sox.get("/v1/approvals", headers=checker)).json())["pending"]
    approved = await sox.post(f"/v1/approvals/{pending['id']}", json={"decision": "approve"}, headers=checker)
    assert (await approved.json())["result"]["columns"]["amount"]["count"] == len(rows)  # the input was kept whole

    gdpr = await make_client(
        securityLevel="confidential", operations=["process_document"], compliance={"frameworks": ["GDPR"]}
    )
    document = {"input": {"content": "mail jane@example.com " * 5000, "format": "text"}}
    assert len(json.dumps(document)) > INLINE_BODY_BYTES
    operator = await _headers(gdpr, "otto")
    unnamed = await gdpr.post("/v1/operations/process_document", json=document, headers=operator)
    assert (unnamed.status, (await unnamed.json())["message"]) == (
        400,
        "subject: a string of 1 to 128 bytes is required",
    )
    refused = await gdpr.post(
        "/v1/operations/process_document",
        json={**document, "subject": "jane@example.com", "purpose": "support"},
        headers=operator,
    )
    assert (refused.status, (await refused.json())["code"]) == (403, "consent_required")


async def test_large_values_cross_to_a_worker_and_back_whole() -> None:
    """Bytes wrapped with bulk() travel beside a call's pickle, not inside it (no copy on the way),
    as do a Pickled's bytes and an encoded answer: they must still arrive whole, where they were in
    the value, both ways. Bytes not wrapped stay bytes (a plugin's model may hold some)."""
    pool = workers_module.WorkerPool(1)
    await pool.start(preload=["tests.runtime.cpu_operations"])
    try:
        blob = os.urandom(3 * 2**20 + 7)
        inner = os.urandom(2**20)
        value = {
            "blob": workers_module.bulk(blob),
            "plain": blob,  # not wrapped: inside the pickle, and bytes on arrival
            "pickled": workers_module.Pickled(pickle.dumps(inner)),  # unpickled over there
            "text": "\u00e9t\u00e9 " * 2**18,
            "nested": [blob[:100], (workers_module.bulk(blob), workers_module.bulk(bytearray(blob[:5])))],
        }
        back = await pool.run(echo, value)
        assert back["pid"] in pool.pids
        assert back["types"] == {
            "blob": "bytearray",
            "plain": "bytes",
            "pickled": "bytes",
            "text": "str",
            "nested": "list",
        }
        assert back["blob_sha256"] == hashlib.sha256(blob).hexdigest()
        returned = back["value"]
        assert (bytes(returned["blob"]), returned["plain"], returned["pickled"]) == (blob, blob, inner)
        assert returned["text"] == value["text"]
        assert [returned["nested"][0], *map(bytes, returned["nested"][1])] == [blob[:100], blob, blob[:5]]

        # A Pickled in a reply stays one: the server holds its bytes and never looks inside.
        held = await pool.run(kept_pickled, blob)
        assert isinstance(held, workers_module.Pickled)
        assert pickle.loads(held.data) == blob  # noqa: S301 - made by our own worker
        assert await pool.run(same, held) == blob  # and sent on, it reaches a worker as its value
        for copied in (copy.copy(held), copy.deepcopy(held), pickle.loads(pickle.dumps(held))):  # noqa: S301
            assert isinstance(copied, workers_module.Pickled)
            assert pickle.loads(copied.data) == blob  # noqa: S301 - made by our own worker

        rows = [{"row": i, "text": "x" * 50} for i in range(20_000)]  # an answer of about 1.2 MB
        encoded = await pool.run_json(same, rows)
        assert json.loads(encoded) == rows
    finally:
        await pool.close()


@pytest.mark.parametrize(
    "announced",
    [
        workers_module._HEADER.pack(2**62, 0),  # a pickle of 4 EiB
        workers_module._HEADER.pack(10, 2**31),  # two billion bulk buffers
        workers_module._HEADER.pack(10, 2) + workers_module._LENGTH.pack(2**29) * 2 + b"x" * 10,  # 1 GiB in all
    ],
    ids=["huge-pickle", "too-many-buffers", "buffers-too-large-together"],
)
async def test_a_frame_out_of_step_is_refused_before_anything_is_allocated_for_it(announced: bytes) -> None:
    """A torn or stray write on a worker's socket reads as a header announcing anything: either
    side refuses what no call or reply can be, instead of allocating what it announces."""
    tracemalloc.start()
    try:
        server, worker = socket.socketpair()
        with server, worker:
            worker.sendall(announced)
            with pytest.raises(ConnectionError, match="out of step"):
                workers_module._receive_frame(server)
        server, worker = socket.socketpair()
        with server, worker:
            server.setblocking(False)
            worker.sendall(announced)
            with pytest.raises(ConnectionError, match="out of step"):
                await workers_module._receive_frame_async(asyncio.get_running_loop(), server)
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "value",
    [
        {"mean": float("nan"), "max": float("inf"), "min": -float("inf"), "rows": [1.5, float("nan")]},
        {"mean": float("nan"), "rows": [1.5, float("nan")], "count": 2**70},  # orjson refuses the int
        {1: float("nan"), "nested": ({"inf": float("inf")},), float("nan"): 1},  # orjson refuses the keys
    ],
    ids=["orjson", "json-big-int", "json-int-key"],
)
def test_answers_never_hold_nan_whichever_encoder_writes_them(value: Any) -> None:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    decoded = json.loads(workers_module.json_bytes(value), parse_constant=refuse)
    assert "null" in json.dumps(decoded)
    assert decoded.get("count", 2**70) == 2**70
