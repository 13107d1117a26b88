"""The middlewares every request passes, outermost first: metrics, tracing, request context
(ids and JSON errors), authentication. Each is a plain ``async def (request, handler)``."""

from __future__ import annotations

import logging
import re
import time

from aiohttp import web
from opentelemetry import trace

from agent_runtime.api import ApiError, audit, client_ip, verify_token
from agent_runtime.routing import Handler
from agent_runtime.security.rbac import Principal
from agent_runtime.security.tokens import ACCESS_TYPE, TokenError
from agent_runtime.state import (
    CONFIG,
    ID_SOURCE,
    METRICS,
    PRINCIPAL,
    PUBLIC_PATHS,
    REQUEST_ID,
    TRACE_ID,
    TRACED,
    TRACER,
)
from agent_runtime.tracing import PROPAGATOR, trace_id_of

log = logging.getLogger("agent_runtime")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")


def error_response(request: web.Request, error: ApiError) -> web.Response:
    body = {"code": error.code, "message": error.message, "request_id": request.get(REQUEST_ID)}
    return web.json_response(body, status=error.status, headers=error.headers)


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
    ids = request.app[ID_SOURCE]
    if "traceparent" not in request.headers and ids.random() >= request.app[CONFIG].observability.trace_sample_ratio:
        request[TRACE_ID] = f"{ids.getrandbits(128):032x}"
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
    if _REQUEST_ID.fullmatch(incoming):
        request[REQUEST_ID] = incoming
    else:
        request[REQUEST_ID] = f"{request.app[ID_SOURCE].getrandbits(64):016x}"
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
    """A valid bearer access token on every route but those declared public."""
    if request.path in request.app[PUBLIC_PATHS]:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "unauthenticated", "a bearer token is required", {"WWW-Authenticate": 'Bearer realm="agent"'}
        )
    try:
        claims = await verify_token(request.app, token.strip(), ACCESS_TYPE)
    except TokenError as error:
        request.app[METRICS].auth_failures.labels(error.reason).inc()
        await audit(request, type="authn", action="verify_token", result="failure", details={"reason": error.reason})
        raise ApiError(
            401,
            "invalid_token",
            error.reason,
            {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{error.reason}"'},
        ) from None
    request[PRINCIPAL] = Principal(claims.subject, claims.roles, claims.token_id, claims.expires_at)
    return await handler(request)


# In the order aiohttp applies them: the first is outermost.
MIDDLEWARES = (observe, traced, request_context, authenticate)
