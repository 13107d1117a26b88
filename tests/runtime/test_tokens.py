"""Every token attack is refused with 401 and a JSON body; good tokens, refresh and logout work."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from agent_contract.keyfiles import KeyRing, new_key_files, write_key_files
from agent_runtime.security.tokens import ACCESS_TYPE, REFRESH_TYPE, LocalTokens
from agent_runtime.state import KEYS, LOCAL_TOKENS
from tests.runtime.conftest import AppFactory, login


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}."


async def _status(client: Any, token: str) -> tuple[int, dict[str, Any]]:
    response = await client.post("/v1/operations/ping", json={}, headers={"Authorization": f"Bearer {token}"})
    return response.status, await response.json()


def _claims(tokens: LocalTokens, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": tokens.config.issuer,
        "aud": tokens.config.audience,
        "sub": "ada",
        "roles": ["admin"],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "j1",
    }
    claims.update(changes)
    return claims


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256", "HS256"])
async def test_token_attacks_are_refused(make_client: AppFactory, algorithm: str) -> None:
    client = await make_client(algorithm)
    app = client.app
    tokens: LocalTokens = app[LOCAL_TOKENS]
    signer = app[KEYS].signer
    good, _ = tokens.issue("ada", ("admin",))
    assert (await _status(client, good))[0] == 200

    def sign(
        payload: dict[str, Any], key: Any = signer.private, alg: str = signer.algorithm.value, **header: Any
    ) -> str:
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": signer.kid, "typ": ACCESS_TYPE, **header})

    head, body, signature = good.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=="))
    attacks: dict[str, str] = {
        "alg none": _unsigned({"alg": "none", "kid": signer.kid, "typ": ACCESS_TYPE}, _claims(tokens)),
        "unknown kid": jwt.encode(
            _claims(tokens),
            signer.private,
            algorithm=signer.algorithm.value,
            headers={"kid": "nope", "typ": ACCESS_TYPE},
        ),
        "expired": sign(_claims(tokens, exp=int(time.time()) - 3600, nbf=int(time.time()) - 7200)),
        "not yet valid": sign(_claims(tokens, nbf=int(time.time()) + 3600, exp=int(time.time()) + 7200)),
        "wrong audience": sign(_claims(tokens, aud="another-agent")),
        "wrong issuer": sign(_claims(tokens, iss="https://evil.example")),
        "missing exp": sign({k: v for k, v in _claims(tokens).items() if k != "exp"}),
        "tampered payload": f"{head}.{_b64(json.dumps({**payload, 'roles': ['admin', 'root']}).encode())}.{signature}",
        "truncated": good[: len(good) // 2],
        "garbage": "this-is-not.a-jwt.at-all",
        "empty parts": "..",
        "refresh used as access": tokens.issue("ada", ("admin",), REFRESH_TYPE)[0],
        "wrong typ": sign(_claims(tokens), typ="JWT"),
    }
    if algorithm != "HS256":
        # HS/RS confusion: an HMAC token keyed with our *public* key, claiming our kid.
        public_pem = signer.verifier.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = {"alg": "HS256", "kid": signer.kid, "typ": ACCESS_TYPE}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims(tokens)).encode())}"
        mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        attacks["HS/RS key confusion"] = f"{signing_input}.{_b64(mac)}"
    else:
        attacks["other secret"] = jwt.encode(
            _claims(tokens), b"x" * 64, algorithm="HS256", headers={"kid": signer.kid, "typ": ACCESS_TYPE}
        )
    for name, token in attacks.items():
        status, answer = await _status(client, token)
        assert status == 401, name
        assert answer["code"] == "invalid_token", name
        assert answer["request_id"], name


async def test_missing_and_malformed_authorization_headers(make_client: AppFactory) -> None:
    client = await make_client()
    for headers in ({}, {"Authorization": "Basic YWRhOnB3"}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}):
        response = await client.post("/v1/operations/ping", json={}, headers=headers)
        assert response.status == 401
        assert (await response.json())["code"] == "unauthenticated"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_rotated_keys_still_verify(make_client: AppFactory, tmp_path: Path) -> None:
    """A token signed by a key that has since been rotated out of 'active' still verifies."""
    client = await make_client()
    old_token, _ = client.app[LOCAL_TOKENS].issue("ada", ("admin",))
    ring = client.app[KEYS]
    config = client.app[LOCAL_TOKENS].config
    previous = {path.name: path.read_bytes() for path in Path(config.keys_dir).iterdir()}
    write_key_files(tmp_path / "rotated", new_key_files(ring.signer.algorithm, previous))
    rotated = KeyRing.load(tmp_path / "rotated")
    assert rotated.active_signing != ring.active_signing
    new_tokens = LocalTokens(config, rotated)
    assert new_tokens.verify(old_token).subject == "ada"
    new_token, _ = new_tokens.issue("ada", ("admin",))
    assert jwt.get_unverified_header(new_token)["kid"] == rotated.active_signing


async def test_refresh_rotates_and_logout_revokes(make_client: AppFactory) -> None:
    client = await make_client()
    pair = await login(client, "ada")
    assert pair["token_type"] == "Bearer"
    assert 0 < pair["expires_in"] <= 900
    refreshed = await client.post("/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert refreshed.status == 200
    new_pair = await refreshed.json()
    assert new_pair["refresh_token"] != pair["refresh_token"]  # rotated (a replay: test_sessions)

    access = new_pair["access_token"]
    assert (await _status(client, access))[0] == 200
    out = await client.post(
        "/v1/auth/logout",
        json={"refresh_token": new_pair["refresh_token"]},
        headers={"Authorization": f"Bearer {access}"},
    )
    assert (await out.json()) == {"revoked": 2, "sessions_ended": 1}
    status, body = await _status(client, access)
    assert (status, body["message"]) == (401, "token revoked")
    again = await client.post("/v1/auth/refresh", json={"refresh_token": new_pair["refresh_token"]})
    assert again.status == 401
