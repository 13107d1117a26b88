"""Bearer tokens from an OIDC issuer: verified with its JWKS, cached, refreshed with a throttle;
a failing JWKS endpoint is remembered (401, not 500, and no refetch per request); only RFC 9068
access tokens (typ at+jwt) unless configured otherwise."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa

from agent_contract.config import AuthConfig, AuthMode
from agent_runtime.app import create_app
from agent_runtime.security.tokens import OidcTokens, TokenError
from agent_runtime.settings import Settings
from agent_runtime.state import OIDC_TOKENS
from tests.runtime.conftest import make_layout

ISSUER = "https://login.example/realms/agents"


class Issuer:
    """A fake identity provider on loopback: a JWKS endpoint that counts its fetches."""

    def __init__(self) -> None:
        self.keys = {"k1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        self.fetches = 0
        self.down = False  # the JWKS endpoint answers 500

    def jwks(self) -> dict[str, Any]:
        entries = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            entries.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": entries}

    def token(self, kid: str = "k1", typ: str | None = "at+jwt", **changes: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": "test-agent",
            "sub": "user@example",
            "roles": ["analyst"],
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": f"j{now}",
        }
        claims.update(changes)
        headers = {"kid": kid, "typ": typ}  # typ None: PyJWT leaves it out of the header
        return jwt.encode(claims, self.keys[kid], algorithm="RS256", headers=headers)

    async def handle(self, _: web.Request) -> web.Response:
        self.fetches += 1
        if self.down:
            return web.json_response({"error": "down"}, status=500)
        return web.json_response(self.jwks())


@pytest.fixture
async def idp() -> AsyncIterator[tuple[Issuer, str]]:
    """The fake issuer served on loopback, and its JWKS URL."""
    issuer = Issuer()
    app = web.Application()
    app.router.add_get("/certs", issuer.handle)
    server = TestServer(app)
    await server.start_server()
    yield issuer, str(server.make_url("/certs"))
    await server.close()


async def _oidc_client(aiohttp_client: Any, tmp_path: Path, jwks_uri: str, **auth: Any) -> Any:
    config_file = make_layout(
        tmp_path / "agent",
        auth={"mode": "oidc", "issuer": ISSUER, "audience": "test-agent", "jwksUri": jwks_uri, **auth},
    )
    return await aiohttp_client(create_app(Settings.load(str(config_file))))


async def _call(client: Any, token: str) -> tuple[int, dict[str, Any]]:
    response = await client.post("/v1/operations/ping", json={}, headers={"Authorization": f"Bearer {token}"})
    return response.status, await response.json()


async def test_only_rfc9068_access_tokens_unless_configured(
    aiohttp_client: Any, tmp_path: Path, idp: tuple[Issuer, str]
) -> None:
    """An ID token (typ JWT, or none) of the same issuer and audience is not an access token."""
    issuer, jwks_uri = idp
    strict = await _oidc_client(aiohttp_client, tmp_path / "strict", jwks_uri)
    assert (await _call(strict, issuer.token(typ="at+jwt")))[0] == 200
    assert (await _call(strict, issuer.token(typ="application/at+jwt")))[0] == 200
    assert "typ" not in jwt.get_unverified_header(issuer.token(typ=None))
    for typ in ("JWT", None, "refresh+jwt"):
        status, body = await _call(strict, issuer.token(typ=typ))
        assert (status, body["message"]) == (401, "wrong token type"), typ
    lenient = await _oidc_client(aiohttp_client, tmp_path / "lenient", jwks_uri, acceptJwtType=True)
    for typ in ("at+jwt", "JWT", None):
        assert (await _call(lenient, issuer.token(typ=typ)))[0] == 200, typ
    assert (await _call(lenient, issuer.token(typ="refresh+jwt")))[0] == 401


async def test_a_failing_jwks_endpoint_is_remembered(
    aiohttp_client: Any, tmp_path: Path, idp: tuple[Issuer, str]
) -> None:
    """The issuer's JWKS answers 500: tokens are refused with 401 (not 500), and during the
    backoff no request fetches again, whatever kid it names; after it, one fetch recovers."""
    issuer, jwks_uri = idp
    client = await _oidc_client(aiohttp_client, tmp_path, jwks_uri)
    clock = [1000.0]
    client.app[OIDC_TOKENS].clock = lambda: clock[0]
    issuer.down = True
    for kid in ("k1", "k1", "unknown-1", "unknown-2", "k1"):
        token = issuer.token() if kid == "k1" else jwt.encode({"sub": "x"}, issuer.keys["k1"], "RS256", {"kid": kid})
        status, body = await _call(client, token)
        assert (status, body["code"], body["message"]) == (401, "invalid_token", "signing keys unavailable"), kid
    assert issuer.fetches == 1
    clock[0] += 6  # past the first backoff (5 s): one more try, still down; the next wait is longer
    assert (await _call(client, issuer.token()))[0] == 401
    clock[0] += 6
    assert (await _call(client, issuer.token()))[0] == 401
    assert issuer.fetches == 2
    issuer.down = False
    clock[0] += 10
    assert (await _call(client, issuer.token()))[0] == 200
    assert issuer.fetches == 3


async def test_oidc_tokens_work_end_to_end(aiohttp_client: Any, tmp_path: Path) -> None:
    issuer = Issuer()
    idp = web.Application()
    idp.router.add_get("/certs", issuer.handle)
    server = TestServer(idp)
    await server.start_server()
    try:
        config_file = make_layout(
            tmp_path / "agent",
            auth={
                "mode": "oidc",
                "issuer": ISSUER,
                "audience": "test-agent",
                "jwksUri": str(server.make_url("/certs")),
            },
        )
        client = await aiohttp_client(create_app(Settings.load(str(config_file))))
        ok = await client.post("/v1/operations/ping", json={}, headers={"Authorization": f"Bearer {issuer.token()}"})
        assert ok.status == 200, await ok.text()
        assert (await ok.json())["actor"] == "user@example"
        forged = await client.post(
            "/v1/operations/ping",
            json={},
            headers={"Authorization": f"Bearer {issuer.token(iss='https://evil.example')}"},
        )
        assert forged.status == 401
        login = await client.post("/v1/auth/login", json={"username": "a", "password": "b"})
        assert (login.status, (await login.json())["code"]) == (404, "login_disabled")
    finally:
        await server.close()


async def test_jwks_is_cached_and_unknown_kids_cannot_hammer_the_issuer() -> None:
    issuer = Issuer()
    clock = [1000.0]

    async def fetch(_: str) -> dict[str, Any]:
        issuer.fetches += 1
        return issuer.jwks()

    tokens = OidcTokens(
        AuthConfig(mode=AuthMode.OIDC, issuer=ISSUER, audience="test-agent", jwks_uri="https://login.example/certs"),
        fetch,
        clock=lambda: clock[0],
        min_refresh_seconds=30,
    )
    for _ in range(5):
        assert (await tokens.verify(issuer.token())).subject == "user@example"
    assert issuer.fetches == 1  # cached

    bogus = jwt.encode({"sub": "x"}, issuer.keys["k1"], algorithm="RS256", headers={"kid": "attacker-kid"})
    for _ in range(50):
        with pytest.raises(TokenError, match="unknown key id"):
            await tokens.verify(bogus)
    assert issuer.fetches == 1  # an unknown kid does not trigger a refetch within 30 s

    issuer.keys["k2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # the issuer rotates
    clock[0] += 31
    assert (await tokens.verify(issuer.token("k2"))).subject == "user@example"
    assert issuer.fetches == 2  # one refresh picked up the new key
    clock[0] += 301
    await tokens.verify(issuer.token("k2"))
    assert issuer.fetches == 3  # and the cache expires


async def test_oidc_refuses_hmac_and_none() -> None:
    issuer = Issuer()

    async def fetch(_: str) -> dict[str, Any]:
        return issuer.jwks()

    tokens = OidcTokens(
        AuthConfig(mode=AuthMode.OIDC, issuer=ISSUER, audience="test-agent", jwks_uri="https://login.example/certs"),
        fetch,
    )
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "test-agent", "sub": "x", "iat": now, "nbf": now, "exp": now + 60, "jti": "j"}
    hmac_token = jwt.encode(
        claims, "a-shared-secret-the-issuer-never-had-0123456789", algorithm="HS256", headers={"kid": "k1"}
    )
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": "k1"})  # type: ignore[arg-type]
    for token in (hmac_token, unsigned):
        with pytest.raises(TokenError, match="algorithm not allowed for this key"):
            await tokens.verify(token)
