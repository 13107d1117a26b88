"""What every handler shares: the error it raises, reading the JSON body, checking a token,
authorizing the caller and writing the audit record."""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import json
import re
from collections.abc import Awaitable
from typing import Any

import orjson
from aiohttp import web

from agent_contract.config import AuthMode, Permission, SecurityLevel
from agent_runtime import crypto
from agent_runtime.security.rbac import Principal
from agent_runtime.security.tokens import Claims, TokenError
from agent_runtime.state import (
    AUDIT,
    AUTH_FAILURES,
    AUTHORIZER,
    CONFIG,
    CONTEXT,
    KEYS,
    LIMIT_REFUSALS,
    LOCAL_TOKENS,
    OIDC_TOKENS,
    REVOKED,
    VERIFIED,
    RequestContext,
)

MAX_BODY_BYTES = 1024 * 1024
_LONG_NUMBER = re.compile(rb"[0-9]{19}")


class ApiError(Exception):
    """An error answer: HTTP status, a stable machine code and a human message; ``fields``: more
    members of the JSON body (a 429's ``limit``)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        self.fields = fields or {}

    def __reduce__(self) -> tuple[type[ApiError], tuple[int, str, str, dict[str, str], dict[str, Any]]]:
        # Raised in a worker process too.
        return ApiError, (self.status, self.code, self.message, self.headers, self.fields)


def client_ip(request: web.Request) -> str:
    """The client's address. X-Forwarded-For is believed only from a peer in auth.trustedProxies,
    and then read from the right: each trusted hop appended what it saw, so the right-most
    address that is not a trusted proxy is the client (anything left of it, the client wrote)."""
    remote = request.remote or "unknown"
    trusted = request.app[CONFIG].auth.trusted_proxies
    if not trusted or not _is_trusted(remote, trusted):
        return remote
    hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", ()) for hop in value.split(",")]
    client = remote
    for hop in reversed(hops):
        if _address(hop) is None:
            break  # not an address: the chain is broken here; the last trusted hop is all we know
        client = hop
        if not _is_trusted(hop, trusted):
            break
    return client


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return address


def _is_trusted(text: str, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    address = _address(text)
    return address is not None and any(address in network for network in trusted)


def from_trusted_proxy(request: web.Request) -> bool:
    """The peer is one of auth.trustedProxies (the ingress): its X-Forwarded-* headers are believed."""
    trusted = request.app[CONFIG].auth.trusted_proxies
    return bool(trusted) and _is_trusted(request.remote or "", trusted)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    return parse_json_object(await read_body(request))


def _too_large() -> ApiError:
    return ApiError(413, "payload_too_large", f"the body must be at most {MAX_BODY_BYTES} bytes")


async def read_body(request: web.Request) -> bytes:
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise _too_large()
    # The whole body, however it is cut on the wire (one read returns only what has arrived).
    content = request.content
    # A body that has all arrived (the parser saw its end) is taken as it is, with no coroutine
    # to wait on: most bodies are small and come with their headers.
    first = content.read_nowait() if content.is_eof() else await content.readany()
    # Checked at once, not only in the loop below: a first read past the limit with the end still
    # to come was returned whole once the end came (tested).
    if len(first) > MAX_BODY_BYTES:
        raise _too_large()
    # at_eof: the end seen and nothing left unread. Not is_eof, the parser's end-seen flag alone:
    # with the rest of a chunked body still to be read, it was already true (tested).
    if content.at_eof():
        return first
    raw = bytearray(first)
    while chunk := await content.readany():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise _too_large()
    return bytes(raw)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    # orjson first (no encoding detection: a fifth of the time on a small body), where it reads
    # what the standard library reads. It refuses some JSON the standard library takes (NaN, lone
    # surrogates, deep nesting, other encodings), so only the standard library's refusal is an
    # error; and it reads an integer beyond 64 bits as a float, so a body with a run of 19 digits
    # or more goes to the standard library at once.
    if _LONG_NUMBER.search(raw):
        body = _standard_json(raw)
    else:
        try:
            body = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError:
            body = _standard_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    return body


def _standard_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: arrays nested some thousands deep
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


def string_field(body: dict[str, Any], name: str, max_bytes: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value.encode(errors="replace")) > max_bytes:
        raise ApiError(400, "invalid_field", f"{name}: a string of 1 to {max_bytes} bytes is required")
    if "\0" in value or (not value.isprintable() and _unstorable(value)):
        raise ApiError(400, "invalid_field", f"{name}: NUL bytes and unpaired surrogates are not allowed")
    return value


def _unstorable(value: str) -> bool:
    """Lone surrogates (JSON allows "\\ud800") cannot be encoded as UTF-8, so no store can keep them."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


async def verify_token(app: web.Application, token: str, token_type: str, check_token_id: bool = True) -> Claims:
    """The claims of a valid token (from the issuer this agent trusts) of a session not revoked,
    and, unless ``check_token_id`` is off (refresh decides about used tokens itself), not revoked."""
    claims = app[VERIFIED].get(token, token_type)
    if claims is None:
        if app[CONFIG].auth.mode is AuthMode.OIDC:
            claims = await app[OIDC_TOKENS].verify(token, token_type)
        else:
            claims = app[LOCAL_TOKENS].verify(token, token_type)
        app[VERIFIED].put(token, token_type, claims)
    if await app[REVOKED].revoked(claims.token_id if check_token_id else None, claims.session_id):
        raise TokenError("token revoked")
    return claims


def audit(request: web.Request, **fields: Any) -> Awaitable[object]:
    """An audit record of this request, to await: the caller, its address and the request and
    trace ids (the server's; the id a client sent, if any, goes in details as
    ``client_request_id``). The log's own coroutine is returned, with none of this function around
    it: every request waits in it for the fsync, and each coroutine layer is resumed then."""
    context = request[CONTEXT]
    principal = context.principal
    fields.setdefault("actor", principal.subject if principal else None)
    if context.client_request_id:
        fields["details"] = {**(fields.get("details") or {}), "client_request_id": context.client_request_id}
    return context.app[AUDIT].record(
        client_ip=client_ip(request), request_id=context.request_id, trace_id=context.trace_id, **fields
    )


async def audit_auth_failure(request: web.Request, action: str, reason: str, actor: str | None = None) -> None:
    """A failed authentication nobody was throttled for (a bad token): recorded if it is the
    first of its kind from this address in the digest's window, otherwise only counted; the
    summaries of windows that ended are written alongside."""
    first = request.app[AUTH_FAILURES].add(action, reason, client_ip(request))
    await record_failure_summaries(request.app)  # windows that ended come before this new one
    if first:
        await audit(request, type="authn", action=action, actor=actor, result="failure", details={"reason": reason})


async def record_failure_summaries(app: web.Application, everything: bool = False) -> None:
    """The summaries of the windows that ended: failed authentications, and refusals by a rate
    limit or budget (per operation, limit and caller; see ``operation_routes.limit_refused``)."""
    digest, refusals = app[AUTH_FAILURES], app[LIMIT_REFUSALS]
    records = [
        app[AUDIT].record(
            type="authn",
            action=summary.action,
            result="failure",
            client_ip=summary.address,
            details={
                "reason": summary.reason,
                "repeated": summary.repeated,  # after the first, which has its own record
                "window_seconds": digest.interval_seconds,
            },
        )
        for summary in digest.take(everything)
    ]
    records += [
        app[AUDIT].record(
            type="operation",
            action=summary.action,
            result="rate_limited",
            actor=summary.address,  # the caller whose limit refused
            details={
                "limit": summary.reason,
                "repeated": summary.repeated,  # after the first, which has its own record
                "window_seconds": refusals.interval_seconds,
            },
        )
        for summary in refusals.take(everything)
    ]
    await asyncio.gather(*records)  # one group commit for all of them


def pseudonym(app: web.Application, subject: str) -> str:
    """How the audit trail names a data subject: a keyed hash (HMAC under a key derived from the
    active data-encryption key), so an erasure leaves no name behind and a list of candidate names
    cannot re-identify one without the key. A key rotation changes the pseudonyms from then on."""
    return crypto.pseudonym(app[KEYS], subject)


# The subject of the principal the current operation acts for: an operation handler gets only its
# input, and generate_report records the report's owner from this. Set when an action is authorized.
ACTING_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("acting_for", default=None)


def authenticated(request: web.Request) -> Principal:
    """Who sent this request, as its token says (the middleware authenticated it)."""
    return _principal(request[CONTEXT])


def _principal(context: RequestContext) -> Principal:
    if context.principal is None:  # a route declared public that asks who its caller is: a bug, refused
        raise ApiError(401, "unauthenticated", "a bearer token is required")
    return context.principal


async def authorize(request: web.Request, permission: Permission, level: SecurityLevel, action: str) -> Principal:
    context = request[CONTEXT]
    principal = _principal(context)
    decision = context.app[AUTHORIZER].decide(principal, permission, level)
    if not decision.allowed:
        await audit(request, type="authz", action=action, result="denied", details={"reason": decision.reason})
        raise ApiError(403, "forbidden", decision.reason)
    ACTING_FOR.set(principal.subject)
    return principal
