"""POST /v1/operations/{name}: authorize, validate, check consent (GDPR) or hold for approval
(SOX), then run the operation in its span, bulkhead and timeout.

A CPU-bound operation runs in a worker process (workers.py), so that no input can hold the event
loop: its body is parsed and validated there, it runs there (killed at its timeout), and its
result is encoded as JSON there; the loop only moves bytes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from opentelemetry import trace
from pydantic import BaseModel, ValidationError

from agent_contract.config import ComplianceFramework
from agent_runtime.api import (
    ApiError,
    audit,
    authorize,
    parse_json_object,
    pseudonym,
    read_body,
    string_field,
)
from agent_runtime.operations import InputError, Operation
from agent_runtime.operations.chat import ModelError
from agent_runtime.resilience import CircuitOpenError, OverloadedError
from agent_runtime.routing import Reply, Route, Schema
from agent_runtime.sharedstate import StateUnavailableError
from agent_runtime.state import (
    BULKHEADS,
    CONFIG,
    METRICS,
    REGISTRY,
    REQUEST_ID,
    STORE,
    TRACE_ID,
    TRACED,
    TRACER,
    WORKERS,
)
from agent_runtime.workers import Pickled

T = TypeVar("T")
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


def _pickled(value: Any) -> Pickled:
    return Pickled(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


async def operation_input(request: web.Request, operation: Operation) -> tuple[dict[str, Any], Any]:
    """The body and the validated input. A large body is parsed and validated in a worker, in the
    operation's bulkhead and under its timeout: parsing and validating a megabyte of JSON records
    takes 50 to 100 ms, which the loop must not spend; a small one (ping's) costs the loop less
    than a trip to a worker would."""
    raw = await read_body(request)
    if len(raw) <= INLINE_BODY_BYTES:
        body = parse_json_object(raw)
        return body, validated_input(operation, body.get("input", {}))
    compliance = request.app[CONFIG].compliance
    # The input itself comes back only when it is to be stored for an approval (SOX).
    keep = ComplianceFramework.SOX in compliance.frameworks and operation.name in compliance.financial_operations
    job = (raw, operation.input_model, keep, operation.cpu_bound)
    return await _limited(request, operation, {}, lambda: request.app[WORKERS].run(parsed_body, job))


async def run_operation(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    operation = request.app[REGISTRY].get(name)
    if operation is None:
        raise ApiError(404, "unknown_operation", f"operation {name!r} is not enabled on this agent")
    principal = await authorize(request, operation.permission, operation.level, f"operation:{name}")
    body, argument = await operation_input(request, operation)
    compliance = request.app[CONFIG].compliance
    subject = purpose = None  # whose personal data, under which consent (GDPR)
    if operation.personal_data and ComplianceFramework.GDPR in compliance.frameworks:
        subject = string_field(body, "subject", 128)
        purpose = string_field(body, "purpose", 64)
        if not await request.app[STORE].has_consent(subject, purpose):
            details = {"reason": "no consent", "subject": pseudonym(request.app, subject), "purpose": purpose}
            await audit(request, type="authz", action=f"operation:{name}", result="denied", details=details)
            raise ApiError(403, "consent_required", f"no consent of this subject for purpose {purpose!r} (GDPR)")
    if ComplianceFramework.SOX in compliance.frameworks and name in compliance.financial_operations:
        approval_id = await request.app[STORE].create_approval(
            name, principal.subject, json.dumps(body.get("input", {})), subject, purpose
        )
        await audit(
            request, type="operation", action=name, result="pending_approval", details={"approval_id": approval_id}
        )
        return web.json_response(
            {"operation": name, "status": "pending_approval", "approval_id": approval_id}, status=202
        )
    result = await execute(request, operation, argument, {})
    return operation_response(request, name, result, principal.subject)


class EncodedResult:
    """An operation's result as JSON text, encoded by the worker that computed it."""

    __slots__ = ("json",)

    def __init__(self, json: bytes) -> None:
        self.json = json


Result = dict[str, Any] | EncodedResult


def operation_response(request: web.Request, name: str, result: Result, actor: str) -> web.Response:
    body = {
        "operation": name,
        "result": result,
        "request_id": request[REQUEST_ID],
        "trace_id": request[TRACE_ID],
        "actor": actor,
    }
    if isinstance(result, dict):
        return web.json_response(body)
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
    metrics = request.app[METRICS]

    async def failed(result: str, **details: Any) -> None:
        metrics.operations.labels(name, result).inc()
        await audit(request, type="operation", action=name, result=result, details={**audit_details, **details})

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
            result = await _limited(request, operation, audit_details, lambda: _call(request.app, operation, argument))
    except ApiError:
        raise
    except InputError as error:
        metrics.operations.labels(name, "invalid_input").inc()
        raise ApiError(422, "invalid_input", f"input: {error}") from None
    except ModelError as error:
        await failed("unavailable", reason=str(error))
        raise ApiError(502, "dependency_failed", str(error)) from None
    except CircuitOpenError as error:
        await failed("unavailable", reason=str(error))
        raise ApiError(
            503, "dependency_unavailable", str(error), {"Retry-After": str(int(error.retry_after) + 1)}
        ) from None
    except StateUnavailableError:
        await failed("unavailable", reason="shared state unavailable")
        raise  # answered 503 (fail closed), not as the operation's own failure
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
    await audit(request, type="operation", action=name, result="success", details=details)
    return result


async def _limited(
    request: web.Request, operation: Operation, audit_details: dict[str, Any], call: Callable[[], Awaitable[T]]
) -> T:
    """``call()`` in the operation's bulkhead and under its timeout: beyond the bulkhead's queue a
    503, past the timeout a 504 (and a CPU-bound call's worker is killed), each counted and audited."""
    name = operation.name
    metrics = request.app[METRICS]
    timeout = request.app[CONFIG].resilience.operation_timeout_seconds
    try:
        async with asyncio.timeout(timeout):
            return await request.app[BULKHEADS][name].run(call)
    except OverloadedError:
        metrics.shed.labels(name).inc()
        metrics.operations.labels(name, "shed").inc()
        await audit(request, type="operation", action=name, result="shed", details=audit_details)
        raise ApiError(
            503, "overloaded", f"operation {name!r} is at capacity; retry shortly", {"Retry-After": "1"}
        ) from None
    except TimeoutError:
        metrics.operations.labels(name, "timeout").inc()
        details = {**audit_details, "seconds": timeout}
        await audit(request, type="operation", action=name, result="timeout", details=details)
        raise ApiError(504, "operation_timeout", f"operation {name!r} took longer than {timeout:g}s") from None


async def _call(app: web.Application, operation: Operation, argument: Any) -> Result:
    """CPU-bound handlers run off the loop, so that neither probes nor other requests wait for them
    and their deadline can stop them; the rest (ping, plugins awaiting I/O) run on it, at no cost."""
    if operation.cpu_bound:
        return EncodedResult(await app[WORKERS].run_json(operation.handler, argument))
    return await operation.handler(argument)


async def worker_pool(app: web.Application) -> AsyncIterator[None]:
    """The worker processes of CPU-bound operations: forked at start-up, stopped at shutdown, once
    the server has let the in-flight requests finish. The fork server preloads what they run."""
    handlers = {operation.handler.__module__ for operation in app[REGISTRY].operations.values() if operation.cpu_bound}
    await app[WORKERS].start(preload=[__name__, "agent_runtime.operations.reports", *sorted(handlers)])
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
        errors=(400, 401, 403, 413, 422, 500, 502, 503, 504),
    ),
)
