"""Log in, refresh and log out: the local token issuer's routes (with OIDC, tokens come from the
issuer and login and refresh answer 404).

A login starts a session: its tokens carry the session id (``sid``) and the time the password was
checked (``auth_time``). A refresh reads the user again from the users file (removed or disabled:
refused; new roles: the new tokens carry them), never outlives ``auth.sessionMaxSeconds`` after
the login, and uses its refresh token up: replaying a used one ends the whole session, since
either it was stolen or its rightful holder's copy was. Logout ends the session too.
"""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from agent_contract.config import AuthMode
from agent_runtime.api import (
    ApiError,
    audit,
    audit_auth_failure,
    authenticated,
    client_ip,
    read_json_object,
    string_field,
    verify_token,
)
from agent_runtime.routing import Body, Handler, Reply, Route, Schema
from agent_runtime.security.throttle import ThrottledError
from agent_runtime.security.tokens import ACCESS_TYPE, REFRESH_TYPE, TokenError
from agent_runtime.security.users import MAX_PASSWORD_BYTES, USERNAME
from agent_runtime.state import CONFIG, LOCAL_TOKENS, METRICS, REVOKED, THROTTLE, USERS

# Tokens must not linger in browser or proxy caches (RFC 6749 section 5.1).
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _no_store(handler: Handler) -> Handler:
    """The handler, its answers (errors too) marked uncacheable."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ApiError as error:
            error.headers.update(NO_STORE)
            raise
        response.headers.update(NO_STORE)
        return response

    return wrapped


def _still_accepted_until(app: web.Application, expires_at: float) -> float:
    """A token is accepted until its exp plus the leeway for clock skew: a revocation must last
    that long too, or the token comes back for the leeway's seconds."""
    return expires_at + app[CONFIG].auth.leeway_seconds


async def login(request: web.Request) -> web.Response:
    app = request.app
    if app[CONFIG].auth.mode is not AuthMode.LOCAL:
        raise ApiError(404, "login_disabled", "this agent accepts tokens from its OIDC issuer; it has no login")
    body = await read_json_object(request)
    username = string_field(body, "username", 64)
    password = string_field(body, "password", MAX_PASSWORD_BYTES)
    address = client_ip(request)
    try:
        # Reserved before the password is checked: concurrent guesses count as they start.
        attempt = await app[THROTTLE].reserve(username, address)
    except ThrottledError as throttled:
        wait = throttled.retry_after
        app[METRICS].auth_failures.labels("throttled").inc()
        # Refused before any work: cheap to send in bulk, so aggregated like bad tokens.
        await audit_auth_failure(request, "login", "throttled", actor=username)
        raise ApiError(
            429, "too_many_attempts", "too many failed logins; try again later", {"Retry-After": str(int(wait) + 1)}
        ) from None
    user = None
    try:
        user = await app[USERS].authenticate(username, password) if USERNAME.match(username) else None
    finally:  # an attempt cut short (a cancelled request) counts as failed
        if user is not None:
            await attempt.succeeded()
        else:
            await attempt.failed()
    if user is None:
        app[METRICS].auth_failures.labels("invalid credentials").inc()
        await audit(request, type="authn", action="login", actor=username, result="failure")
        raise ApiError(401, "invalid_credentials", "the user name or password is wrong")
    session_id = secrets.token_urlsafe(16)
    tokens = _token_pair(app, user.name, user.roles, session_id, app[LOCAL_TOKENS].clock())
    await audit(
        request,
        type="authn",
        action="login",
        actor=user.name,
        result="success",
        details={"jti": tokens["jti"], "session": session_id},
    )
    return web.json_response({k: v for k, v in tokens.items() if k != "jti"})


def _token_pair(
    app: web.Application, subject: str, roles: tuple[str, ...], session_id: str, session_start: float
) -> dict[str, Any]:
    issuer = app[LOCAL_TOKENS]
    access, claims = issuer.issue(subject, roles, ACCESS_TYPE, session_id, session_start)
    refresh, _ = issuer.issue(subject, roles, REFRESH_TYPE, session_id, session_start)
    return {
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "Bearer",
        "expires_in": int(claims.expires_at - issuer.clock()),
        "jti": claims.token_id,
    }


def _session_end(app: web.Application, session_start: float) -> float:
    """When the last token of a session expires, leeway included: how long a revocation must last."""
    auth = app[CONFIG].auth
    return session_start + auth.session_max_seconds + auth.leeway_seconds


async def refresh(request: web.Request) -> web.Response:
    app = request.app
    auth = app[CONFIG].auth
    if auth.mode is not AuthMode.LOCAL:
        raise ApiError(404, "refresh_disabled", "tokens come from the OIDC issuer")
    body = await read_json_object(request)
    token = string_field(body, "refresh_token", 8192)
    try:
        claims = await verify_token(app, token, REFRESH_TYPE, check_token_id=False)
    except TokenError as error:
        app[METRICS].auth_failures.labels(error.reason).inc()
        await audit_auth_failure(request, "refresh", error.reason)
        raise ApiError(401, "invalid_token", error.reason) from None
    revoked = app[REVOKED]
    # Used up first, whatever follows: a refused token presented again is a replay like any other.
    if not await revoked.use_once(claims.token_id, _still_accepted_until(app, claims.expires_at)):
        # Used before: a stolen copy, or the holder's copy was stolen. End the session for both.
        await revoked.revoke_session(claims.session_id, _session_end(app, claims.session_start))
        app[METRICS].auth_failures.labels("refresh token reused").inc()
        await audit(
            request,
            type="authn",
            action="refresh",
            actor=claims.subject,
            result="reuse_detected",
            details={"jti": claims.token_id, "session": claims.session_id, "session_revoked": True},
        )
        raise ApiError(401, "invalid_token", "token revoked")
    if app[LOCAL_TOKENS].clock() >= claims.session_start + auth.session_max_seconds:
        raise await _refusal(request, claims.subject, claims.token_id, "session expired")
    user = app[USERS].get(claims.subject)  # the users file as it is now, not as it was at login
    if user is None:
        await revoked.revoke_session(claims.session_id, _session_end(app, claims.session_start))
        raise await _refusal(request, claims.subject, claims.token_id, "user removed or disabled")
    tokens = _token_pair(app, user.name, user.roles, claims.session_id, claims.session_start)
    details: dict[str, Any] = {"jti": tokens["jti"], "session": claims.session_id}
    if user.roles != claims.roles:
        details["roles"] = list(user.roles)
    await audit(request, type="authn", action="refresh", actor=user.name, result="success", details=details)
    return web.json_response({k: v for k, v in tokens.items() if k != "jti"})


async def _refusal(request: web.Request, subject: str, token_id: str, reason: str) -> ApiError:
    """The error refusing a valid refresh token, once counted and audited (it is used up by now,
    so each token gets here once: these need no aggregation)."""
    request.app[METRICS].auth_failures.labels(reason).inc()
    details = {"reason": reason, "jti": token_id}
    await audit(request, type="authn", action="refresh", actor=subject, result="failure", details=details)
    return ApiError(401, "invalid_token", reason)


async def logout(request: web.Request) -> web.Response:
    app = request.app
    principal = authenticated(request)
    body = await read_json_object(request)
    revoked = app[REVOKED]
    token_ids = [principal.token_id]
    sessions = {principal.session_id: principal.session_start} if principal.session_id else {}
    if isinstance(body.get("refresh_token"), str):
        try:
            claims = await verify_token(app, body["refresh_token"], REFRESH_TYPE)
        except TokenError:
            pass  # already unusable
        else:
            if claims.subject == principal.subject:
                await revoked.revoke(claims.token_id, _still_accepted_until(request.app, claims.expires_at))
                token_ids.append(claims.token_id)
                sessions.setdefault(claims.session_id, claims.session_start)
    await revoked.revoke(principal.token_id, _still_accepted_until(request.app, principal.expires_at))
    for session_id, session_start in sessions.items():
        await revoked.revoke_session(session_id, _session_end(app, session_start))
    await audit(
        request,
        type="authn",
        action="logout",
        result="success",
        details={"revoked_jti": token_ids, "sessions": list(sessions)},
    )
    return web.json_response({"revoked": len(token_ids), "sessions_ended": len(sessions)})


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
        _no_store(login),
        "Log in with a user name and password",
        public=True,
        body=Body(LOGIN),
        replies=(Reply(200, "Tokens", TOKENS),),
        errors=(400, 401, 404, 413, 429),
    ),
    Route(
        "POST",
        "/v1/auth/refresh",
        _no_store(refresh),
        "Trade a refresh token (once) for a new pair; a used one ends the session",
        public=True,
        body=Body(REFRESH),
        replies=(Reply(200, "Tokens", TOKENS),),
        errors=(400, 401, 404, 413),
    ),
    Route(
        "POST",
        "/v1/auth/logout",
        _no_store(logout),
        "End the session: its access and refresh tokens are revoked",
        body=Body(LOGOUT, required=False),
        replies=(Reply(200, "Revoked"),),
        errors=(400, 401, 413),
    ),
)
