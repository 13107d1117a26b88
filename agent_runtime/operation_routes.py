"""POST /v1/operations/{name}: authorize, validate, check consent (GDPR) or hold for approval
(SOX), then run the operation in its span, bulkhead and timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web
from opentelemetry import trace
from pydantic import ValidationError

from agent_contract.config import ComplianceFramework
from agent_runtime.api import ApiError, audit, authorize, pseudonym, read_json_object, string_field
from agent_runtime.operations import InputError, Operation
from agent_runtime.operations.chat import ModelError
from agent_runtime.resilience import CircuitOpenError, OverloadedError
from agent_runtime.routing import Reply, Route, Schema
from agent_runtime.state import BULKHEADS, CONFIG, METRICS, REGISTRY, REQUEST_ID, STORE, TRACE_ID, TRACED, TRACER


def validated_input(operation: Operation, payload: Any) -> Any:
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
    body = await read_json_object(request)
    argument = validated_input(operation, body.get("input", {}))
    compliance = request.app[CONFIG].compliance
    if operation.personal_data and ComplianceFramework.GDPR in compliance.frameworks:
        subject = string_field(body, "subject", 128)
        purpose = string_field(body, "purpose", 64)
        if not await request.app[STORE].has_consent(subject, purpose):
            details = {"reason": "no consent", "subject": pseudonym(subject), "purpose": purpose}
            await audit(request, type="authz", action=f"operation:{name}", result="denied", details=details)
            raise ApiError(403, "consent_required", f"no consent of this subject for purpose {purpose!r} (GDPR)")
    if ComplianceFramework.SOX in compliance.frameworks and name in compliance.financial_operations:
        approval_id = await request.app[STORE].create_approval(
            name, principal.subject, json.dumps(body.get("input", {}))
        )
        await audit(
            request, type="operation", action=name, result="pending_approval", details={"approval_id": approval_id}
        )
        return web.json_response(
            {"operation": name, "status": "pending_approval", "approval_id": approval_id}, status=202
        )
    result = await execute(request, operation, argument, {})
    return operation_response(request, name, result, principal.subject)


def operation_response(request: web.Request, name: str, result: dict[str, Any], actor: str) -> web.Response:
    body = {
        "operation": name,
        "result": result,
        "request_id": request[REQUEST_ID],
        "trace_id": request[TRACE_ID],
        "actor": actor,
    }
    return web.json_response(body)


async def execute(
    request: web.Request, operation: Operation, argument: Any, audit_details: dict[str, Any]
) -> dict[str, Any]:
    """Runs an operation in its span, bulkhead and timeout; every outcome is counted and audited."""
    name = operation.name
    started = time.perf_counter()
    metrics = request.app[METRICS]
    timeout = request.app[CONFIG].resilience.operation_timeout_seconds

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
    await audit(request, type="operation", action=name, result="success", details=details)
    return result


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
