"""Sessions: a refresh answers to the users file as it is now, a login's refresh chain has an
absolute end, and logout or a replayed refresh token ends the whole session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent_runtime.state import AUDIT, CONFIG, LOCAL_TOKENS
from tests.runtime.conftest import PASSWORD, AppFactory, login

Client = TestClient[web.Request, web.Application]


async def _refresh(client: Client, refresh_token: str) -> tuple[int, dict[str, Any]]:
    response = await client.post("/v1/auth/refresh", json={"refresh_token": refresh_token})
    return response.status, await response.json()


async def _write_status(client: Client, access_token: str) -> int:
    """An operation that needs the write permission (operator and admin roles have it)."""
    response = await client.post(
        "/v1/operations/write_internal", json={}, headers={"Authorization": f"Bearer {access_token}"}
    )
    return response.status


def _edit_users(client: Client, name: str, change: Any) -> None:
    """Rewrites the users file the way the kubelet updates a mounted Secret: a new file renamed
    into place. ``change`` maps the user's line to its new line (None removes it)."""
    path = Path(str(client.app[CONFIG].auth.users_file))
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith(f"{name}:"):
            line = change(line)
        if line is not None:
            lines.append(line)
    staged = path.with_name(".users.new")
    staged.write_text("\n".join(lines) + "\n")
    os.replace(staged, path)


async def test_a_removed_user_cannot_refresh(make_client: AppFactory) -> None:
    client = await make_client()
    pair = await login(client, "otto")
    _edit_users(client, "otto", lambda line: None)
    status, body = await _refresh(client, pair["refresh_token"])
    assert (status, body["code"], body["message"]) == (401, "invalid_token", "user removed or disabled")
    assert await _write_status(client, pair["access_token"]) == 401  # the session is over


async def test_a_disabled_user_cannot_refresh_or_log_in(make_client: AppFactory) -> None:
    client = await make_client()
    pair = await login(client, "otto")
    _edit_users(client, "otto", lambda line: line.replace(":$argon2id$", ":!$argon2id$", 1))
    status, body = await _refresh(client, pair["refresh_token"])
    assert (status, body["message"]) == (401, "user removed or disabled")
    disabled = await client.post("/v1/auth/login", json={"username": "otto", "password": PASSWORD})
    assert disabled.status == 401


async def test_a_refresh_carries_the_roles_the_users_file_gives_now(make_client: AppFactory) -> None:
    client = await make_client()
    pair = await login(client, "otto")
    assert await _write_status(client, pair["access_token"]) == 200
    _edit_users(client, "otto", lambda line: line.replace("otto:operator:", "otto:viewer:", 1))
    status, downgraded = await _refresh(client, pair["refresh_token"])
    assert status == 200
    assert await _write_status(client, downgraded["access_token"]) == 403  # a viewer may not write
    record = next(r for r in reversed(client.app[AUDIT].recent) if r["action"] == "refresh")
    assert (record["result"], record["details"]["roles"]) == ("success", ["viewer"])


async def test_a_session_ends_at_its_absolute_lifetime(make_client: AppFactory) -> None:
    client = await make_client(auth={"sessionMaxSeconds": 3600, "refreshTtlSeconds": 28800})
    issuer = client.app[LOCAL_TOKENS]
    pair = await login(client, "ada")
    claims = jwt.decode(pair["refresh_token"], options={"verify_signature": False})
    assert claims["exp"] <= claims["auth_time"] + 3600  # not the 8 h refresh lifetime
    status, second = await _refresh(client, pair["refresh_token"])
    assert status == 200
    again = jwt.decode(second["refresh_token"], options={"verify_signature": False})
    assert (again["auth_time"], again["sid"]) == (claims["auth_time"], claims["sid"])  # the same session

    real_clock = issuer.clock
    issuer.clock = lambda: real_clock() + 3600  # an hour after the login
    status, body = await _refresh(client, second["refresh_token"])
    assert (status, body["message"]) == (401, "session expired")


async def test_replaying_a_used_refresh_token_ends_the_session(make_client: AppFactory) -> None:
    client = await make_client()
    first = await login(client, "ada")
    status, second = await _refresh(client, first["refresh_token"])
    assert status == 200
    # The stolen, already used token comes back: refused, and the session it belongs to ends.
    status, body = await _refresh(client, first["refresh_token"])
    assert (status, body["message"]) == (401, "token revoked")
    status, body = await _refresh(client, second["refresh_token"])
    assert (status, body["message"]) == (401, "token revoked")
    assert await _write_status(client, second["access_token"]) == 401
    reuse = [r for r in client.app[AUDIT].recent if r["result"] == "reuse_detected"]
    assert len(reuse) == 1
    assert (reuse[0]["actor"], reuse[0]["details"]["session_revoked"]) == ("ada", True)
    other = await login(client, "ada")  # another login of the same user is not affected
    assert await _write_status(client, other["access_token"]) == 200


async def test_logout_ends_the_session(make_client: AppFactory) -> None:
    client = await make_client()
    first = await login(client, "ada")
    status, second = await _refresh(client, first["refresh_token"])
    assert status == 200
    out = await client.post("/v1/auth/logout", headers={"Authorization": f"Bearer {second['access_token']}"})
    assert await out.json() == {"revoked": 1, "sessions_ended": 1}
    # No refresh token was handed in, yet the session's refresh token and older access token die too.
    assert (await _refresh(client, second["refresh_token"]))[0] == 401
    assert await _write_status(client, first["access_token"]) == 401
    assert await _write_status(client, second["access_token"]) == 401


async def test_token_answers_are_not_cached(make_client: AppFactory) -> None:
    client = await make_client()
    answers = [await client.post("/v1/auth/login", json={"username": "ada", "password": "wrong"})]
    pair = await login(client, "ada")
    answers.append(await client.post("/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}))
    new_pair = await answers[-1].json()
    answers.append(
        await client.post("/v1/auth/logout", headers={"Authorization": f"Bearer {new_pair['access_token']}"})
    )
    answers.append(await client.post("/v1/auth/login", json={"username": "ada", "password": "x" * 2000}))
    for response in answers:
        assert response.headers["Cache-Control"] == "no-store", response.status
        assert response.headers["Pragma"] == "no-cache", response.status
    assert [r.status for r in answers] == [401, 200, 200, 400]


async def test_old_refresh_tokens_without_a_session_are_refused(make_client: AppFactory) -> None:
    """A refresh token minted before sessions existed (no sid) cannot extend itself for ever."""
    client = await make_client()
    issuer = client.app[LOCAL_TOKENS]
    token, _ = issuer.issue("ada", ("admin",), "refresh+jwt")
    status, body = await _refresh(client, token)
    assert (status, body["message"]) == (401, "missing claim sid")
