"""The agent runtime's HTTP service: ``create_app(settings)`` builds the aiohttp Application.

Middlewares are plain ``async def (request, handler)`` functions; all state hangs off the app
under typed ``web.AppKey``s (no module globals), so tests build as many apps as they like.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from agent_contract.config import AuthMode, ComplianceFramework, Permission, RuntimeConfig, SecurityLevel
from agent_contract.keyfiles import KeyRing
from agent_contract.operations import GENERATE_REPORT
from agent_runtime.audit import AuditLog
from agent_runtime.crypto import FieldEncryptor
from agent_runtime.metrics import RuntimeMetrics
from agent_runtime.openapi import build_openapi
from agent_runtime.operations import BUILTINS, InputError, Operation, Registry, discover_plugins
from agent_runtime.operations.chat import ModelError, chat_operation
from agent_runtime.operations.reports import ReportInput, build_report
from agent_runtime.resilience import Bulkhead, CircuitBreaker, CircuitOpenError, CircuitState, OverloadedError
from agent_runtime.security.rbac import Authorizer, Principal
from agent_runtime.security.revocation import RevocationList
from agent_runtime.security.throttle import LoginThrottle
from agent_runtime.security.tokens import (
    ACCESS_TYPE,
    REFRESH_TYPE,
    Claims,
    LocalTokens,
    OidcTokens,
    TokenError,
    VerifiedCache,
)
from agent_runtime.security.users import MAX_PASSWORD_BYTES, USERNAME, UserStore
from agent_runtime.settings import Settings
from agent_runtime.store import Store
from agent_runtime.tracing import PROPAGATOR, make_tracer_provider, trace_id_of

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger("agent_runtime")

SETTINGS = web.AppKey("settings", Settings)
CONFIG = web.AppKey("config", RuntimeConfig)
KEYS = web.AppKey("keys", KeyRing)
LOCAL_TOKENS = web.AppKey("local_tokens", LocalTokens)
OIDC_TOKENS = web.AppKey("oidc_tokens", OidcTokens)
USERS = web.AppKey("users", UserStore)
THROTTLE = web.AppKey("throttle", LoginThrottle)
REVOKED = web.AppKey("revoked", RevocationList)
AUDIT = web.AppKey("audit", AuditLog)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
REGISTRY = web.AppKey("registry", Registry)
ENCRYPTOR = web.AppKey("encryptor", FieldEncryptor)
HTTP = web.AppKey("http", aiohttp.ClientSession)
VERIFIED = web.AppKey("verified", VerifiedCache)
METRICS = web.AppKey("metrics", RuntimeMetrics)
TRACER_PROVIDER = web.AppKey("tracer_provider", TracerProvider)
TRACER = web.AppKey("tracer", trace.Tracer)
BULKHEADS = web.AppKey("bulkheads", dict[str, Bulkhead])
BREAKERS = web.AppKey("breakers", dict[str, CircuitBreaker])
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
STORE = web.AppKey("store", Store)
REQUEST_ID = web.RequestKey("request_id", str)
TRACE_ID = web.RequestKey("trace_id", str)
TRACED = web.RequestKey("traced", bool)
PRINCIPAL = web.RequestKey("principal", Principal)

# Paths anyone may call; everything else needs a bearer token.
PUBLIC_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/auth/login", "/v1/auth/refresh"}
MAX_BODY_BYTES = 1024 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")
# Request ids must be unique, not secret: a seeded PRNG saves an os.urandom system call per
# request on the hot path.
_ids = random.Random(secrets.randbits(128))  # noqa: S311


class ApiError(Exception):
    """An error answer: HTTP status, a stable machine code and a human message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(request: web.Request, error: ApiError) -> web.Response:
    body = {"code": error.code, "message": error.message, "request_id": request.get(REQUEST_ID)}
    return web.json_response(body, status=error.status, headers=error.headers)


def client_ip(request: web.Request) -> str:
    return request.remote or "unknown"


# --- middlewares --------------------------------------------------------------------------------------


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request count and duration by route template (never the raw path: no ids in labels)."""
    started = time.perf_counter()
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[METRICS].observe_request(route, request.method, str(response.status), time.perf_counter() - started)
    return response


@web.middleware
async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A server span per request, continuing the caller's W3C trace; its trace id is returned
    in X-Trace-ID and written into the audit record. A new trace is sampled here (head sampling,
    at traceSampleRatio); one that is not gets a trace id but no spans at all, which is most
    requests and the cheap path. A caller's traceparent decides for itself (parent-based)."""
    if "traceparent" not in request.headers and _ids.random() >= request.app[CONFIG].observability.trace_sample_ratio:
        request[TRACE_ID] = f"{_ids.getrandbits(128):032x}"
        request[TRACED] = False
        return await handler(request)
    request[TRACED] = True
    context = PROPAGATOR.extract(carrier=request.headers)
    tracer = request.app[TRACER]
    with tracer.start_as_current_span(
        f"{request.method} {request.path}", context=context, kind=trace.SpanKind.SERVER, record_exception=False
    ) as span:
        request[TRACE_ID] = trace_id_of(span)
        response = await handler(request)
        if span.is_recording():
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else None
            if route:
                span.update_name(f"{request.method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("url.path", request.path)
            span.set_attribute("url.scheme", request.scheme)
            span.set_attribute("client.address", client_ip(request))
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(trace.StatusCode.ERROR)
        return response


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request id and trace id on every request and answer; every error as JSON."""
    incoming = request.headers.get("X-Request-ID", "")
    request[REQUEST_ID] = incoming if _REQUEST_ID.fullmatch(incoming) else f"{_ids.getrandbits(64):016x}"
    try:
        response = await handler(request)
    except ApiError as error:
        response = error_response(request, error)
    except web.HTTPException as http_error:
        if http_error.status >= 400:
            code = http_error.reason.lower().replace(" ", "_")
            response = error_response(request, ApiError(http_error.status, code, http_error.reason))
        else:
            raise
    except Exception:  # a bug: answer in JSON with the ids to look it up, never a stack trace
        log.exception("unhandled error on %s %s (request %s)", request.method, request.path, request[REQUEST_ID])
        response = error_response(request, ApiError(500, "internal_error", "an internal error occurred"))
    response.headers["X-Request-ID"] = request[REQUEST_ID]
    response.headers["X-Trace-ID"] = request[TRACE_ID]
    return response


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "unauthenticated", "a bearer token is required", {"WWW-Authenticate": 'Bearer realm="agent"'}
        )
    try:
        claims = await _verify(request.app, token.strip(), ACCESS_TYPE)
    except TokenError as error:
        request.app[METRICS].auth_failures.labels(error.reason).inc()
        await _audit(request, type="authn", action="verify_token", result="failure", details={"reason": error.reason})
        raise ApiError(
            401,
            "invalid_token",
            error.reason,
            {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{error.reason}"'},
        ) from None
    request[PRINCIPAL] = Principal(claims.subject, claims.roles, claims.token_id, claims.expires_at)
    return await handler(request)


async def _verify(app: web.Application, token: str, token_type: str) -> Claims:
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


async def _audit(request: web.Request, **fields: Any) -> None:
    principal: Principal | None = request.get(PRINCIPAL)
    fields.setdefault("actor", principal.subject if principal else None)
    await request.app[AUDIT].record(
        client_ip=client_ip(request), request_id=request.get(REQUEST_ID), trace_id=request.get(TRACE_ID), **fields
    )


async def _json_object(request: web.Request) -> dict[str, Any]:
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


def _string_field(body: dict[str, Any], name: str, max_bytes: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value.encode()) > max_bytes:
        raise ApiError(400, "invalid_field", f"{name}: a string of 1 to {max_bytes} bytes is required")
    return value


async def authorize(request: web.Request, permission: Permission, level: SecurityLevel, action: str) -> Principal:
    principal: Principal = request[PRINCIPAL]
    decision = request.app[AUTHORIZER].decide(principal, permission, level)
    if not decision.allowed:
        await _audit(request, type="authz", action=action, result="denied", details={"reason": decision.reason})
        raise ApiError(403, "forbidden", decision.reason)
    return principal


# --- handlers -----------------------------------------------------------------------------------------


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    report = await request.app[READINESS].report()
    ready = all(check["ok"] for check in report.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": report}, status=200 if ready else 503
    )


async def openapi_view(request: web.Request) -> web.Response:
    return web.json_response(build_openapi(request.app[CONFIG], request.app[REGISTRY]))


async def metrics_view(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def login(request: web.Request) -> web.Response:
    app = request.app
    if app[CONFIG].auth.mode is not AuthMode.LOCAL:
        raise ApiError(404, "login_disabled", "this agent accepts tokens from its OIDC issuer; it has no login")
    body = await _json_object(request)
    username = _string_field(body, "username", 64)
    password = _string_field(body, "password", MAX_PASSWORD_BYTES)
    address = client_ip(request)
    wait = app[THROTTLE].retry_after(username, address)
    if wait > 0:
        app[METRICS].auth_failures.labels("throttled").inc()
        await _audit(
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
        await _audit(request, type="authn", action="login", actor=username, result="failure")
        raise ApiError(401, "invalid_credentials", "the user name or password is wrong")
    app[THROTTLE].succeeded(username, address)
    tokens = _token_pair(app, user.name, user.roles)
    await _audit(
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
    body = await _json_object(request)
    token = _string_field(body, "refresh_token", 8192)
    try:
        claims = await _verify(app, token, REFRESH_TYPE)
    except TokenError as error:
        await _audit(request, type="authn", action="refresh", result="failure", details={"reason": error.reason})
        raise ApiError(401, "invalid_token", error.reason) from None
    # Rotation: a refresh token works once; replaying it later is refused.
    await app[REVOKED].revoke(claims.token_id, claims.expires_at)
    tokens = _token_pair(app, claims.subject, claims.roles)
    await _audit(
        request, type="authn", action="refresh", actor=claims.subject, result="success", details={"jti": tokens["jti"]}
    )
    return web.json_response({k: v for k, v in tokens.items() if k != "jti"})


async def logout(request: web.Request) -> web.Response:
    principal: Principal = request[PRINCIPAL]
    await request.app[REVOKED].revoke(principal.token_id, principal.expires_at)
    body = await _json_object(request)
    revoked = [principal.token_id]
    if isinstance(body.get("refresh_token"), str):
        try:
            claims = await _verify(request.app, body["refresh_token"], REFRESH_TYPE)
        except TokenError:
            pass  # already unusable
        else:
            if claims.subject == principal.subject:
                await request.app[REVOKED].revoke(claims.token_id, claims.expires_at)
                revoked.append(claims.token_id)
    await _audit(request, type="authn", action="logout", result="success", details={"revoked_jti": revoked})
    return web.json_response({"revoked": len(revoked)})


async def audit_query(request: web.Request) -> web.Response:
    await authorize(request, Permission.ADMIN, SecurityLevel.PUBLIC, "read_audit")
    try:
        limit = min(1000, max(1, int(request.query.get("limit", "100"))))
    except ValueError:
        raise ApiError(400, "invalid_query", "limit must be a number") from None
    actor, kind = request.query.get("actor"), request.query.get("type")
    records = [
        r
        for r in reversed(request.app[AUDIT].recent)
        if (actor is None or r.get("actor") == actor) and (kind is None or r.get("type") == kind)
    ][:limit]
    await _audit(request, type="admin", action="read_audit", result="success", details={"returned": len(records)})
    return web.json_response({"records": records})


def _pseudonym(subject: str) -> str:
    """How the audit trail names a data subject: a hash, so an erasure leaves no name behind."""
    return hashlib.sha256(subject.encode()).hexdigest()[:16]


def _gdpr(request: web.Request) -> None:
    if ComplianceFramework.GDPR not in request.app[CONFIG].compliance.frameworks:
        raise ApiError(404, "gdpr_disabled", "GDPR is not among this agent's compliance frameworks")


async def record_consent(request: web.Request) -> web.Response:
    _gdpr(request)
    principal = await authorize(request, Permission.WRITE, SecurityLevel.INTERNAL, "record_consent")
    body = await _json_object(request)
    subject, purpose = _string_field(body, "subject", 128), _string_field(body, "purpose", 64)
    granted = body.get("granted")
    if not isinstance(granted, bool):
        raise ApiError(400, "invalid_field", "granted: true or false is required")
    evidence = body.get("evidence", "")
    if not isinstance(evidence, str) or len(evidence) > 2000:
        raise ApiError(400, "invalid_field", "evidence: a string of at most 2000 characters")
    await request.app[STORE].record_consent(subject, purpose, granted, principal.subject, evidence)
    await _audit(
        request,
        type="admin",
        action="consent_granted" if granted else "consent_withdrawn",
        result="success",
        details={"subject": _pseudonym(subject), "purpose": purpose},
    )
    return web.json_response({"subject": subject, "purpose": purpose, "granted": granted}, status=201)


async def consent_history(request: web.Request) -> web.Response:
    _gdpr(request)
    await authorize(request, Permission.READ, SecurityLevel.INTERNAL, "read_consent")
    subject = request.match_info["subject"]
    history = await request.app[STORE].consent_history(subject)
    current = {entry["purpose"]: entry["granted"] for entry in history}
    return web.json_response({"subject": subject, "current": current, "history": history})


async def export_subject(request: web.Request) -> web.Response:
    """Art. 15 and 20: everything held about the subject, in a portable form."""
    _gdpr(request)
    await authorize(request, Permission.ADMIN, SecurityLevel.INTERNAL, "export_subject")
    subject = request.match_info["subject"]
    store = request.app[STORE]
    results = [
        {"id": r.id, "kind": r.kind, "created_at": r.created_at, "content": json.loads(r.body)}
        for r in await store.results_of(subject)
    ]
    await _audit(
        request, type="admin", action="export_subject", result="success", details={"subject": _pseudonym(subject)}
    )
    return web.json_response({"subject": subject, "consents": await store.consent_history(subject), "results": results})


async def erase_subject(request: web.Request) -> web.Response:
    """Art. 17: the subject's stored data and consent records are deleted."""
    _gdpr(request)
    await authorize(request, Permission.ADMIN, SecurityLevel.INTERNAL, "erase_subject")
    subject = request.match_info["subject"]
    removed = await request.app[STORE].erase(subject)
    await _audit(
        request,
        type="admin",
        action="erase_subject",
        result="success",
        details={"subject": _pseudonym(subject), **removed},
    )
    return web.json_response({"erased": removed})


async def download_report(request: web.Request) -> web.Response:
    await authorize(request, Permission.READ, SecurityLevel.INTERNAL, "download_report")
    stored = await request.app[STORE].get(request.match_info["id"])
    if stored is None or stored.kind != "report":
        raise ApiError(404, "not_found", "no report with this id (it may have passed the retention period)")
    report = json.loads(stored.body)
    wanted = request.query.get("format", "markdown")
    await _audit(
        request,
        type="operation",
        action="download_report",
        resource=stored.id,
        result="success",
        details={"format": wanted},
    )
    if wanted == "markdown":
        return web.Response(text=report["markdown"], content_type="text/markdown")
    if wanted == "html":
        return web.Response(text=report["html"], content_type="text/html")
    if wanted == "json":
        return web.json_response(report)
    raise ApiError(400, "invalid_query", "format must be markdown, html or json")


def _report_operation(app: web.Application) -> Operation:
    async def generate(request: ReportInput) -> dict[str, Any]:
        try:
            markdown, html_text = build_report(request)
        except (ValueError, ArithmeticError) as error:
            raise InputError(str(error)) from None
        body = json.dumps({"title": request.title, "markdown": markdown, "html": html_text}).encode()
        stored = await app[STORE].put("report", "agent", "application/json", body)
        return {
            "report_id": stored.id,
            "download": {f: f"/v1/reports/{stored.id}?format={f}" for f in ("markdown", "html", "json")},
        }

    return Operation.builtin(GENERATE_REPORT, generate, ReportInput)


async def _retention(app: web.Application, every_seconds: float = 3600.0) -> None:
    """Purges stored results older than retentionDays, hourly; each purge is audited."""
    while True:
        removed = await app[STORE].purge_older_than(app[CONFIG].compliance.retention_days)
        if removed:
            await app[AUDIT].record(
                type="admin", action="retention_purge", result="success", details={"removed": removed}
            )
        await asyncio.sleep(every_seconds)


def _validated_input(operation: Operation, payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_field", "input: a JSON object is required")
    if operation.input_model is None:
        return payload
    try:
        return operation.input_model.model_validate(payload)
    except ValidationError as error:
        problems = "; ".join(
            f"input.{'.'.join(str(p) for p in item['loc'])}: {item['msg']}".replace("input.: ", "input: ")
            for item in error.errors()
        )
        raise ApiError(422, "invalid_input", problems) from None


async def run_operation(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    operation = request.app[REGISTRY].get(name)
    if operation is None:
        raise ApiError(404, "unknown_operation", f"operation {name!r} is not enabled on this agent")
    principal = await authorize(request, operation.permission, operation.level, f"operation:{name}")
    body = await _json_object(request)
    argument = _validated_input(operation, body.get("input", {}))
    compliance = request.app[CONFIG].compliance
    if operation.personal_data and ComplianceFramework.GDPR in compliance.frameworks:
        subject = _string_field(body, "subject", 128)
        purpose = _string_field(body, "purpose", 64)
        if not await request.app[STORE].has_consent(subject, purpose):
            details = {"reason": "no consent", "subject": _pseudonym(subject), "purpose": purpose}
            await _audit(request, type="authz", action=f"operation:{name}", result="denied", details=details)
            raise ApiError(403, "consent_required", f"no consent of this subject for purpose {purpose!r} (GDPR)")
    if ComplianceFramework.SOX in compliance.frameworks and name in compliance.financial_operations:
        approval_id = await request.app[STORE].create_approval(
            name, principal.subject, json.dumps(body.get("input", {}))
        )
        await _audit(
            request, type="operation", action=name, result="pending_approval", details={"approval_id": approval_id}
        )
        return web.json_response(
            {"operation": name, "status": "pending_approval", "approval_id": approval_id}, status=202
        )
    result = await _execute(request, operation, argument, {})
    return _operation_response(request, name, result, principal.subject)


def _operation_response(request: web.Request, name: str, result: dict[str, Any], actor: str) -> web.Response:
    body = {
        "operation": name,
        "result": result,
        "request_id": request[REQUEST_ID],
        "trace_id": request[TRACE_ID],
        "actor": actor,
    }
    return web.json_response(body)


async def _execute(
    request: web.Request, operation: Operation, argument: Any, audit_details: dict[str, Any]
) -> dict[str, Any]:
    """Runs an operation in its span, bulkhead and timeout; every outcome is counted and audited."""
    name = operation.name
    started = time.perf_counter()
    metrics = request.app[METRICS]
    timeout = request.app[CONFIG].resilience.operation_timeout_seconds

    async def failed(result: str, **details: Any) -> None:
        metrics.operations.labels(name, result).inc()
        await _audit(request, type="operation", action=name, result=result, details={**audit_details, **details})

    tool_span = (
        request.app[TRACER].start_as_current_span(f"execute_tool {name}", kind=trace.SpanKind.INTERNAL)
        if request.get(TRACED)
        else contextlib.nullcontext(None)
    )
    try:
        with tool_span as span:
            if span is not None:
                span.set_attribute("gen_ai.operation.name", "execute_tool")
                span.set_attribute("gen_ai.tool.name", name)
                span.set_attribute("agent.security_level", operation.level.value)
            async with asyncio.timeout(timeout):
                result: dict[str, Any] = await request.app[BULKHEADS][name].run(lambda: operation.handler(argument))
    except ApiError:
        raise
    except InputError as error:
        metrics.operations.labels(name, "invalid_input").inc()
        raise ApiError(422, "invalid_input", f"input: {error}") from None
    except OverloadedError:
        metrics.shed.labels(name).inc()
        await failed("shed")
        raise ApiError(
            503, "overloaded", f"operation {name!r} is at capacity; retry shortly", {"Retry-After": "1"}
        ) from None
    except TimeoutError:
        await failed("timeout", seconds=timeout)
        raise ApiError(504, "operation_timeout", f"operation {name!r} took longer than {timeout:g}s") from None
    except ModelError as error:
        await failed("unavailable", reason=str(error))
        raise ApiError(502, "dependency_failed", str(error)) from None
    except CircuitOpenError as error:
        await failed("unavailable", reason=str(error))
        raise ApiError(
            503, "dependency_unavailable", str(error), {"Retry-After": str(int(error.retry_after) + 1)}
        ) from None
    except Exception as error:
        await failed("error", error=type(error).__name__)
        raise ApiError(500, "operation_failed", f"operation {name!r} failed") from None
    metrics.operations.labels(name, "success").inc()
    details = {
        **audit_details,
        "authorization": "allowed",
        "level": operation.level.value,
        "ms": round((time.perf_counter() - started) * 1000, 2),
    }
    await _audit(request, type="operation", action=name, result="success", details=details)
    return result


async def list_approvals(request: web.Request) -> web.Response:
    await authorize(request, Permission.READ, SecurityLevel.INTERNAL, "list_approvals")
    return web.json_response({"pending": await request.app[STORE].pending_approvals()})


async def decide_approval(request: web.Request) -> web.Response:
    """SOX maker-checker: a second person approves (and so runs) or rejects a financial operation."""
    store = request.app[STORE]
    approval = await store.get_approval(request.match_info["id"])
    if approval is None:
        raise ApiError(404, "not_found", "no approval with this id")
    operation = request.app[REGISTRY].get(approval["operation"])
    if operation is None:
        raise ApiError(404, "unknown_operation", f"operation {approval['operation']!r} is no longer enabled")
    approver = await authorize(request, operation.permission, operation.level, f"approve:{operation.name}")
    body = await _json_object(request)
    decision = body.get("decision")
    if decision not in ("approve", "reject"):
        raise ApiError(400, "invalid_field", "decision: approve or reject")
    details = {"approval_id": approval["id"], "requested_by": approval["requester"], "decided_by": approver.subject}
    if approver.subject == approval["requester"]:
        await _audit(
            request,
            type="authz",
            action=f"approve:{operation.name}",
            result="denied",
            details={**details, "reason": "self-approval"},
        )
        raise ApiError(
            403, "self_approval", "the requester of a financial operation cannot approve it (SOX maker-checker)"
        )
    if not await store.decide_approval(
        approval["id"], "approved" if decision == "approve" else "rejected", approver.subject
    ):
        raise ApiError(409, "already_decided", f"this approval is already {approval['status']}")
    if decision == "reject":
        await _audit(request, type="operation", action=operation.name, result="rejected", details=details)
        return web.json_response({"approval_id": approval["id"], "status": "rejected"})
    argument = _validated_input(operation, json.loads(approval["input"]))
    result = await _execute(request, operation, argument, details)
    return _operation_response(request, operation.name, result, approval["requester"])


# --- the application ----------------------------------------------------------------------------------


def _bulkhead(metrics: RuntimeMetrics, name: str, config: RuntimeConfig) -> Bulkhead:
    limits = config.resilience
    metrics.bulkhead_capacity.labels(name).set(limits.max_concurrent_per_operation)

    def report(in_use: int, waiting: int) -> None:
        metrics.bulkhead_in_use.labels(name).set(in_use)
        metrics.bulkhead_queued.labels(name).set(waiting)

    return Bulkhead(limits.max_concurrent_per_operation, limits.max_queued_per_operation, report)


def breaker(app: web.Application, dependency: str) -> CircuitBreaker:
    """The circuit breaker of a dependency (a model endpoint, a tool), made on first use."""
    breakers = app[BREAKERS]
    if dependency not in breakers:
        metrics = app[METRICS]
        metrics.circuit_state.labels(dependency).set(0)
        breakers[dependency] = CircuitBreaker(
            dependency,
            app[CONFIG].resilience.circuit_breaker,
            on_change=lambda name, state: metrics.circuit_state.labels(name).set(int(state)),
        )
    return breakers[dependency]


def _saturated(app: web.Application) -> list[str]:
    return [name for name, bulkhead in app[BULKHEADS].items() if bulkhead.in_use >= bulkhead.limit]


async def _ok(detail: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, **detail}


async def _fail(detail: dict[str, Any]) -> dict[str, Any]:
    return {"ok": False, **detail}


async def _dependencies(app: web.Application) -> dict[str, Any]:
    """Open circuits make the pod unready, so traffic goes to replicas whose dependencies answer."""
    states = {name: CircuitState(b.state).name.lower().replace("_", "-") for name, b in app[BREAKERS].items()}
    return {"ok": all(state != "open" for state in states.values()), "circuits": states}


class Readiness:
    """Named checks, each run with a timeout; the report is cached briefly so probes and scrapes
    cannot turn readiness into load."""

    def __init__(
        self,
        checks: dict[str, Callable[[], Awaitable[dict[str, Any]]]],
        timeout: float = 2.0,
        cache_seconds: float = 1.0,
    ) -> None:
        self.checks = checks
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._cached: tuple[float, dict[str, dict[str, Any]]] | None = None

    async def _run(self, check: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.timeout):
                return await check()
        except TimeoutError:
            return {"ok": False, "reason": f"no answer within {self.timeout:g}s"}
        except Exception as error:
            return {"ok": False, "reason": type(error).__name__}

    async def report(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.cache_seconds:
            return self._cached[1]
        results = await asyncio.gather(*(self._run(check) for check in self.checks.values()))
        report = dict(zip(self.checks, results, strict=True))
        self._cached = (now, report)
        return report


async def _fetch_jwks(app: web.Application, url: str) -> dict[str, Any]:
    async with app[HTTP].get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
        response.raise_for_status()
        document: dict[str, Any] = await response.json(content_type=None)
        return document


def create_app(
    settings: Settings, operations: dict[str, Operation] | None = None, tracer_provider: TracerProvider | None = None
) -> web.Application:
    """``operations``: the catalogue to enable from (default: the built-ins); ``tracer_provider``:
    where spans go (default: made from the config, exporting over OTLP when configured)."""
    config = settings.config
    app = web.Application(middlewares=[observe, traced, request_context, authenticate], client_max_size=MAX_BODY_BYTES)
    metrics = RuntimeMetrics()
    app[METRICS] = metrics
    provider = tracer_provider or make_tracer_provider(config.observability, config.namespace)
    app[TRACER_PROVIDER] = provider
    app[TRACER] = provider.get_tracer("agent_runtime")
    keys = KeyRing.load(config.auth.keys_dir)
    app[SETTINGS] = settings
    app[CONFIG] = config
    app[KEYS] = keys
    app[LOCAL_TOKENS] = LocalTokens(config.auth, keys)
    app[VERIFIED] = VerifiedCache()
    app[USERS] = UserStore.load(config.auth.users_file)
    app[THROTTLE] = LoginThrottle()
    app[REVOKED] = RevocationList(settings.data_dir / "revocations.sqlite3")
    app[AUDIT] = AuditLog(
        settings.audit_file,
        keys,
        to_stdout=config.audit.stdout,
        checkpoint_every=config.audit.checkpoint_every,
        checkpoint_seconds=config.audit.checkpoint_seconds,
        on_write=metrics.observe_audit_batch,
    )
    app[AUTHORIZER] = Authorizer(config)
    catalogue = dict(operations if operations is not None else {**BUILTINS, **discover_plugins()})
    if config.model is not None and "chat" in config.operations:
        catalogue["chat"] = chat_operation(
            config.model,
            config.egress.allowed_hosts,
            config.resilience.retry,
            lambda: app[HTTP],
            lambda: breaker(app, "model"),
        )
    if "generate_report" in config.operations and "generate_report" not in catalogue:
        catalogue["generate_report"] = _report_operation(app)
    app[REGISTRY] = Registry(config.operations, catalogue)
    app[BULKHEADS] = {name: _bulkhead(metrics, name, config) for name in app[REGISTRY].operations}
    app[BREAKERS] = {}
    app[READINESS] = Readiness(
        {
            "config": lambda: _ok({"agent": config.agent_name}),
            "keys": lambda: _ok({"signing": keys.active_signing}) if keys.signing else _fail({}),
            "audit": lambda: _ok({}) if app[AUDIT].healthy else _fail({"reason": "the last audit write failed"}),
            "operations": lambda: _ok({"unavailable": app[REGISTRY].missing, "saturated": _saturated(app)}),
            "dependencies": lambda: _dependencies(app),
        }
    )
    app[ENCRYPTOR] = FieldEncryptor(keys)
    # HIPAA: stored results may hold PHI, so they are encrypted at rest.
    hipaa = ComplianceFramework.HIPAA in config.compliance.frameworks
    app[STORE] = Store(settings.data_dir / "store.sqlite3", encryptor=app[ENCRYPTOR] if hipaa else None)
    if config.auth.mode is AuthMode.OIDC:
        app[OIDC_TOKENS] = OidcTokens(config.auth, lambda url: _fetch_jwks(app, url))

    async def resources(app: web.Application) -> AsyncIterator[None]:
        app[HTTP] = aiohttp.ClientSession()
        app[REVOKED].open()
        app[STORE].open()
        await app[AUDIT].start()
        retention = asyncio.create_task(_retention(app), name="retention")
        yield
        retention.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await retention
        await app[AUDIT].close()  # the last records and a final checkpoint reach the disk
        app[REVOKED].close()
        app[STORE].close()
        await app[HTTP].close()
        provider.shutdown()  # flushes the spans still batched

    app.cleanup_ctx.append(resources)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/openapi.json", openapi_view)
    app.router.add_post("/v1/auth/login", login)
    app.router.add_post("/v1/auth/refresh", refresh)
    app.router.add_post("/v1/auth/logout", logout)
    app.router.add_get("/v1/audit", audit_query)
    app.router.add_post("/v1/operations/{name}", run_operation)
    app.router.add_get("/v1/reports/{id}", download_report)
    app.router.add_get("/v1/approvals", list_approvals)
    app.router.add_post("/v1/approvals/{id}", decide_approval)
    app.router.add_post("/v1/gdpr/consents", record_consent)
    app.router.add_get("/v1/gdpr/consents/{subject}", consent_history)
    app.router.add_get("/v1/gdpr/subjects/{subject}/export", export_subject)
    app.router.add_delete("/v1/gdpr/subjects/{subject}", erase_subject)
    return app
