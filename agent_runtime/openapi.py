"""The runtime's OpenAPI 3.1 document, built from the declared routes and the enabled operations'
input models, so it describes exactly what this agent serves."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from agent_contract.config import RuntimeConfig
from agent_runtime.operations import Operation, Registry
from agent_runtime.routing import (
    ERROR,
    EVENT_STREAM_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    Body,
    JsonSchema,
    Reply,
    Route,
    Schema,
)
from agent_runtime.state import CONFIG, REGISTRY, ROUTE_TABLE

REF = "#/components/schemas/{model}"

# The description of each error status a route may declare in ``Route.errors``.
ERROR_DESCRIPTIONS = {
    400: "Malformed body",
    401: "Missing, invalid, expired or revoked token",
    403: "Not permitted for the caller's roles or clearance, or above the agent's level",
    404: "Not enabled on this agent",
    406: "Accept names only text/event-stream, and the operation does not stream",
    413: "Body too large",
    422: "Input does not match the operation's schema",
    429: "Too many failed logins, or over a rate limit or token budget (spec.limits): see Retry-After",
    500: "Operation failed",
    502: "A dependency (the model endpoint) failed",
    503: "At capacity, or a dependency is unavailable",
    504: "Operation timed out",
}


class _Document:
    """The document under construction: named schemas are collected as routes reference them."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {ERROR.name: ERROR.body}
        self.paths: dict[str, dict[str, Any]] = {}

    def schema(self, schema: Schema | JsonSchema) -> JsonSchema:
        """A reference to a named schema (publishing it), or an inline schema as it is."""
        if isinstance(schema, Schema):
            self.schemas.setdefault(schema.name, schema.body)
            return {"$ref": REF.format(model=schema.name)}
        return schema

    def json_content(self, schema: Schema | JsonSchema) -> dict[str, Any]:
        return {"content": {JSON_MEDIA_TYPE: {"schema": self.schema(schema)}}}

    def reply(self, reply: Reply) -> dict[str, Any]:
        answer: dict[str, Any] = {"description": reply.description}
        if reply.schema is not None:
            answer["content"] = {reply.media_type or JSON_MEDIA_TYPE: {"schema": self.schema(reply.schema)}}
        elif reply.media_type is not None:
            answer["content"] = {reply.media_type: {}}
        return answer

    def responses(self, route: Route) -> dict[str, Any]:
        documented = {str(reply.status): self.reply(reply) for reply in route.replies}
        for status in route.errors:
            documented[str(status)] = {"description": ERROR_DESCRIPTIONS[status], **self.json_content(ERROR)}
        return documented

    def body(self, body: Body) -> dict[str, Any]:
        return {"required": body.required, **self.json_content(body.schema)}

    def add(self, path: str, method: str, operation: dict[str, Any]) -> None:
        self.paths.setdefault(path, {})[method.lower()] = operation

    def add_route(self, route: Route) -> None:
        operation: dict[str, Any] = {"summary": route.summary}
        if route.public:
            operation["security"] = []  # overrides the document-wide bearer requirement
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in route.path_parameters
        ] + [{"name": query.name, "in": "query", "schema": query.schema} for query in route.query]
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            operation["requestBody"] = self.body(route.body)
        operation["responses"] = self.responses(route)
        self.add(route.path, route.method, operation)

    def add_operation(self, route: Route, name: str, operation: Operation) -> None:
        """The per-operation route, for one enabled operation: its name in the path, its own input."""
        input_schema = operation_input_schema(operation, REF)
        self.schemas.update(input_schema.pop("$defs", {}))  # published once, under components
        properties: dict[str, Any] = {"input": input_schema}
        if operation.personal_data:  # with GDPR: whose data, and for which consented purpose
            properties |= {
                "subject": {"type": "string", "maxLength": 128},
                "purpose": {"type": "string", "maxLength": 64},
            }
        request = Schema(f"{name}_request", {"type": "object", "properties": properties, "additionalProperties": False})
        responses = self.responses(route)
        if operation.stream is not None and "200" in responses:
            answer = responses["200"]
            answer["description"] += (
                "; with `Accept: text/event-stream`, Server-Sent Events as it is made: `data` events"
                ' ({"delta": text}), then a `done` event (finish reason and token usage), or an `error`'
                " event (code, message) if it fails after the first"
            )
            answer.setdefault("content", {})[EVENT_STREAM_MEDIA_TYPE] = {"schema": {"type": "string"}}
        documented = {
            "summary": operation.description,
            "description": f"Needs permission {operation.permission.value}; data level {operation.level.value}.",
            "requestBody": self.body(Body(request)),
            "responses": responses,
        }
        self.add(route.path.replace("{name}", name), route.method, documented)


def operation_input_schema(operation: Operation, ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
    """The JSON schema of an operation's ``input`` (any object when it declares no model). With the
    default template it is self-contained (its nested models under ``$defs``), as the agent card
    publishes it; this document lifts them into its components instead."""
    if operation.input_model is None:
        return {"type": "object"}
    return operation.input_model.model_json_schema(ref_template=ref_template)


def build_openapi(config: RuntimeConfig, registry: Registry, routes: Iterable[Route]) -> dict[str, Any]:
    document = _Document()
    for route in routes:
        if route.per_operation:
            for name, operation in registry.operations.items():
                document.add_operation(route, name, operation)
        else:
            document.add_route(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": f"Agent runtime: {config.agent_name}", "version": "0.1.0"},
        "components": {
            "schemas": document.schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "security": [{"bearer": []}],
        "paths": document.paths,
    }


async def openapi_view(request: web.Request) -> web.Response:
    app = request.app
    routes = app[ROUTE_TABLE]
    return web.json_response(build_openapi(app[CONFIG], app[REGISTRY], routes))


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/openapi.json",
        openapi_view,
        "This document",
        public=True,
        replies=(Reply(200, "OpenAPI"),),
    ),
)
