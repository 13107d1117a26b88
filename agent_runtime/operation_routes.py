"""POST /v1/operations/{name}: authorize, validate, check consent (GDPR) or hold for approval
(SOX), then run the operation in its span, bulkhead and timeout.

A CPU-bound operation runs in a worker process (workers.py), so that no input can hold the event
loop: its body is parsed and validated there, it runs there (killed at its timeout), and its
result is encoded as JSON there; the loop only moves bytes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import pickle
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from opentelemetry import trace
from pydantic import BaseModel, ValidationError

from agent_contract.config import ComplianceFramework
from agent_contract.operations import CHAT
from agent_runtime.api import (
    ApiError,
    audit,
    authenticated,
    authorize,
    parse_json_object,
    pseudonym,
    read_body,
    record_failure_summaries,
    string_field,
)
from agent_runtime.limits import CALLER, LIMITER, LimitExceededError
from agent_runtime.operations import InputError, Operation
from agent_runtime.operations.base import CALL_DETAILS, StreamEvent
from agent_runtime.operations.chat import ModelError
from agent_runtime.resilience import CircuitOpenError, OverloadedError
from agent_runtime.routing import EVENT_STREAM_MEDIA_TYPE, JSON_MEDIA_TYPE, Reply, Route, Schema
from agent_runtime.sharedstate import StateUnavailableError
from agent_runtime.state import (
    BULKHEADS,
    CONFIG,
    CONTEXT,
    DEADLINES,
    LIMIT_REFUSALS,
    METRICS,
    REGISTRY,
    STORE,
    TRACER,
    WORKERS,
    RequestContext,
)
from agent_runtime.tracing import CurrentSpan
from agent_runtime.workers import Pickled, bulk, json_bytes

T = TypeVar("T")
log = logging.getLogger("agent_runtime")
# What run_operation reads of the body besides the input (GDPR's subject and purpose).
ENVELOPE_FIELDS = ("subject", "purpose")
MAX_PROBLEMS = 10  # named in a 422; a list of 100,000 bad items is not echoed back whole
INLINE_BODY_BYTES = 64 * 1024  # parsed on the loop up to this size: about 5 ms (JSON records, measured)


def validated_input(operation: Operation, payload: Any) -> Any:
    return _validated(operation.input_model, payload)


def _validated(model: type[BaseModel] | None, payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_field", "input: a JSON object is required")
    if model is None:
        return payload
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        errors = error.errors()
        problems = "; ".join(
            f"input.{'.'.join(str(p) for p in item['loc'])}: {item['msg']}".replace("input.: ", "input: ")
            for item in errors[:MAX_PROBLEMS]
        )
        if len(errors) > MAX_PROBLEMS:
            problems += f"; and {len(errors) - MAX_PROBLEMS} more"
        raise ApiError(422, "invalid_input", problems) from None


def parsed_body(job: tuple[bytes, type[BaseModel] | None, bool, bool]) -> tuple[dict[str, Any], Any]:
    """In a worker: the body's envelope fields (and its input, when kept for an approval) and the
    validated input as the loop needs it; ApiError (400, 422) as the loop would raise it.

    The input of a CPU-bound operation stays pickled: only a worker looks inside. So do the
    fields an input model names in WORKER_FIELDS (those its handler on the loop hands to a worker
    without reading them: generate_report's analysis)."""
    raw, model, keep_input, cpu_bound = job
    body = parse_json_object(raw)
    argument = _validated(model, body.get("input", {}))
    envelope = {field: body[field] for field in ENVELOPE_FIELDS if field in body}
    if keep_input:
        envelope["input"] = body.get("input", {})
    if cpu_bound:
        return envelope, _pickled(argument)
    if isinstance(argument, BaseModel) and (fields := getattr(argument, "WORKER_FIELDS", ())):
        argument = argument.model_copy(update={name: _pickled(getattr(argument, name)) for name in fields})
    return envelope, argument


class UnparsedInput:
    """A large body whose parsing, validation and operation all happen in one worker call: the
    loop needs nothing of it (no consent to check, no approval to hold), so its bytes cross to a
    worker once and only the answer comes back (a 70 MB CSV made three trips before)."""

    __slots__ = ("model", "raw")

    def __init__(self, raw: bytes, model: type[BaseModel] | None) -> None:
        self.raw = raw
        self.model = model


def parsed_and_run(job: tuple[Callable[[Any], Any], bytes, type[BaseModel] | None]) -> Any:
    """In a worker: the body parsed and its input validated (ApiError 400 or 422 as the loop would
    raise it), then the operation on it. Its result is encoded by the worker (run_json)."""
    handler, raw, model = job
    return handler(_validated(model, parse_json_object(raw).get("input", {})))


def _needs_body_on_loop(request: web.Request, operation: Operation) -> bool:
    """Whether run_operation reads the body itself: a subject's consent to check (GDPR), an input
    to hold for approval (SOX)."""
    compliance = request.app[CONFIG].compliance
    return (operation.personal_data and ComplianceFramework.GDPR in compliance.frameworks) or (
        ComplianceFramework.SOX in compliance.frameworks and operation.name in compliance.financial_operations
    )


def _pickled(value: Any) -> Pickled:
    return Pickled(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


async def operation_input(request: web.Request, operation: Operation, raw: bytes) -> tuple[dict[str, Any], Any]:
    """The body and the validated input. A large body is parsed and validated in a worker, in the
    operation's bulkhead and under its timeout: parsing and validating a megabyte of JSON records
    takes 50 to 100 ms, which the loop must not spend; a small one (ping's) costs the loop less
    than a trip to a worker would. A CPU-bound operation's large body the loop needs nothing of
    is not parsed here at all: see UnparsedInput."""
    if operation.cpu_bound and len(raw) > INLINE_BODY_BYTES and not _needs_body_on_loop(request, operation):
        return {}, UnparsedInput(raw, operation.input_model)
    if len(raw) <= INLINE_BODY_BYTES:
        body = parse_json_object(raw)
        return body, validated_input(operation, body.get("input", {}))
    compliance = request.app[CONFIG].compliance
    # The input itself comes back only when it is to be stored for an approval (SOX).
    keep = ComplianceFramework.SOX in compliance.frameworks and operation.name in compliance.financial_operations
    job = (bulk(raw), operation.input_model, keep, operation.cpu_bound)  # its bytes beside the call: no copy
    return await _limited(request, operation, {}, lambda: request.app[WORKERS].run(parsed_body, job))


async def run_operation(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    app = request[CONTEXT].app
    operation = app[REGISTRY].get(name)
    if operation is None:
        raise ApiError(404, "unknown_operation", f"operation {name!r} is not enabled on this agent")
    principal = await authorize(request, operation.permission, operation.level, f"operation:{name}")
    streamed = stream_wanted(request, operation)
    await admit(request, operation, principal.subject)
    body, argument = await operation_input(request, operation, await read_body(request))
    compliance = app[CONFIG].compliance
    subject = purpose = None  # whose personal data, under which consent (GDPR)
    if operation.personal_data and ComplianceFramework.GDPR in compliance.frameworks:
        subject = string_field(body, "subject", 128)
        purpose = string_field(body, "purpose", 64)
        if not await app[STORE].has_consent(subject, purpose):
            details = {"reason": "no consent", "subject": pseudonym(app, subject), "purpose": purpose}
            await audit(request, type="authz", action=f"operation:{name}", result="denied", details=details)
            raise ApiError(403, "consent_required", f"no consent of this subject for purpose {purpose!r} (GDPR)")
    if ComplianceFramework.SOX in compliance.frameworks and name in compliance.financial_operations:
        approval_id = await app[STORE].create_approval(
            name, principal.subject, json.dumps(body.get("input", {})), subject, purpose
        )
        await audit(
            request, type="operation", action=name, result="pending_approval", details={"approval_id": approval_id}
        )
        return web.json_response(
            {"operation": name, "status": "pending_approval", "approval_id": approval_id}, status=202
        )
    if streamed:
        return await execute_stream(request, operation, argument, {})
    result = await execute(request, operation, argument, {})
    return operation_response(request, name, result, principal.subject)


async def admit(request: web.Request, operation: Operation, caller: str) -> None:
    """spec.limits, after authorisation and before anything else is done for the caller: the
    caller's and the agent's request rates, and for chat their token budgets."""
    CALLER.set(caller)  # whose budget the operation's tokens are spent from
    if operation.name == CHAT.name:  # first: it counts nothing, so a refusal costs no request
        await admit_tokens(request, operation, caller)
    limiter = request[CONTEXT].app[LIMITER]
    if not limiter.request_rules:  # no requestsPerMinute: nothing to count (and no coroutine to make)
        return
    try:
        await limiter.admit_request(caller)
    except LimitExceededError as exceeded:
        raise await limit_refused(request, operation.name, exceeded, caller) from None


async def admit_tokens(request: web.Request, operation: Operation, caller: str) -> None:
    """For chat, the caller's and the agent's token budgets (counting nothing): a 429 when spent.
    Also checked before an approval is decided, so a refused one stays pending (compliance.py)."""
    if operation.name != CHAT.name:
        return
    try:
        await request.app[LIMITER].admit_tokens(caller)
    except LimitExceededError as exceeded:
        raise await limit_refused(request, operation.name, exceeded, caller) from None


async def limit_refused(request: web.Request, name: str, exceeded: LimitExceededError, caller: str) -> ApiError:
    """The 429 of a refusal by a rate limit or budget of ``caller``, counted and audited: Retry-After
    in whole seconds, rounded up (a retry at that time is admitted, if nothing else was counted
    meanwhile). A client that keeps retrying must not cost an fsync each: the first refusal of an
    (operation, limit, caller) in a window is recorded, the rest counted and recorded as one summary
    when the window ends (api.record_failure_summaries), as failed authentications are."""
    seconds = max(1, math.ceil(exceeded.retry_after_seconds))
    request.app[METRICS].count_operation(name, "rate_limited")
    first = request.app[LIMIT_REFUSALS].add(name, exceeded.limit, caller)
    await record_failure_summaries(request.app)  # windows that ended come before this new one
    if first:
        details: dict[str, Any] = {"limit": exceeded.limit, "retry_after_seconds": seconds}
        if caller != authenticated(request).subject:
            details["requested_by"] = caller  # an approval, refused by its requester's budget
        await audit(request, type="operation", action=name, result="rate_limited", details=details)
    return ApiError(429, "limit_exceeded", exceeded.message, {"Retry-After": str(seconds)}, {"limit": exceeded.limit})


class EncodedResult:
    """An operation's result as JSON text, encoded by the worker that computed it."""

    __slots__ = ("json",)

    def __init__(self, json: bytes) -> None:
        self.json = json


Result = dict[str, Any] | EncodedResult


def operation_response(request: web.Request, name: str, result: Result, actor: str) -> web.Response:
    context = request[CONTEXT]
    body = {
        "operation": name,
        "result": result,
        "request_id": context.request_id,
        "trace_id": context.trace_id,
        "actor": actor,
    }
    if isinstance(result, dict):
        return web.Response(body=json_bytes(body), content_type="application/json")
    # The same document json_response would write, the result spliced in as the worker encoded it.
    parts = [
        f"{json.dumps(key)}: ".encode() + (result.json if key == "result" else json.dumps(value).encode())
        for key, value in body.items()
    ]
    return web.Response(body=b"{" + b", ".join(parts) + b"}", content_type="application/json")


async def execute(request: web.Request, operation: Operation, argument: Any, audit_details: dict[str, Any]) -> Result:
    """Runs an operation in its span, bulkhead and timeout; every outcome is counted and audited.
    A CPU-bound operation runs in a worker process, which the timeout kills (see workers.py)."""
    name = operation.name
    started = time.perf_counter()
    context = request[CONTEXT]
    app = context.app
    metrics = app[METRICS]
    call_details: dict[str, Any] = {}  # what the operation adds to its record (chat: its tokens)
    details_token = CALL_DETAILS.set(call_details)
    try:
        with _tool_span(context, operation):
            result = await _limited(request, operation, audit_details, lambda: _call(app, operation, argument))
    except Exception as error:
        raise await _failure(request, operation, error, {**audit_details, **call_details}) from None
    finally:
        CALL_DETAILS.reset(details_token)
    metrics.count_operation(name, "success")
    details = {
        **audit_details,
        **call_details,
        "authorization": "allowed",
        "level": operation.level.value,
        "ms": round((time.perf_counter() - started) * 1000, 2),
    }
    await audit(request, type="operation", action=name, result="success", details=details)
    return result


_UNTRACED = contextlib.nullcontext(None)  # holds nothing: one serves every untraced call


def _tool_span(context: RequestContext, operation: Operation) -> contextlib.AbstractContextManager[Any]:
    """The operation's span (GenAI's ``execute_tool``), when the request is traced."""
    if not context.traced:
        return _UNTRACED
    attributes = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": operation.name,
        "agent.security_level": operation.level.value,
    }
    span = context.app[TRACER].start_span(
        f"execute_tool {operation.name}", kind=trace.SpanKind.INTERNAL, attributes=attributes
    )
    return CurrentSpan(span, record_exception=True)


async def _failure(
    request: web.Request, operation: Operation, error: Exception, audit_details: dict[str, Any]
) -> Exception:
    """What to raise for an operation that failed, once counted and audited (input it cannot work
    with is only counted: the caller is told, and nothing ran)."""
    name = operation.name
    metrics = request.app[METRICS]

    async def failed(result: str, **details: Any) -> None:
        metrics.count_operation(name, result)
        await audit(request, type="operation", action=name, result=result, details={**audit_details, **details})

    if isinstance(error, ApiError):
        return error
    if isinstance(error, LimitExceededError):  # a budget checked again inside the operation
        return await limit_refused(request, name, error, CALLER.get(authenticated(request).subject))
    if isinstance(error, InputError):
        metrics.count_operation(name, "invalid_input")
        return ApiError(422, "invalid_input", f"input: {error}")
    if isinstance(error, ModelError):
        await failed("unavailable", reason=str(error))
        return ApiError(502, "dependency_failed", str(error))
    if isinstance(error, CircuitOpenError):
        await failed("unavailable", reason=str(error))
        return ApiError(503, "dependency_unavailable", str(error), {"Retry-After": str(int(error.retry_after) + 1)})
    if isinstance(error, StateUnavailableError):
        await failed("unavailable", reason="shared state unavailable")
        return error  # answered 503 (fail closed), not as the operation's own failure
    await failed("error", error=type(error).__name__)
    return ApiError(500, "operation_failed", f"operation {name!r} failed")


async def _limited(
    request: web.Request, operation: Operation, audit_details: dict[str, Any], call: Callable[[], Awaitable[T]]
) -> T:
    """``call()`` in the operation's bulkhead and under its timeout: beyond the bulkhead's queue a
    503, past the timeout a 504 (and a CPU-bound call's worker is killed), each counted and audited."""
    app = request[CONTEXT].app
    try:
        return await app[DEADLINES].run(app[BULKHEADS][operation.name].run, call)
    except OverloadedError:
        raise await _shed(request, operation, audit_details) from None
    except TimeoutError:
        raise await _timed_out(request, operation, audit_details) from None


async def _shed(request: web.Request, operation: Operation, audit_details: dict[str, Any]) -> ApiError:
    name = operation.name
    metrics = request.app[METRICS]
    metrics.shed.labels(name).inc()
    metrics.count_operation(name, "shed")
    await audit(request, type="operation", action=name, result="shed", details=audit_details)
    return ApiError(503, "overloaded", f"operation {name!r} is at capacity; retry shortly", {"Retry-After": "1"})


async def _timed_out(request: web.Request, operation: Operation, audit_details: dict[str, Any]) -> ApiError:
    name = operation.name
    timeout = request.app[CONFIG].resilience.operation_timeout_seconds
    request.app[METRICS].count_operation(name, "timeout")
    details = {**audit_details, "seconds": timeout}
    await audit(request, type="operation", action=name, result="timeout", details=details)
    return ApiError(504, "operation_timeout", f"operation {name!r} took longer than {timeout:g}s")


def _call(app: web.Application, operation: Operation, argument: Any) -> Awaitable[Result]:
    """CPU-bound handlers run off the loop, so that neither probes nor other requests wait for them
    and their deadline can stop them; the rest (ping, plugins awaiting I/O) run on it, at no cost:
    their own coroutine is what is awaited, with no coroutine of this function around it."""
    if isinstance(argument, UnparsedInput):
        job = (operation.handler, bulk(argument.raw), argument.model)
        return _encoded(app[WORKERS].run_json(parsed_and_run, job))
    if operation.cpu_bound:
        return _encoded(app[WORKERS].run_json(operation.handler, argument))
    return operation.handler(argument)


async def _encoded(json: Awaitable[bytes]) -> EncodedResult:
    return EncodedResult(await json)


# How often an idle stream gets a comment line: proxies keep it open, and a client that left is
# noticed while the model is silent (a write to its closed connection fails).
SSE_PING_SECONDS = 15.0
# What a stream's last bytes (an error event, its end) get once it is over: a client that stopped
# reading must not keep the call, and its bulkhead place, past the deadline. Then it is dropped.
SSE_CLOSE_SECONDS = 5.0
EVENT_STREAM = EVENT_STREAM_MEDIA_TYPE


def _accepted(request: web.Request) -> list[str]:
    """The media types the Accept header names (not those refused with q=0)."""
    accepted = []
    for header in request.headers.getall("Accept", ()):
        for item in header.split(","):
            media, *parameters = (part.strip().lower() for part in item.split(";"))
            if media and not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in parameters):
                accepted.append(media)
    return accepted


def stream_wanted(request: web.Request, operation: Operation) -> bool:
    """Whether to answer with Server-Sent Events: asked for (Accept: text/event-stream) of an
    operation that streams. A caller that accepts nothing else from one that does not gets 406."""
    accepted = _accepted(request)
    if EVENT_STREAM not in accepted:
        return False
    if operation.stream is not None:
        return True
    if not any(media in (JSON_MEDIA_TYPE, "application/*", "*/*") for media in accepted):
        raise ApiError(406, "not_acceptable", f"operation {operation.name!r} does not stream; accept {JSON_MEDIA_TYPE}")
    return False


def _sse(event: StreamEvent) -> bytes:
    # JSON has no raw line breaks, so the data is always one line.
    data = json.dumps(event.data, separators=(",", ":"))
    if event.event is None:
        return f"data: {data}\n\n".encode()
    if not event.event.isidentifier():
        raise ValueError(f"event name {event.event!r}: a name without spaces or line breaks is required")
    return f"event: {event.event}\ndata: {data}\n\n".encode()


async def execute_stream(
    request: web.Request, operation: Operation, argument: Any, audit_details: dict[str, Any]
) -> web.StreamResponse:
    """Runs a streaming operation in its span, bulkhead and timeout, relaying its events as
    Server-Sent Events. Until its first event it fails as ``execute`` does (an HTTP error); from
    then on the outcome ends the stream, after an ``error`` event when there is a failure to tell.
    Either way the outcome is counted and audited once, with what the operation added."""
    call_details: dict[str, Any] = {}
    details_token = CALL_DETAILS.set(call_details)
    try:
        with _tool_span(request[CONTEXT], operation):
            return await _limited_stream(request, operation, argument, audit_details, call_details)
    except Exception as error:
        raise await _failure(request, operation, error, {**audit_details, **call_details}) from None
    finally:
        CALL_DETAILS.reset(details_token)


async def _limited_stream(
    request: web.Request,
    operation: Operation,
    argument: Any,
    audit_details: dict[str, Any],
    call_details: dict[str, Any],
) -> web.StreamResponse:
    """``_limited`` for a stream: the bulkhead's place is held until the stream ends; the timeout
    answers 504 until the first event, and after it ends the stream (``_relay``)."""
    timeout = request.app[CONFIG].resilience.operation_timeout_seconds
    try:
        async with asyncio.timeout(timeout) as scope:
            return await request.app[BULKHEADS][operation.name].run(
                lambda: _relay(request, operation, argument, scope, audit_details, call_details)
            )
    except OverloadedError:
        raise await _shed(request, operation, audit_details) from None
    except TimeoutError:
        raise await _timed_out(request, operation, {**audit_details, **call_details}) from None


async def _relay(
    request: web.Request,
    operation: Operation,
    argument: Any,
    scope: asyncio.Timeout,
    audit_details: dict[str, Any],
    call_details: dict[str, Any],
) -> web.StreamResponse:
    assert operation.stream is not None
    name = operation.name
    started = time.perf_counter()
    task = asyncio.current_task()
    assert task is not None
    events = operation.stream(argument)
    try:
        event = await anext(events, None)  # what fails up to here is answered as execute would
    except BaseException:
        await events.aclose()
        raise
    deadline = scope.when()
    scope.reschedule(None)  # from the first byte on, the deadline ends the stream instead
    response = web.StreamResponse(
        headers={
            "Content-Type": f"{EVENT_STREAM}; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx (and ingresses built on it) would hold the events back
            "X-Request-ID": request[CONTEXT].request_id,  # the middleware's come too late for a streamed answer
            "X-Trace-ID": request[CONTEXT].trace_id,
        }
    )
    outcome, problem, relayed = "success", None, 0
    left = asyncio.Event()  # the keep-alive found the client gone and stopped this task
    cancelled: asyncio.CancelledError | None = None
    keep_alive: asyncio.Task[None] | None = None
    try:
        await response.prepare(request)
        keep_alive = asyncio.create_task(_keep_alive(response, task, left), name=f"sse-keep-alive {name}")
        async with asyncio.timeout_at(deadline):
            while event is not None:
                await response.write(_sse(event))
                relayed += 1
                event = await anext(events, None)
    except TimeoutError:
        timeout = request.app[CONFIG].resilience.operation_timeout_seconds
        outcome, problem = (
            "timeout",
            ApiError(504, "operation_timeout", f"operation {name!r} took longer than {timeout:g}s"),
        )
    except ModelError as error:
        outcome, problem = "unavailable", ApiError(502, "dependency_failed", str(error))
    except ConnectionResetError:  # a write to a client that left
        outcome = "client_disconnected"
    except asyncio.CancelledError as stop:
        if left.is_set():
            task.uncancel()  # our own keep-alive's: handled here, the task goes on
        else:
            cancelled = stop  # the server's (a client that left, with handler cancellation; a shutdown)
        gone = left.is_set() or request.transport is None or request.transport.is_closing()
        outcome = "client_disconnected" if gone else "cancelled"
    except Exception as error:
        log.exception("operation %r failed mid-stream (request %s)", name, request[CONTEXT].request_id)
        outcome, problem = (
            "error",
            ApiError(500, "operation_failed", f"operation {name!r} failed ({type(error).__name__})"),
        )
    if keep_alive is not None:
        keep_alive.cancel()
    try:
        await events.aclose()  # releases what the operation holds (chat: the model's response)
    except Exception:
        log.exception("operation %r did not close cleanly (request %s)", name, request[CONTEXT].request_id)
    if problem is not None:
        error_data = {"code": problem.code, "message": problem.message, "request_id": request[CONTEXT].request_id}
        await _last_write(request, lambda: response.write(_sse(StreamEvent(error_data, "error"))))
    request.app[METRICS].count_operation(name, outcome)
    details = {
        **audit_details,
        **call_details,
        "authorization": "allowed",
        "level": operation.level.value,
        "stream": True,
        "events": relayed,
        "ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if problem is not None:
        details["reason"] = problem.message
    await audit(request, type="operation", action=name, result=outcome, details=details)
    if cancelled is not None:
        raise cancelled
    if outcome != "client_disconnected":
        await _last_write(request, response.write_eof)
    return response


async def _last_write(request: web.Request, write: Callable[[], Awaitable[None]]) -> None:
    """A write once the stream is over, past its deadline: a client that stopped reading (whose
    buffers are full, so the write waits for it) gets SSE_CLOSE_SECONDS, then its connection is
    dropped, or it would keep the call and its bulkhead place as long as it likes. (A write its
    deadline interrupted leaves aiohttp's writer raising CancelledError at once: the same client.)"""
    task = asyncio.current_task()
    try:
        async with asyncio.timeout(SSE_CLOSE_SECONDS):
            await write()
        return
    except ConnectionResetError:
        return  # already gone
    except TimeoutError:
        pass
    except asyncio.CancelledError:
        if task is None or task.cancelling():
            raise  # this task is being cancelled (a shutdown): not the writer's stale state
    if request.transport is not None:
        request.transport.abort()


async def _keep_alive(response: web.StreamResponse, relay: asyncio.Task[Any], left: asyncio.Event) -> None:
    """A comment line every SSE_PING_SECONDS; when it cannot be written the client has left, and
    the relay is stopped (it may be waiting on a silent model, with nothing to write)."""
    while True:
        await asyncio.sleep(SSE_PING_SECONDS)
        try:
            await response.write(b": ping\n\n")
        except ConnectionResetError:
            left.set()
            relay.cancel()
            return


async def worker_pool(app: web.Application) -> AsyncIterator[None]:
    """The worker processes of CPU-bound operations: forked at start-up when the agent serves one
    or generate_report (else with the first large body, whose parse is theirs too), stopped at shutdown, once the
    server has let the in-flight requests finish. The fork server preloads what they run."""
    handlers = {operation.handler.__module__ for operation in app[REGISTRY].operations.values() if operation.cpu_bound}
    # A handler's module may name heavier modules its work needs (analyze: numpy and pandas), which
    # the server process itself never imports.
    modules = {operation.handler.__module__ for operation in app[REGISTRY].operations.values()}
    extra = {name for module in modules for name in getattr(sys.modules.get(module), "WORKER_PRELOAD", ())}
    preload = [__name__, "agent_runtime.operations.reports", *sorted(handlers | extra)]
    # Eager when an enabled operation runs there (CPU-bound, or generate_report's build, whose module
    # names what the workers preload): its first call must not pay the fork server's start.
    await app[WORKERS].start(preload, eager=bool(handlers or extra))
    yield
    await app[WORKERS].close()


OPERATION_RESULT = Schema(
    "OperationResult",
    {
        "type": "object",
        "properties": {
            "operation": {"type": "string"},
            "result": {"type": "object"},
            "request_id": {"type": "string"},
            "trace_id": {"type": "string"},
            "actor": {"type": "string"},
        },
    },
)

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/operations/{name}",
        run_operation,
        "Run an enabled operation",
        per_operation=True,  # documented once per enabled operation, with its input model
        replies=(Reply(200, "Result", OPERATION_RESULT),),
        errors=(400, 401, 403, 406, 413, 422, 429, 500, 502, 503, 504),
    ),
)
