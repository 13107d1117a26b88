"""Log in, refresh and log out: the local token issuer's routes (with OIDC, tokens come from the
issuer and login and refresh answer 404)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from agent_contract.config import AuthMode
from agent_runtime.api import ApiError, audit, client_ip, read_json_object, string_field, verify_token
from agent_runtime.routing import Body, Reply, Route, Schema
from agent_runtime.security.rbac import Principal
from agent_runtime.security.tokens import ACCESS_TYPE, REFRESH_TYPE, TokenError
from agent_runtime.security.users import MAX_PASSWORD_BYTES, USERNAME
from agent_runtime.state import CONFIG, LOCAL_TOKENS, METRICS, PRINCIPAL, REVOKED, THROTTLE, USERS


async def login(request: web.Request) -> web.Response:
    app = request.app
    if app[CONFIG].auth.mode is not AuthMode.LOCAL:
        raise ApiError(404, "login_disabled", "this agent accepts tokens from its OIDC issuer; it has no login")
    body = await read_json_object(request)
    username = string_field(body, "username", 64)
    password = string_field(body, "password", MAX_PASSWORD_BYTES)
    address = client_ip(request)
    wait = app[THROTTLE].retry_after(username, address)
    if wait > 0:
        app[METRICS].auth_failures.labels("throttled").inc()
        await audit(
            request,
            type="authn",
            action="login",
            actor=username,
            result="throttled",
            details={"retry_after": round(wait, 1)},
        )
        raise ApiError(
            429, "too_many_attempts", "too many failed logins; try again later", {"Retry-After": str(int(wait) + 1)}
        )
    user = await app[USERS].authenticate(username, password) if USERNAME.match(username) else None
    if user is None:
        app[METRICS].auth_failures.labels("invalid credentials").inc()
        app[THROTTLE].failed(username, address)
        await audit(request, type="authn", action="login", actor=username, result="failure")
        raise ApiError(401, "invalid_credentials", "the user name or password is wrong")
    app[THROTTLE].succeeded(username, address)
    tokens = _token_pair(app, user.name, user.roles)
    await audit(
        request, type="authn", action="login", actor=user.name, result="success", details={"jti": tokens["jti"]}
    )
    return web.json_response({k: v for k, v in tokens.items() if k != "jti"})


def _token_pair(app: web.Application, subject: str, roles: tuple[str, ...]) -> dict[str, Any]:
    access, claims = app[LOCAL_TOKENS].issue(subject, roles, ACCESS_TYPE)
    refresh, _ = app[LOCAL_TOKENS].issue(subject, roles, REFRESH_TYPE)
    return {
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "Bearer",
        "expires_in": int(claims.expires_at - time.time()),
        "jti": claims.token_id,
    }


async def refresh(request: web.Request) -> web.Response:
    app = request.app
    if app[CONFIG].auth.mode is not AuthMode.LOCAL:
        raise ApiError(404, "refresh_disabled", "tokens come from the OIDC issuer")
    body = await read_json_object(request)
    token = string_field(body, "refresh_token", 8192)
    try:
        claims = await verify_token(app, token, REFRESH_TYPE)
    except TokenError as error:
        await audit(request, type="authn", action="refresh", result="failure", details={"reason": error.reason})
        raise ApiError(401, "invalid_token", error.reason) from None
    # Rotation: a refresh token works once; replaying it later is refused.
    await app[REVOKED].revoke(claims.token_id, claims.expires_at)
    tokens = _token_pair(app, claims.subject, claims.roles)
    await audit(
        request, type="authn", action="refresh", actor=claims.subject, result="success", details={"jti": tokens["jti"]}
    )
    return web.json_response({k: v for k, v in tokens.items() if k != "jti"})


async def logout(request: web.Request) -> web.Response:
    principal: Principal = request[PRINCIPAL]
    await request.app[REVOKED].revoke(principal.token_id, principal.expires_at)
    body = await read_json_object(request)
    revoked = [principal.token_id]
    if isinstance(body.get("refresh_token"), str):
        try:
            claims = await verify_token(request.app, body["refresh_token"], REFRESH_TYPE)
        except TokenError:
            pass  # already unusable
        else:
            if claims.subject == principal.subject:
                await request.app[REVOKED].revoke(claims.token_id, claims.expires_at)
                revoked.append(claims.token_id)
    await audit(request, type="authn", action="logout", result="success", details={"revoked_jti": revoked})
    return web.json_response({"revoked": len(revoked)})


LOGIN = Schema(
    "Login",
    {
        "type": "object",
        "required": ["username", "password"],
        "properties": {
            "username": {"type": "string", "minLength": 1, "maxLength": 64},
            "password": {"type": "string", "minLength": 1},
        },
    },
)
REFRESH = Schema(
    "Refresh",
    {"type": "object", "required": ["refresh_token"], "properties": {"refresh_token": {"type": "string"}}},
)
LOGOUT = Schema("Logout", {"type": "object", "properties": {"refresh_token": {"type": "string"}}})
TOKENS = Schema(
    "Tokens",
    {
        "type": "object",
        "properties": {
            "access_token": {"type": "string"},
            "refresh_token": {"type": "string"},
            "token_type": {"type": "string"},
            "expires_in": {"type": "integer"},
        },
    },
)

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/auth/login",
        login,
        "Log in with a user name and password",
        public=True,
        body=Body(LOGIN),
        replies=(Reply(200, "Tokens", TOKENS),),
        errors=(400, 401, 404, 413, 429),
    ),
    Route(
        "POST",
        "/v1/auth/refresh",
        refresh,
        "Trade a refresh token (once) for a new pair",
        public=True,
        body=Body(REFRESH),
        replies=(Reply(200, "Tokens", TOKENS),),
        errors=(400, 401, 404, 413),
    ),
    Route(
        "POST",
        "/v1/auth/logout",
        logout,
        "Revoke the access token (and a refresh token)",
        body=Body(LOGOUT, required=False),
        replies=(Reply(200, "Revoked"),),
        errors=(400, 401, 413),
    ),
)
