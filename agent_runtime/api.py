"""What every handler shares: the error it raises, reading the JSON body, checking a token,
authorizing the caller and writing the audit record."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web

from agent_contract.config import AuthMode, Permission, SecurityLevel
from agent_runtime.security.rbac import Principal
from agent_runtime.security.tokens import Claims, TokenError
from agent_runtime.state import (
    AUDIT,
    AUTHORIZER,
    CONFIG,
    LOCAL_TOKENS,
    OIDC_TOKENS,
    PRINCIPAL,
    REQUEST_ID,
    REVOKED,
    TRACE_ID,
    VERIFIED,
)

MAX_BODY_BYTES = 1024 * 1024


class ApiError(Exception):
    """An error answer: HTTP status, a stable machine code and a human message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def client_ip(request: web.Request) -> str:
    return request.remote or "unknown"


async def read_json_object(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", f"the body must be at most {MAX_BODY_BYTES} bytes")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", f"the body must be at most {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    return body


def string_field(body: dict[str, Any], name: str, max_bytes: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value.encode()) > max_bytes:
        raise ApiError(400, "invalid_field", f"{name}: a string of 1 to {max_bytes} bytes is required")
    return value


async def verify_token(app: web.Application, token: str, token_type: str) -> Claims:
    """The claims of a valid, unrevoked token (from the issuer this agent trusts)."""
    claims = app[VERIFIED].get(token, token_type)
    if claims is None:
        if app[CONFIG].auth.mode is AuthMode.OIDC:
            claims = await app[OIDC_TOKENS].verify(token, token_type)
        else:
            claims = app[LOCAL_TOKENS].verify(token, token_type)
        app[VERIFIED].put(token, token_type, claims)
    if app[REVOKED].is_revoked(claims.token_id):
        raise TokenError("token revoked")
    return claims


async def audit(request: web.Request, **fields: Any) -> None:
    """An audit record of this request: the caller, its address and the request and trace ids."""
    principal: Principal | None = request.get(PRINCIPAL)
    fields.setdefault("actor", principal.subject if principal else None)
    await request.app[AUDIT].record(
        client_ip=client_ip(request), request_id=request.get(REQUEST_ID), trace_id=request.get(TRACE_ID), **fields
    )


def pseudonym(subject: str) -> str:
    """How the audit trail names a data subject: a hash, so an erasure leaves no name behind."""
    return hashlib.sha256(subject.encode()).hexdigest()[:16]


async def authorize(request: web.Request, permission: Permission, level: SecurityLevel, action: str) -> Principal:
    principal: Principal = request[PRINCIPAL]
    decision = request.app[AUTHORIZER].decide(principal, permission, level)
    if not decision.allowed:
        await audit(request, type="authz", action=action, result="denied", details={"reason": decision.reason})
        raise ApiError(403, "forbidden", decision.reason)
    return principal
