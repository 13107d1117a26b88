"""Several replicas of one agent on one shared PostgreSQL (a real server from Debian's packages,
started here on loopback): what one replica does, the others see at once. The same suite runs on
the embedded SQLite store with one replica (A, B and C are then the same replica), which is what
that backend promises.

Each replica is a whole runtime app (its own data directory and audit log, the agent's keys and
users), served over HTTP and reached through its own client, as pods behind a Service are."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent_contract.config import CircuitBreakerConfig, RuntimeConfig
from agent_runtime import sharedstate
from agent_runtime.app import create_app
from agent_runtime.operations import BUILTINS
from agent_runtime.resilience import CircuitBreaker
from agent_runtime.security.throttle import PAIR, LoginThrottle
from agent_runtime.settings import Settings, SettingsError
from agent_runtime.sharedstate import PostgresEngine, PostgresRevocations, PostgresThrottleCounters
from agent_runtime.state import THROTTLE
from eao_devtools.testkit.operator_process import free_port
from eao_devtools.testkit.postgres import PostgresServer
from tests.runtime.conftest import AGENT_RUNTIME, fresh_database, login, make_layout

Client = TestClient[web.Request, web.Application]
REPORT = {"input": {"title": "Weekly", "analysis": {"data": [{"ms": 10}, {"ms": 20}]}}}
FINANCIAL = {"input": {"data": [{"amount": 100}, {"amount": 250}]}}
DOCUMENT = {"input": {"content": "mail jane@example.com", "format": "text"}, "subject": "jane@example.com",
            "purpose": "support"}  # fmt: skip
CONSENTS = "/v1/gdpr/consents/nobody@example.com"  # any authenticated read
CONFIG_CHANGES: dict[str, Any] = {
    "securityLevel": "confidential",
    "operations": ["process_document", "analyze_data", "generate_report"],
    "compliance": {"frameworks": ["GDPR", "SOX"], "financialOperations": ["analyze_data"]},
}


@pytest.fixture(params=["postgres", "sqlite"])
async def replicas(request: pytest.FixtureRequest, aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[list[Client]]:
    """A, B and C: three replicas on one PostgreSQL, or one replica three times on SQLite."""
    config_file = make_layout(tmp_path / "agent", **CONFIG_CHANGES)
    config = RuntimeConfig.from_yaml(config_file.read_text())
    if request.param == "sqlite":
        client = await aiohttp_client(create_app(Settings(config)))
        yield [client, client, client]
        return
    url = await fresh_database(request.getfixturevalue("postgres"))
    clients = []
    for name in "abc":
        settings = Settings(config.model_copy(update={"data_dir": str(tmp_path / f"data-{name}")}), database_url=url)
        clients.append(await aiohttp_client(create_app(settings, dict(BUILTINS))))
    yield clients


async def bearer(client: Client, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {(await login(client, user))['access_token']}"}


async def test_a_logout_on_a_is_refused_on_b_and_c_at_once(replicas: list[Client]) -> None:
    a, b, c = replicas
    session = await login(a, "otto")
    headers = {"Authorization": f"Bearer {session['access_token']}"}
    for replica in (b, c):
        assert (await replica.get(CONSENTS, headers=headers)).status == 200
    assert (await a.post("/v1/auth/logout", headers=headers)).status in (200, 204)
    for replica in (b, c):
        refused = await replica.get(CONSENTS, headers=headers)
        assert refused.status == 401, await refused.text()
    # The refresh token of that session is refused everywhere too.
    refreshed = await c.post("/v1/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert refreshed.status == 401


async def test_an_approval_requested_on_a_is_decided_on_b_and_runs_once(replicas: list[Client]) -> None:
    a, b, c = replicas
    maker, checker = await bearer(a, "otto"), await bearer(b, "ada")
    pending = await a.post("/v1/operations/analyze_data", json=FINANCIAL, headers=maker)
    assert pending.status == 202, await pending.text()
    approval_id = (await pending.json())["approval_id"]
    listed = await (await c.get("/v1/approvals", headers=checker)).json()
    assert approval_id in [entry["id"] for entry in listed["pending"]]
    decisions = await asyncio.gather(
        b.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"}, headers=checker),
        c.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"}, headers=checker),
    )
    statuses = sorted(response.status for response in decisions)
    assert statuses == [200, 409], [await r.text() for r in decisions]
    ran = next(r for r in decisions if r.status == 200)
    assert (await ran.json())["result"]["columns"]["amount"]["mean"] == 175


async def test_a_consent_withdrawn_on_b_refuses_the_operation_on_c(replicas: list[Client]) -> None:
    a, b, c = replicas
    operator = await bearer(a, "otto")
    consent = {"subject": "jane@example.com", "purpose": "support"}
    granted = await a.post(
        "/v1/gdpr/consents", json={**consent, "granted": True, "evidence": "form 7"}, headers=operator
    )
    assert granted.status == 201
    assert (await c.post("/v1/operations/process_document", json=DOCUMENT, headers=operator)).status == 200
    await b.post("/v1/gdpr/consents", json={**consent, "granted": False}, headers=operator)
    refused = await c.post("/v1/operations/process_document", json=DOCUMENT, headers=operator)
    assert (refused.status, (await refused.json())["code"]) == (403, "consent_required")
    history = (await (await a.get("/v1/gdpr/consents/jane@example.com", headers=operator)).json())["history"]
    assert [entry["granted"] for entry in history] == [True, False]  # the ledger, in order


async def test_a_report_made_on_a_downloads_from_b_and_an_erasure_on_c_leaves_nothing(replicas: list[Client]) -> None:
    a, b, c = replicas
    operator, admin = await bearer(a, "otto"), await bearer(c, "ada")
    consent = {"subject": "jane@example.com", "purpose": "support", "granted": True, "evidence": "form 8"}
    assert (await a.post("/v1/gdpr/consents", json=consent, headers=operator)).status == 201
    report = {"input": {**REPORT["input"], "subject": "jane@example.com"}}
    made = await a.post("/v1/operations/generate_report", json=report, headers=operator)
    assert made.status == 200, await made.text()
    url = (await made.json())["result"]["download"]["json"]
    assert (await b.get(url, headers=operator)).status == 200
    exported = await (await b.get("/v1/gdpr/subjects/jane@example.com/export", headers=admin)).json()
    assert exported["results"], exported
    erased = await c.delete("/v1/gdpr/subjects/jane@example.com", headers=admin)
    assert erased.status == 200
    for replica in (a, b, c):
        assert (await replica.get(url, headers=operator)).status == 404
        after = await (await replica.get("/v1/gdpr/subjects/jane@example.com/export", headers=admin)).json()
        assert after["results"] == []
        assert after["consents"] == []


async def test_concurrent_wrong_passwords_over_the_replicas_are_throttled_as_one(replicas: list[Client]) -> None:
    for replica in replicas:
        replica.app[THROTTLE].clock = lambda: 1_000_000.0  # no backoff runs out mid-test
    guesses = [
        replicas[i % 3].post("/v1/auth/login", json={"username": "ada", "password": f"guess {i}"}) for i in range(30)
    ]
    statuses = sorted(response.status for response in await asyncio.gather(*guesses))
    assert statuses == [401] * PAIR.free_failures + [429] * (30 - PAIR.free_failures)


async def test_replicas_starting_together_migrate_once(postgres: PostgresServer) -> None:
    url = await fresh_database(postgres)
    breaker = CircuitBreaker("database", CircuitBreakerConfig())
    engines = [PostgresEngine(url, breaker) for _ in range(5)]
    await asyncio.gather(*(engine.open() for engine in engines))
    try:
        assert {engine.schema_version for engine in engines} == {len(sharedstate.MIGRATIONS)}
        rows = await engines[0].fetch("SELECT version FROM schema_migrations ORDER BY version", ())
        assert rows == [(v,) for v in range(1, len(sharedstate.MIGRATIONS) + 1)]
    finally:
        await asyncio.gather(*(engine.close() for engine in engines))


async def test_a_database_killed_under_load_fails_closed_and_loses_nothing_acknowledged(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """SIGKILL PostgreSQL while three replicas take consents and approvals: readiness goes false,
    nothing is answered as authorised meanwhile (a logged-out token included), and after the
    restart every acknowledged write is there."""
    with PostgresServer(Path(tempfile.mkdtemp(prefix="eao-pg-kill-"))) as server:
        config = RuntimeConfig.from_yaml(make_layout(tmp_path / "agent", **CONFIG_CHANGES).read_text())
        replicas = []
        for name in "abc":
            copy = config.model_copy(update={"data_dir": str(tmp_path / f"data-{name}")})
            replicas.append(await aiohttp_client(create_app(Settings(copy, database_url=server.url))))
        operator, checker = await bearer(replicas[0], "otto"), await bearer(replicas[1], "ada")
        gone = await login(replicas[2], "vic")
        gone_headers = {"Authorization": f"Bearer {gone['access_token']}"}
        assert (await replicas[2].post("/v1/auth/logout", headers=gone_headers)).status in (200, 204)

        acknowledged: dict[str, list[str]] = {"consents": [], "approvals": []}
        answers: list[tuple[str, int]] = []
        stop = asyncio.Event()

        async def writer(index: int) -> None:
            replica, sequence = replicas[index % 3], 0
            while not stop.is_set():
                sequence += 1
                subject = f"s{index}-{sequence}@example.com"
                consent = {"subject": subject, "purpose": "support", "granted": True, "evidence": "load"}
                granted = await replica.post("/v1/gdpr/consents", json=consent, headers=operator)
                answers.append(("consent", granted.status))
                if granted.status == 201:
                    acknowledged["consents"].append(subject)
                pending = await replica.post("/v1/operations/analyze_data", json=FINANCIAL, headers=operator)
                answers.append(("approval", pending.status))
                if pending.status == 202:
                    acknowledged["approvals"].append((await pending.json())["approval_id"])
                revoked = await replica.get(CONSENTS, headers=gone_headers)
                answers.append(("revoked", revoked.status))
                await asyncio.sleep(0.01)

        async def until(condition: Any, seconds: float, what: str) -> None:
            deadline = asyncio.get_running_loop().time() + seconds
            while not await condition():
                assert asyncio.get_running_loop().time() < deadline, what
                await asyncio.sleep(0.1)

        async def acknowledged_some() -> bool:
            return len(acknowledged["consents"]) >= 10 and len(acknowledged["approvals"]) >= 10

        writers = [asyncio.create_task(writer(i)) for i in range(6)]
        await until(acknowledged_some, 30, "no writes acknowledged before the kill")
        server.kill()
        killed_at = len(answers)

        async def all_unready() -> bool:
            return all([(await replica.get("/readyz")).status == 503 for replica in replicas])

        async def refused_under_load() -> bool:  # the writers kept trying during the outage
            return sum(1 for _, status in answers[killed_at:] if status == 503) >= 30

        await until(all_unready, 20, "readiness never went false")
        await until(refused_under_load, 30, "no requests refused during the outage")
        during = answers[killed_at:]
        server.start()

        async def all_ready() -> bool:
            return all([(await replica.get("/readyz")).status == 200 for replica in replicas])

        await until(all_ready, 60, "readiness never came back")
        stop.set()
        await asyncio.gather(*writers)

        # Fail closed: during the outage nothing needing the database was acknowledged or let through.
        assert {status for _, status in during} <= {503, 201, 202, 401}, during
        assert [entry for entry in answers if entry[0] == "revoked" and entry[1] != 401 and entry[1] != 503] == []
        assert any(status == 503 for _, status in during), during
        assert acknowledged["consents"], answers[:20]
        # Nothing acknowledged is lost: every consent and approval is there after the restart.
        reader = replicas[2]
        for subject in acknowledged["consents"]:
            history = (await (await reader.get(f"/v1/gdpr/consents/{subject}", headers=operator)).json())["history"]
            assert [entry["granted"] for entry in history] == [True], subject
        pending_ids = {
            entry["id"] for entry in (await (await reader.get("/v1/approvals", headers=checker)).json())["pending"]
        }
        assert set(acknowledged["approvals"]) <= pending_ids
        assert (await reader.get(CONSENTS, headers=gone_headers)).status == 401  # still revoked


async def test_agent_runtime_serve_with_a_host_given_keeps_its_state_on_the_database(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """``agent-runtime serve --host ...`` with DATABASE_URL: the state is on PostgreSQL, as /readyz
    reports (``--host`` had made new Settings without it, and the state went to SQLite)."""
    url = await fresh_database(postgres)
    config = make_layout(tmp_path / "agent")
    port = free_port()
    server = subprocess.Popen(
        [AGENT_RUNTIME, "serve", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"],
        env={**os.environ, "DATABASE_URL": url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as session:
            readiness = await _ready(session, f"http://127.0.0.1:{port}/readyz", server)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert readiness["checks"]["state"]["backend"] == "postgres", readiness


async def _ready(session: aiohttp.ClientSession, url: str, server: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return dict(await response.json())
        except aiohttp.ClientConnectionError:
            pass
        assert server.poll() is None, "the runtime exited"
        assert time.monotonic() < deadline, "the runtime did not become ready"
        await asyncio.sleep(0.1)


def test_a_database_url_that_is_not_postgres_is_refused_naming_the_variable(tmp_path: Path) -> None:
    config_file = make_layout(tmp_path / "agent")
    with pytest.raises(SettingsError, match="DATABASE_URL must be a postgres:// or postgresql:// URL"):
        Settings.load(str(config_file), env={"DATABASE_URL": "mysql://root@db/agent"})
    assert Settings.load(str(config_file), env={"DATABASE_URL": ""}).database_url is None


async def test_expired_revocations_and_forgotten_counters_are_purged(postgres: PostgresServer) -> None:
    engine = PostgresEngine(await fresh_database(postgres), CircuitBreaker("database", CircuitBreakerConfig()))
    await engine.open()
    try:
        now = [1_000_000.0]
        revocations = PostgresRevocations(engine, clock=lambda: now[0])
        await revocations.revoke("old", now[0] - 1)
        await revocations.revoke("live", now[0] + 60)
        assert await revocations.purge_expired() == 1
        assert await revocations.revoked("live", "") is True
        throttle = LoginThrottle(PostgresThrottleCounters(engine), clock=lambda: now[0])
        await (await throttle.reserve("ada", "10.0.0.1")).failed()
        assert await throttle.purge_forgotten() == 0  # its failures still count
        now[0] += 3600
        assert await throttle.purge_forgotten() == 3  # pair, address and account
        assert await engine.fetch("SELECT count(*) FROM throttle", ()) == [(0,)]
    finally:
        await engine.close()


@pytest.mark.parametrize("hostile", ["nul\u0000byte", "lone \ud800 surrogate"])
async def test_a_value_no_store_can_keep_is_a_400_naming_the_field(replicas: list[Client], hostile: str) -> None:
    """Not a 500, and not a database outage: the breaker must not open on a client's bad input."""
    a = replicas[0]
    operator = await bearer(a, "otto")
    for _ in range(12):  # more than the breaker's failure threshold
        refused = await a.post(
            "/v1/gdpr/consents", json={"subject": hostile, "purpose": "support", "granted": True}, headers=operator
        )
        body = await refused.json()
        assert (refused.status, body["code"]) == (400, "invalid_field"), body
        assert body["message"].startswith("subject:")
    assert (await a.get("/readyz")).status == 200
    assert (await a.get(f"/v1/reports/{'%00'}", headers=operator)).status in (400, 404)
    assert (await a.get("/readyz")).status == 200
