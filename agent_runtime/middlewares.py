"""The middleware every request passes (``serve``): metrics, tracing, request context (ids and
JSON errors) and authentication, in that order from the outside. Also the response hook that keeps
versions out of the ``Server`` header, and the task that writes the digest of failed
authentications."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator

from aiohttp import web
from opentelemetry import trace

from agent_runtime.api import ApiError, audit_auth_failure, client_ip, record_failure_summaries, verify_token
from agent_runtime.audit import AuditUnavailableError
from agent_runtime.routing import Handler
from agent_runtime.security.rbac import Principal
from agent_runtime.security.tokens import ACCESS_TYPE, TokenError
from agent_runtime.sharedstate import StateInputError, StateUnavailableError
from agent_runtime.state import AUTH_FAILURES, CONFIG, CONTEXT, ID_SOURCE, METRICS, PUBLIC_PATHS, TRACER, RequestContext
from agent_runtime.tracing import PROPAGATOR, CurrentSpan, trace_id_of

log = logging.getLogger("agent_runtime")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")
SERVER = "agent"  # what the Server header says: no product versions to look up vulnerabilities by


def route_template(request: web.Request) -> str | None:
    """The route the request matched, as declared (``/v1/gdpr/subjects/{subject}``): what spans,
    metrics and logs name, never the raw path with its identifiers. None when nothing matched."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


def error_response(context: RequestContext, error: ApiError) -> web.Response:
    body = {**error.fields, "code": error.code, "message": error.message, "request_id": context.request_id}
    return web.json_response(body, status=error.status, headers=error.headers)


@web.middleware
async def serve(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What every request passes, outermost first: timed and counted by route template (never the
    raw path: no ids in labels); sampled for tracing, and in a server span when sampled; given
    its ids; authenticated; every error answered as JSON. One middleware and one coroutine inside
    it, not four middlewares: every layer of coroutines is resumed each time a request waits (for
    the audit's fsync, at least once)."""
    started = time.perf_counter()
    app = request.app
    ids = app[ID_SOURCE]
    request_id = f"{ids.getrandbits(64):016x}"
    # Head sampling at traceSampleRatio: a new trace that is not sampled gets a trace id but no
    # spans at all, which is most requests and the cheap path. A caller's traceparent decides
    # for itself (parent-based).
    if "traceparent" not in request.headers and ids.random() >= app[CONFIG].observability.trace_sample_ratio:
        context = request[CONTEXT] = RequestContext(app, request_id, f"{ids.getrandbits(128):032x}", traced=False)
        response = await _answered(request, handler, context)
    else:
        context = request[CONTEXT] = RequestContext(app, request_id, "", traced=True)
        response = await _traced(request, handler, context)
    route = route_template(request) or "unmatched"
    app[METRICS].observe_request(route, request.method, str(response.status), time.perf_counter() - started)
    return response


async def _traced(request: web.Request, handler: Handler, context: RequestContext) -> web.StreamResponse:
    """A server span, continuing the caller's W3C trace; its trace id is returned in X-Trace-ID
    and written into the audit record."""
    parent = PROPAGATOR.extract(carrier=request.headers)
    tracer = context.app[TRACER]
    # The router has matched before any middleware runs, so the template is known from the start.
    route = route_template(request)
    name = f"{request.method} {route}" if route else request.method
    # Given at the start, in one go. No url.path: the raw path holds subject ids (GDPR) and other ids.
    attributes = {
        "http.request.method": request.method,
        "url.scheme": request.scheme,
        "client.address": client_ip(request),
    }
    if route:
        attributes["http.route"] = route
    span = tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
    with CurrentSpan(span):
        context.trace_id = trace_id_of(span)
        response = await _answered(request, handler, context)
        if span.is_recording():
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(trace.StatusCode.ERROR)
        return response


async def _answered(request: web.Request, handler: Handler, context: RequestContext) -> web.StreamResponse:
    """The answer, with a request id and the trace id; every error as JSON. The request id is
    always the server's own, so the audit trail's ids are unique and cannot be forged; a client's
    X-Request-ID (if it looks like one) is kept beside it as ``client_request_id``."""
    incoming = request.headers.get("X-Request-ID", "")
    if incoming and _REQUEST_ID.fullmatch(incoming):
        context.client_request_id = incoming
    try:
        if request.path not in context.app[PUBLIC_PATHS]:
            await authenticate(request, context)
        response = await handler(request)
    except ApiError as error:
        response = error_response(context, error)
    except StateInputError as refused:
        response = error_response(context, ApiError(400, "invalid_value", str(refused)))
    except StateUnavailableError as unavailable:
        # Fail closed: whatever needed the shared state (a revocation, consent, approval or
        # throttle check, a stored result) is refused, never answered as if it had passed.
        log.warning("refused %s %s: %s", request.method, route_template(request) or "(no route)", unavailable)
        response = error_response(
            context,
            ApiError(503, "state_unavailable", "the agent's shared state cannot be reached; retry later",
                     {"Retry-After": "5"}),
        )  # fmt: skip
    except AuditUnavailableError as unrecorded:
        # Fail closed, as for the shared state: what cannot be audited is not answered as done.
        log.warning("refused %s %s: %s", request.method, route_template(request) or "(no route)", unrecorded)
        response = error_response(
            context,
            ApiError(503, "audit_unavailable", "the audit trail cannot be written; retry later", {"Retry-After": "1"}),
        )
    except web.HTTPException as http_error:
        if http_error.status >= 400:
            code = http_error.reason.lower().replace(" ", "_")
            # A 405 must say which methods the path takes (RFC 9110 15.5.6): aiohttp's Allow is kept.
            allow = {"Allow": http_error.headers["Allow"]} if "Allow" in http_error.headers else None
            response = error_response(context, ApiError(http_error.status, code, http_error.reason, allow))
        else:
            raise
    except Exception:  # a bug: answer in JSON with the ids to look it up, never a stack trace
        log.exception(
            "unhandled error on %s %s (request %s, client request %s)",
            request.method,
            route_template(request) or "(no route)",
            context.request_id,
            context.client_request_id or "-",
        )
        response = error_response(context, ApiError(500, "internal_error", "an internal error occurred"))
    response.headers["X-Request-ID"] = context.request_id
    response.headers["X-Trace-ID"] = context.trace_id
    return response


async def authenticate(request: web.Request, context: RequestContext) -> None:
    """A valid bearer access token (every route but those declared public): the request's principal."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "unauthenticated", "a bearer token is required", {"WWW-Authenticate": 'Bearer realm="agent"'}
        )
    try:
        claims = await verify_token(context.app, token.strip(), ACCESS_TYPE)
    except TokenError as error:
        context.app[METRICS].auth_failures.labels(error.reason).inc()
        # Anyone can send these, unthrottled: aggregated, so a flood cannot cost an fsync each.
        await audit_auth_failure(request, "verify_token", error.reason)
        raise ApiError(
            401,
            "invalid_token",
            error.reason,
            {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{error.reason}"'},
        ) from None
    context.principal = Principal(
        claims.subject, claims.roles, claims.token_id, claims.expires_at, claims.session_id, claims.session_start
    )


MIDDLEWARES = (serve,)


async def hide_server_version(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: replaces aiohttp's ``Server: Python/3.x aiohttp/3.x`` on every answer
    the application makes (errors the HTTP parser answers itself never reach the app)."""
    response.headers["Server"] = SERVER


async def failure_summaries(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: writes the failed-authentication summaries as their windows end, and what is
    left at shutdown (registered after the audit log's context, so it is torn down before it)."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(app[AUTH_FAILURES].interval_seconds / 4)
            try:
                await record_failure_summaries(app)
            except (OSError, RuntimeError):
                log.exception("could not write the failed-authentication summaries")

    task = asyncio.create_task(loop(), name="auth-failure-summaries")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await record_failure_summaries(app, everything=True)
