"""The whole authorisation matrix, role x permission x level, over HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent_contract.config import DEFAULT_CLEARANCES, DEFAULT_ROLES, Permission, RuntimeConfig, SecurityLevel
from agent_runtime.api import MAX_BODY_BYTES, ApiError, parse_json_object, read_body
from agent_runtime.security.rbac import MAX_REMEMBERED_DECISIONS, Authorizer, Principal
from tests.runtime.conftest import ROLE_USERS, AppFactory, login


@pytest.mark.parametrize("agent_level", [SecurityLevel.INTERNAL, SecurityLevel.RESTRICTED])
async def test_authorization_matrix(make_client: AppFactory, agent_level: SecurityLevel) -> None:
    client = await make_client(securityLevel=agent_level.value)
    checked = 0
    for role, user in ROLE_USERS.items():
        token = (await login(client, user))["access_token"]
        for permission in Permission:
            for level in SecurityLevel:
                response = await client.post(
                    f"/v1/operations/{permission.value}_{level.value}",
                    json={"input": {"x": 1}},
                    headers={"Authorization": f"Bearer {token}"},
                )
                expected = (
                    permission in DEFAULT_ROLES[role]
                    and agent_level.allows(level)
                    and DEFAULT_CLEARANCES[role].allows(level)
                )
                body = await response.json()
                assert response.status == (200 if expected else 403), (role, permission, level, body)
                if expected:
                    assert body["result"] == {"echo": {"x": 1}}
                    assert body["actor"] == user
                else:
                    assert body["code"] == "forbidden"
                    assert body["request_id"] == response.headers["X-Request-ID"]
                checked += 1
    assert checked == 4 * 4 * 4


async def test_denials_are_audited(make_client: AppFactory) -> None:
    client = await make_client(securityLevel="internal")
    viewer = (await login(client, "vic"))["access_token"]
    response = await client.post("/v1/operations/admin_public", json={}, headers={"Authorization": f"Bearer {viewer}"})
    assert response.status == 403
    admin = (await login(client, "ada"))["access_token"]
    audit = await (await client.get("/v1/audit?type=authz", headers={"Authorization": f"Bearer {admin}"})).json()
    (denial,) = audit["records"]
    assert denial["actor"] == "vic"
    assert denial["result"] == "denied"
    assert denial["action"] == "operation:admin_public"


async def test_audit_endpoint_is_admin_only(make_client: AppFactory) -> None:
    client = await make_client()
    operator = (await login(client, "otto"))["access_token"]
    response = await client.get("/v1/audit", headers={"Authorization": f"Bearer {operator}"})
    assert response.status == 403


async def test_unknown_operation_and_bad_bodies(make_client: AppFactory) -> None:
    client = await make_client()
    token = (await login(client, "ada"))["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    missing = await client.post("/v1/operations/launch_missiles", json={}, headers=auth)
    assert (missing.status, (await missing.json())["code"]) == (404, "unknown_operation")
    garbage = await client.post("/v1/operations/ping", data=b"{not json", headers=auth)
    assert (garbage.status, (await garbage.json())["code"]) == (400, "invalid_json")
    not_object = await client.post("/v1/operations/ping", json=[1, 2], headers=auth)
    assert (not_object.status, (await not_object.json())["code"]) == (400, "invalid_body")
    bad_input = await client.post("/v1/operations/ping", json={"input": "text"}, headers=auth)
    assert (bad_input.status, (await bad_input.json())["code"]) == (400, "invalid_field")
    huge = await client.post("/v1/operations/ping", data=b"x" * (2 * 1024 * 1024), headers=auth)
    assert huge.status == 413


def test_remembered_decisions_follow_the_roles_and_stay_bounded() -> None:
    """Decisions are remembered per (roles, permission, level): an OIDC issuer sending endless role
    combinations must neither grow that memory without end nor get another combination's answer."""
    authorizer = Authorizer(RuntimeConfig.model_validate({"agentName": "rbac"}))
    for index in range(3 * MAX_REMEMBERED_DECISIONS):
        roles = (f"unknown-{index}",) if index % 2 else (f"unknown-{index}", "admin")
        decision = authorizer.decide(Principal("someone", roles), Permission.EXECUTE, SecurityLevel.INTERNAL)
        assert decision.allowed == (index % 2 == 0), roles
        assert len(authorizer._decisions) <= MAX_REMEMBERED_DECISIONS


async def test_bodies_are_read_whole_and_as_the_standard_librarys_json_reads_them(make_client: AppFactory) -> None:
    """The body is parsed by orjson first and by the standard library where orjson refuses: what the
    standard library reads is still read (not a 400), what it refuses is still a 400, and a body
    that arrives in several pieces is read whole."""
    client = await make_client()
    token = (await login(client, "ada"))["access_token"]
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    read_by_the_standard_library = [
        b'{"input": {"n": NaN, "m": -Infinity}}',  # not JSON by the RFC; json.loads reads it
        b'{"input": {"big": 123456789012345678901234567890}}',  # beyond 64 bits
        b'{"input": {"lone": "\\ud800"}}',  # an unpaired surrogate, escaped
        b'\xef\xbb\xbf{"input": {}}',  # a UTF-8 byte order mark
        '{"input": {"text": "caf\u00e9"}}'.encode("utf-16"),  # UTF-16, as json.loads detects it
        b'{"input": {}, "input": {"twice": 1}}',  # a repeated key: the last one counts
    ]
    for body in read_by_the_standard_library:
        response = await client.post("/v1/operations/ping", data=body, headers=auth)
        assert response.status == 200, (body, await response.text())
    # And read as the standard library reads them, value for value (repr: NaN equals NaN, and an
    # integer beyond 64 bits stays an int, which orjson alone would make a float).
    beyond_64_bits = [b'{"a": 18446744073709551617}', b'{"a": -9223372036854775809}', b'{"a": [1e400, -0.0]}']
    for body in read_by_the_standard_library + beyond_64_bits:
        assert repr(parse_json_object(body)) == repr(json.loads(body)), body
    for body in (b'{"input": {}} trailing', b'{"input": "\xff"}', b"{'input': {}}", b'{"a": 1,}'):
        response = await client.post("/v1/operations/ping", data=body, headers=auth)
        assert (response.status, (await response.json())["code"]) == (400, "invalid_json"), body

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b'{"inp', b'ut": {"k": "', b"v" * 70_000, b'"}}'):
            yield piece
            await asyncio.sleep(0.01)  # each piece its own chunk on the wire

    chunked = await client.post("/v1/operations/ping", data=pieces(), headers=auth)
    assert chunked.status == 200, await chunked.text()


async def test_a_body_is_read_whole_when_the_parser_saw_its_end_before_the_handler_read(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> None:
    """A chunked body written at once, read by a handler that comes to it late: aiohttp's parser
    has seen the end by then while part of the body is still to be read (its end-seen flag alone
    gave 528 of 700 KB here). read_body returns all of it."""
    large = b"v" * 700_000

    async def late_reader(request: web.Request) -> web.Response:
        # Lets the body fill the reader's buffer to where aiohttp pauses reading, before the first
        # read (there is no public event for that; waiting for is_eof() alone never ends: the
        # parser sees the end only once a read resumes it). This shapes timing, not a wait for a result.
        await asyncio.sleep(0.05)
        body = await read_body(request)
        return web.Response(text=str(len(body)) if body == large else f"{len(body)} bytes, not the body")

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/", late_reader)
    server = await aiohttp_server(app)
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(large[i : i + 4096]), large[i : i + 4096]) for i in range(0, len(large), 4096)
    )
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST / HTTP/1.1\r\nHost: agent\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert answer.endswith(b"\r\n\r\n700000"), answer[-200:]


async def test_a_first_read_past_the_limit_is_refused_before_the_end_of_the_body_comes(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunked body whose first read is already past the limit, its end not yet sent: refused
    413 at once. Before, only later reads were checked, so once the end came the body was
    returned whole; the client here sends its end only after an answer, so that path would never
    answer (the read times out)."""
    monkeypatch.setattr("agent_runtime.api.MAX_BODY_BYTES", 200)

    async def reader(request: web.Request) -> web.Response:
        try:
            body = await read_body(request)
        except ApiError as error:
            return web.Response(status=error.status, text=error.code)
        return web.Response(text=f"read {len(body)} bytes")

    app = web.Application()
    app.router.add_post("/", reader)
    server = await aiohttp_server(app)
    reader_stream, writer = await asyncio.open_connection(server.host, server.port)
    piece = b"v" * 300
    writer.write(
        b"POST / HTTP/1.1\r\nHost: agent\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(piece), piece)
    )
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader_stream.readuntil(b"\r\n"), timeout=10)
        assert head.startswith(b"HTTP/1.1 413 "), head
    finally:
        writer.write(b"0\r\n\r\n")
        writer.close()
