"""The worst inputs we could build at the body limit, sent to a real `agent-runtime serve` (uvloop)
while a thread asks /healthz again and again: every probe is answered within 100 ms, each input is
processed, and a timeout kills the worker process running it."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent_runtime.api import MAX_BODY_BYTES
from eao_devtools.testkit.runtime import live_runtime
from tests.helpers import ROOT
from tests.runtime.conftest import make_layout
from tests.runtime.live import login

PROBE_BUDGET_SECONDS = 0.1  # what a liveness probe may wait, with room to spare on a busy machine
# A probe every 5 ms: any stall of the loop longer than that is seen, and the probes themselves do
# not take a core of the two the runtime, its workers and this test share (back to back, they did).
PROBE_INTERVAL_SECONDS = 0.005


def _document(content: str, kind: str = "text") -> bytes:
    return json.dumps({"input": {"content": content, "format": kind}}).encode()


def _repeated(unit: str, kind: str = "text") -> bytes:
    """``unit`` repeated to fill the body to its limit."""
    room = MAX_BODY_BYTES - len(_document("", kind))
    return _document(unit * (room // len(json.dumps(unit)[1:-1])), kind)


def _csv(columns: int, cell: list[str], room: int) -> str:
    """A CSV of ``columns`` columns filling ``room`` bytes once in a JSON string (a line break is
    two characters there)."""
    rng = random.Random(columns)
    lines = [",".join(f"c{i}" for i in range(columns))]
    size = len(lines[0]) + 2
    while True:
        line = ",".join(rng.choice(cell) for _ in range(columns))
        if size + len(line) + 2 > room:
            return "\n".join(lines)
        lines.append(line)
        size += len(line) + 2


def _analysis(source: dict[str, object]) -> bytes:
    return json.dumps({"input": source}).encode()


DIGITS = [str(digit) for digit in range(10)]
ROOM = MAX_BODY_BYTES - 100
RECORDS = [{"a": i % 10, "b": 1.5} for i in range(ROOM // 22)]  # as many small objects as fit
# (operation, body): each the worst we found for some detector or statistic, at the body limit.
CORPUS: dict[str, tuple[str, bytes]] = {
    "1, repeated (money, cards, phones)": ("process_document", _repeated("1,")),
    "a run of digits": ("process_document", _repeated("1")),
    "1. repeated (IP addresses, decimals)": ("process_document", _repeated("1.")),
    "a@ repeated (e-mail local parts)": ("process_document", _repeated("a@")),
    "A- repeated (organisation words)": ("process_document", _repeated("A-")),
    "an e-mail every 7 characters (150k findings)": ("process_document", _repeated("a@b.cc ")),
    "[ repeated (Markdown links)": ("process_document", _repeated("[", "markdown")),
    "[]( repeated (Markdown links)": ("process_document", _repeated("[](", "markdown")),
    "<a repeated (unclosed HTML tags)": ("process_document", _repeated("<a ", "html")),
    "<!-- repeated (unclosed HTML comments)": ("process_document", _repeated("<!--", "html")),
    "a million-digit character reference": ("process_document", _document("&#" + "1" * (ROOM - 60), "html")),
    "CSV 100 columns x 500 rows (the review's)": (
        "analyze_data",
        _analysis({"csv": _csv(100, DIGITS, 100_000)}),
    ),
    "CSV 200 columns, the widest allowed": ("analyze_data", _analysis({"csv": _csv(200, DIGITS, ROOM)})),
    "CSV 20 columns with gaps (correlation pairs)": (
        "analyze_data",
        _analysis({"csv": _csv(20, ["", "1", "2", "x"], ROOM)}),
    ),
    "JSON records (parsing and validation)": (
        "analyze_data",
        _analysis({"data": RECORDS}),
    ),
    "a report of 20 columns": (
        "generate_report",
        json.dumps({"input": {"title": "worst", "analysis": {"csv": _csv(20, DIGITS, ROOM - 100)}}}).encode(),
    ),
    "a report of JSON records": (
        "generate_report",
        json.dumps({"input": {"title": "worst", "analysis": {"data": RECORDS}}}).encode(),
    ),
    "ping with a megabyte of input": ("ping", json.dumps({"input": {"records": RECORDS}}).encode()),
}


class HealthProbe(threading.Thread):
    """Asks /healthz every PROBE_INTERVAL_SECONDS on one connection, recording (answered at,
    seconds waited)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.answers: list[tuple[float, float]] = []
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.done.is_set():
            started = time.perf_counter()
            try:
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                response.read()
            except OSError as error:
                self.failures.append(repr(error))
                return
            if response.status != 200:
                self.failures.append(f"status {response.status}")
            self.answers.append((time.monotonic(), time.perf_counter() - started))
            self.done.wait(PROBE_INTERVAL_SECONDS)

    def between(self, start: float, end: float) -> list[float]:
        return [waited for at, waited in self.answers if start <= at <= end]


@contextmanager
def probing(port: int) -> Iterator[HealthProbe]:
    probe = HealthProbe(port)
    probe.start()
    try:
        yield probe
    finally:
        probe.done.set()
        probe.join(timeout=30)
    assert probe.failures == []


def post(port: int, token: str, operation: str, body: bytes) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connection.request("POST", f"/v1/operations/{operation}", body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def test_the_worst_inputs_never_hold_the_event_loop(tmp_path: Path) -> None:
    assert all(len(body) <= MAX_BODY_BYTES for _, body in CORPUS.values())
    config = make_layout(
        tmp_path / "agent",
        securityLevel="confidential",
        operations=["ping", "analyze_data", "process_document", "generate_report"],
    )
    with live_runtime(config) as (_, base):
        port = int(base.rsplit(":", 1)[1])
        token = login(base, "ana")
        slow: list[str] = []
        with probing(port) as probe:
            for name, (operation, body) in CORPUS.items():
                started = time.monotonic()
                status, answer = post(port, token, operation, body)
                took = time.monotonic() - started
                assert status == 200, (name, answer[:300])
                waits = probe.between(started, time.monotonic())
                assert waits, f"{name}: no probe was answered during its {took:.2f} s"
                if max(waits) >= PROBE_BUDGET_SECONDS:
                    slow.append(f"{name}: a probe waited {max(waits) * 1000:.0f} ms")
                print(f"{name}: {took:.2f} s, {len(waits)} probes, longest {max(waits) * 1000:.1f} ms")
        assert slow == []


PLUGIN_ENTRY_POINTS = "[agent_runtime.operations]\nspin = tests.runtime.cpu_operations:SPIN\n"


def _descendants(pid: int) -> dict[int, set[int]]:
    """Children by parent, from /proc (Linux), below ``pid``."""
    tree: dict[int, set[int]] = {}
    pending = [pid]
    while pending:
        parent = pending.pop()
        children: set[int] = set()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            children |= {int(child) for child in task.read_text().split()}
        tree[parent] = children
        pending += children
    return tree


def _workers(pid: int) -> set[int]:
    """The runtime's worker processes: the children of its children (the fork server's)."""
    tree = _descendants(pid)
    return {worker for child in tree[pid] for worker in tree.get(child, set())}


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_timeout_kills_the_worker_and_sigterm_leaves_no_process_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CPU-bound plugin, installed as a package would be: an entry point on the runtime's path.
    site = tmp_path / "site"
    (site / "eao_cpu_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "eao_cpu_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: eao-cpu-plugin\n")
    (site / "eao_cpu_plugin-0.1.dist-info" / "entry_points.txt").write_text(PLUGIN_ENTRY_POINTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT)]))
    config = make_layout(tmp_path / "agent", operations=["ping", "spin"], resilience={"operationTimeoutSeconds": 1})
    with live_runtime(config) as (server, base):
        port = int(base.rsplit(":", 1)[1])
        token = login(base)
        before = _workers(server.pid)
        assert len(before) >= 1
        with probing(port) as probe:
            started = time.monotonic()
            status, answer = post(port, token, "spin", json.dumps({"input": {"seconds": 60}}).encode())
            took = time.monotonic() - started
        assert (status, json.loads(answer)["code"]) == (504, "operation_timeout")
        assert 1.0 <= took < 1.5
        waits = probe.between(started, started + took)
        assert len(waits) >= 10
        assert max(waits) < PROBE_BUDGET_SECONDS
        killed = before - _workers(server.pid)
        assert len(killed) == 1
        assert not _exists(killed.pop())  # gone by the time the 504 was sent
        deadline = time.monotonic() + 10
        while len(_workers(server.pid)) < len(before):  # a fresh worker is forked in its place
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.05)
        assert post(port, token, "spin", b'{"input": {"seconds": 0}}')[0] == 200
        everything = {pid for children in _descendants(server.pid).values() for pid in children}
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while left := {pid for pid in everything if _exists(pid)}:  # fork server, resource tracker, workers
        assert time.monotonic() < deadline, f"still running after the runtime stopped: {left}"
        time.sleep(0.05)
