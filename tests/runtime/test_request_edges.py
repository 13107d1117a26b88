"""The edges of every request: the server's own request id (the client's kept beside it), a
Server header without versions, and failed authentications audited in aggregate."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from agent_runtime.security.throttle import FailureDigest
from agent_runtime.state import AUDIT, AUTH_FAILURES, AUTHORIZER
from tests.runtime.conftest import AppFactory, login
from tests.runtime.test_observability import samples

SERVER_ID = re.compile(r"[0-9a-f]{16}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_request_id_is_the_servers_and_the_clients_is_kept_beside_it(make_client: AppFactory) -> None:
    client = await make_client()
    token = (await login(client, "ada"))["access_token"]
    seen = []
    for incoming in ("client-chosen-id-1", "client-chosen-id-1", "not sane; with spaces", "x" * 65):
        response = await client.post(
            "/v1/operations/ping", json={}, headers={"Authorization": f"Bearer {token}", "X-Request-ID": incoming}
        )
        server_id = response.headers["X-Request-ID"]
        assert SERVER_ID.fullmatch(server_id), server_id
        assert (await response.json())["request_id"] == server_id
        record = next(r for r in reversed(client.app[AUDIT].recent) if r["action"] == "ping")
        assert record["request_id"] == server_id
        seen.append((server_id, record["details"].get("client_request_id")))
    assert [client_id for _, client_id in seen] == ["client-chosen-id-1", "client-chosen-id-1", None, None]
    assert len({server_id for server_id, _ in seen}) == 4  # a client cannot make two requests share an id


async def test_unhandled_errors_are_logged_with_both_ids_and_the_route_template(
    make_client: AppFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(compliance={"frameworks": ["GDPR"]})
    token = (await login(client, "ada"))["access_token"]

    def broken(*_: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(client.app[AUTHORIZER], "decide", broken)
    with caplog.at_level(logging.ERROR, logger="agent_runtime"):
        response = await client.get(
            "/v1/gdpr/subjects/alice@example.com/export",
            headers={"Authorization": f"Bearer {token}", "X-Request-ID": "client-chosen-id-2"},
        )
    assert response.status == 500
    [line] = [record.getMessage() for record in caplog.records if record.name == "agent_runtime"]
    assert response.headers["X-Request-ID"] in line
    assert "client-chosen-id-2" in line
    assert "/v1/gdpr/subjects/{subject}/export" in line
    assert "alice" not in line


async def test_the_server_header_names_no_versions(make_client: AppFactory) -> None:
    client = await make_client()
    bearer = {"Authorization": f"Bearer {(await login(client, 'ada'))['access_token']}"}
    answers = [
        await client.get("/healthz"),
        await client.get("/no/such/route", headers=bearer),
        await client.post("/v1/auth/login", json={"username": "ada", "password": "wrong"}),
        await client.post("/v1/operations/ping", json={}),
        await client.post("/v1/operations/ping", json={}, headers=bearer),
    ]
    assert [response.status for response in answers] == [200, 404, 401, 401, 200]
    for response in answers:
        assert response.headers["Server"] == "agent"


async def test_failed_authentications_are_audited_in_aggregate(make_client: AppFactory) -> None:
    """A flood of bad tokens costs one audit record per (reason, address) and window, plus one
    summary with the count; every failure is still counted in the metrics."""
    client = await make_client()
    clock = FakeClock()
    digest: FailureDigest = client.app[AUTH_FAILURES]
    digest.clock = clock
    garbage = {"Authorization": "Bearer not.a-token.at-all"}
    for _ in range(40):
        assert (await client.post("/v1/operations/ping", json={}, headers=garbage)).status == 401
    for _ in range(10):
        assert (await client.post("/v1/auth/refresh", json={"refresh_token": "not.a-token"})).status == 401

    def failures() -> list[tuple[str, Any, Any]]:
        return [
            (r["action"], r["details"].get("reason"), r["details"].get("repeated"))
            for r in client.app[AUDIT].recent
            if r["type"] == "authn" and r["result"] == "failure"
        ]

    assert failures() == [("verify_token", "malformed token", None), ("refresh", "malformed token", None)]
    clock.now += digest.interval_seconds  # the window ends; the next failure writes its summary
    assert (await client.post("/v1/operations/ping", json={}, headers=garbage)).status == 401
    assert failures()[2:] == [
        ("verify_token", "malformed token", 39),
        ("refresh", "malformed token", 9),
        ("verify_token", "malformed token", None),  # the first of the new window
    ]
    summary = client.app[AUDIT].recent[-2]
    assert (summary["client_ip"], summary["details"]["window_seconds"]) == ("127.0.0.1", digest.interval_seconds)
    found = samples(await (await client.get("/metrics")).text())
    assert found[("agent_auth_failures_total", (("reason", "malformed token"),))] == 51

    for _ in range(3):
        await client.post("/v1/operations/ping", json={}, headers=garbage)
    await client.close()  # what is still counted at shutdown is written too
    assert failures()[-1] == ("verify_token", "malformed token", 3)
