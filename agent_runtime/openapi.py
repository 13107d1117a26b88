"""The runtime's OpenAPI 3.1 document, built from the routes and the operations' input models,
so it describes exactly what this agent serves."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from agent_contract.config import RuntimeConfig
from agent_runtime.operations import Registry

REF = "#/components/schemas/{model}"


def _json(schema: dict[str, Any] | str) -> dict[str, Any]:
    reference = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else schema
    return {"content": {"application/json": {"schema": reference}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Malformed body",
        401: "Missing, invalid, expired or revoked token",
        403: "Not permitted for the caller's roles or clearance, or above the agent's level",
        404: "Not enabled on this agent",
        413: "Body too large",
        422: "Input does not match the operation's schema",
        429: "Too many failed logins",
        500: "Operation failed",
        502: "A dependency (the model endpoint) failed",
        503: "At capacity, or a dependency is unavailable",
        504: "Operation timed out",
    }
    return {str(status): {"description": text[status], **_json("Error")} for status in statuses}


def build_openapi(config: RuntimeConfig, registry: Registry) -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "request_id": {"type": ["string", "null"]},
            },
        },
        "Login": {
            "type": "object",
            "required": ["username", "password"],
            "properties": {
                "username": {"type": "string", "minLength": 1, "maxLength": 64},
                "password": {"type": "string", "minLength": 1},
            },
        },
        "Refresh": {
            "type": "object",
            "required": ["refresh_token"],
            "properties": {"refresh_token": {"type": "string"}},
        },
        "Logout": {"type": "object", "properties": {"refresh_token": {"type": "string"}}},
        "Tokens": {
            "type": "object",
            "properties": {
                "access_token": {"type": "string"},
                "refresh_token": {"type": "string"},
                "token_type": {"type": "string"},
                "expires_in": {"type": "integer"},
            },
        },
        "OperationResult": {
            "type": "object",
            "properties": {
                "operation": {"type": "string"},
                "result": {"type": "object"},
                "request_id": {"type": "string"},
                "trace_id": {"type": "string"},
                "actor": {"type": "string"},
            },
        },
    }
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Liveness: the process and its event loop",
                "security": [],
                "responses": {"200": {"description": "Alive"}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: config, keys, audit, operations, dependencies",
                "security": [],
                "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "Metrics", "content": {"text/plain": {}}}},
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI"}}}
        },
        "/v1/auth/login": {
            "post": {
                "summary": "Log in with a user name and password",
                "security": [],
                "requestBody": {"required": True, **_json("Login")},
                "responses": {"200": {"description": "Tokens", **_json("Tokens")}, **_errors(400, 401, 404, 413, 429)},
            }
        },
        "/v1/auth/refresh": {
            "post": {
                "summary": "Trade a refresh token (once) for a new pair",
                "security": [],
                "requestBody": {"required": True, **_json("Refresh")},
                "responses": {"200": {"description": "Tokens", **_json("Tokens")}, **_errors(400, 401, 404, 413)},
            }
        },
        "/v1/auth/logout": {
            "post": {
                "summary": "Revoke the access token (and a refresh token)",
                "requestBody": {"required": False, **_json("Logout")},
                "responses": {"200": {"description": "Revoked"}, **_errors(400, 401, 413)},
            }
        },
        "/v1/audit": {
            "get": {
                "summary": "Recent audit records (admin)",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "actor", "in": "query", "schema": {"type": "string"}},
                    {"name": "type", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "Records"}, **_errors(400, 401, 403)},
            }
        },
    }
    schemas["Consent"] = {
        "type": "object",
        "required": ["subject", "purpose", "granted"],
        "properties": {
            "subject": {"type": "string"},
            "purpose": {"type": "string"},
            "granted": {"type": "boolean"},
            "evidence": {"type": "string"},
        },
    }
    subject = [{"name": "subject", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths["/v1/gdpr/consents"] = {
        "post": {
            "summary": "Record a grant or withdrawal of consent (GDPR)",
            "requestBody": {"required": True, **_json("Consent")},
            "responses": {"201": {"description": "Recorded"}, **_errors(400, 401, 403, 404, 413)},
        }
    }
    paths["/v1/gdpr/consents/{subject}"] = {
        "get": {
            "summary": "A subject's consents: current state and full history",
            "parameters": subject,
            "responses": {"200": {"description": "Consents"}, **_errors(401, 403, 404)},
        }
    }
    paths["/v1/gdpr/subjects/{subject}/export"] = {
        "get": {
            "summary": "Everything held about a subject (Art. 15, 20)",
            "parameters": subject,
            "responses": {"200": {"description": "Export"}, **_errors(401, 403, 404)},
        }
    }
    paths["/v1/gdpr/subjects/{subject}"] = {
        "delete": {
            "summary": "Erase a subject's data (Art. 17)",
            "parameters": subject,
            "responses": {"200": {"description": "Erased"}, **_errors(401, 403, 404)},
        }
    }
    paths["/v1/approvals"] = {
        "get": {
            "summary": "Pending approvals of financial operations (SOX)",
            "responses": {"200": {"description": "Pending"}, **_errors(401, 403)},
        }
    }
    paths["/v1/approvals/{id}"] = {
        "post": {
            "summary": "Approve (and run) or reject a pending financial operation; not by its requester",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {
                "required": True,
                **_json(
                    {
                        "type": "object",
                        "required": ["decision"],
                        "properties": {"decision": {"type": "string", "enum": ["approve", "reject"]}},
                    }
                ),
            },
            "responses": {
                "200": {"description": "Decided"},
                "409": {"description": "Already decided", **_json("Error")},
                **_errors(400, 401, 403, 404, 422, 500, 502, 503, 504),
            },
        }
    }
    paths["/v1/reports/{id}"] = {
        "get": {
            "summary": "Download a stored report",
            "parameters": [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["markdown", "html", "json"]}},
            ],
            "responses": {"200": {"description": "The report"}, **_errors(400, 401, 403, 404)},
        }
    }
    for name, operation in registry.operations.items():
        input_schema: dict[str, Any] = {"type": "object"}
        if operation.input_model is not None:
            input_schema = _model_schema(operation.input_model, schemas)
        request_name = f"{name}_request"
        properties: dict[str, Any] = {"input": input_schema}
        if operation.personal_data:  # with GDPR: whose data, and for which consented purpose
            properties |= {
                "subject": {"type": "string", "maxLength": 128},
                "purpose": {"type": "string", "maxLength": 64},
            }
        schemas[request_name] = {"type": "object", "properties": properties, "additionalProperties": False}
        paths[f"/v1/operations/{name}"] = {
            "post": {
                "summary": operation.description,
                "description": f"Needs permission {operation.permission.value}; data level {operation.level.value}.",
                "requestBody": {"required": True, **_json(request_name)},
                "responses": {
                    "200": {"description": "Result", **_json("OperationResult")},
                    **_errors(400, 401, 403, 413, 422, 500, 502, 503, 504),
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": f"Agent runtime: {config.agent_name}", "version": "0.1.0"},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def _model_schema(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF)
    schemas.update(schema.pop("$defs", {}))
    return schema
