"""The route table is declared once: every route the router serves is in /openapi.json, every
documented path is served, and exactly the routes documented as public answer without a token.

The checks walk ``app.router.routes()`` (what aiohttp really serves, however it got there) and
probe each route over HTTP without a token, so a route added to the router behind the
declaration's back, or a path let through by the auth middleware without being declared public,
makes them fail; the last tests show they do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent_contract.config import RuntimeConfig
from agent_runtime.app import ALL_ROUTES, create_app
from agent_runtime.openapi import build_openapi
from agent_runtime.operations import BUILTINS, Registry
from agent_runtime.routing import QueryParameter, Reply, Route, public_paths, register_routes
from agent_runtime.settings import Settings
from agent_runtime.state import PUBLIC_PATHS
from tests.runtime.conftest import MATRIX_OPERATIONS, make_layout

Client = TestClient[web.Request, web.Application]
# What a path parameter is filled with when probing: an enabled operation's name, and a
# harmless id or subject for the other routes.
PROBE_SEGMENT = "ping"
TOKEN_REQUIRED = 'Bearer realm="agent"'  # the WWW-Authenticate of "a bearer token is required"


def _template(path: str) -> re.Pattern[str]:
    """A route template (``/v1/reports/{id}``) as a pattern matching the paths it serves."""
    parts = re.split(r"(\{[^}]+\})", path)
    return re.compile("".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts))


def _served(app: web.Application) -> set[tuple[str, str]]:
    return {(route.method, route.resource.canonical) for route in app.router.routes() if route.resource is not None}


def _documented(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def _documentation_of(
    method: str, template: str, documented: dict[tuple[str, str], dict[str, Any]]
) -> list[dict[str, Any]]:
    """The documented operations a served route answers: its own path, or (for ``{name}``) each
    enabled operation's. HEAD is served along with GET and documented by it."""
    wanted = "GET" if method == "HEAD" else method
    pattern = _template(template)
    return [operation for (m, path), operation in documented.items() if m == wanted and pattern.fullmatch(path)]


def undocumented_routes(app: web.Application, document: dict[str, Any]) -> list[str]:
    documented = _documented(document)
    return sorted(f"{m} {t}" for m, t in _served(app) if not _documentation_of(m, t, documented))


def unserved_paths(app: web.Application, document: dict[str, Any]) -> list[str]:
    served = _served(app)
    return sorted(
        f"{method} {path}"
        for method, path in _documented(document)
        if not any(m == method and _template(t).fullmatch(path) for m, t in served)
    )


async def public_mismatches(client: Client, document: dict[str, Any]) -> list[str]:
    """Routes whose answer to a request without a token disagrees with the document (public:
    ``security: []``) or with the auth middleware's public paths."""
    documented = _documented(document)
    mismatches = []
    for method, template in sorted(_served(client.app)):
        url = re.sub(r"\{[^}]+\}", PROBE_SEGMENT, template)
        response = await client.request(method, url, json=None if method in ("GET", "HEAD") else {})
        asks_for_token = response.status == 401 and response.headers.get("WWW-Authenticate") == TOKEN_REQUIRED
        served_without_token = not asks_for_token
        operations = _documentation_of(method, template, documented)
        documented_public = bool(operations) and all(operation.get("security") == [] for operation in operations)
        let_through = template in client.app[PUBLIC_PATHS]
        if not (served_without_token == documented_public == let_through):
            mismatches.append(
                f"{method} {template}: answered {response.status} without a token; "
                f"documented public: {documented_public}; in the public paths: {let_through}"
            )
    return mismatches


def _app(tmp_path: Path) -> web.Application:
    config_file = make_layout(
        tmp_path / "agent",
        operations=["ping", "analyze_data", "generate_report", "process_document", *MATRIX_OPERATIONS],
        compliance={"frameworks": ["GDPR", "SOX", "HIPAA"], "financialOperations": ["analyze_data"]},
    )
    return create_app(Settings.load(str(config_file)), {**BUILTINS, **MATRIX_OPERATIONS})


async def _document(client: Client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status == 200
    document: dict[str, Any] = await response.json()
    return document


async def test_every_served_route_is_documented_and_every_documented_path_served(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    client: Client = await aiohttp_client(_app(tmp_path))
    document = await _document(client)
    assert undocumented_routes(client.app, document) == []
    assert unserved_paths(client.app, document) == []
    assert {f"/v1/operations/{name}" for name in ("ping", "generate_report", "process_document")} <= set(
        document["paths"]
    )


async def test_exactly_the_public_routes_answer_without_a_token(aiohttp_client: Any, tmp_path: Path) -> None:
    client: Client = await aiohttp_client(_app(tmp_path))
    assert await public_mismatches(client, await _document(client)) == []
    assert client.app[PUBLIC_PATHS] == {
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/.well-known/agent-card.json",
        "/v1/auth/login",
        "/v1/auth/refresh",
    }


async def test_a_route_added_behind_the_declarations_back_is_caught(aiohttp_client: Any, tmp_path: Path) -> None:
    async def sneaky(_: web.Request) -> web.Response:
        return web.json_response({})

    app = _app(tmp_path)
    app.router.add_post("/v1/sneaky", sneaky)
    client: Client = await aiohttp_client(app)
    assert undocumented_routes(client.app, await _document(client)) == ["POST /v1/sneaky"]


async def test_a_path_let_through_without_being_declared_public_is_caught(aiohttp_client: Any, tmp_path: Path) -> None:
    app = _app(tmp_path)
    app[PUBLIC_PATHS] = app[PUBLIC_PATHS] | {"/v1/approvals"}
    client: Client = await aiohttp_client(app)
    mismatches = await public_mismatches(client, await _document(client))
    assert [mismatch.split(":")[0] for mismatch in mismatches] == ["GET /v1/approvals", "HEAD /v1/approvals"]


async def _hello(_: web.Request) -> web.Response:
    return web.json_response({"hello": True})


def test_one_declaration_registers_documents_and_decides_publicity(tmp_path: Path) -> None:
    greeting = Route(
        "GET",
        "/v1/greetings/{who}",
        _hello,
        "Greet someone",
        query=(QueryParameter("loud", {"type": "boolean"}),),
        replies=(Reply(200, "A greeting"),),
        errors=(401, 404),
    )
    open_greeting = Route("POST", "/v1/greeting", _hello, "Greet anyone", public=True)
    routes = (*ALL_ROUTES, greeting, open_greeting)

    app = web.Application()
    register_routes(app.router, routes)
    assert {("GET", "/v1/greetings/{who}"), ("HEAD", "/v1/greetings/{who}"), ("POST", "/v1/greeting")} <= _served(app)
    assert public_paths(routes) == public_paths(ALL_ROUTES) | {"/v1/greeting"}

    config = RuntimeConfig.from_yaml(make_layout(tmp_path / "agent").read_text())
    document = build_openapi(config, Registry(config.operations), routes)
    assert document["paths"]["/v1/greetings/{who}"]["get"] == {
        "summary": "Greet someone",
        "parameters": [
            {"name": "who", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "loud", "in": "query", "schema": {"type": "boolean"}},
        ],
        "responses": {
            "200": {"description": "A greeting"},
            "401": {
                "description": "Missing, invalid, expired or revoked token",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "404": {
                "description": "Not enabled on this agent",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
    assert document["paths"]["/v1/greeting"]["post"]["security"] == []
    assert undocumented_routes(app, document) == []


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"method": "GET", "path": "/v1/things/{id}", "public": True}, "public route cannot have path parameters"),
        ({"method": "FETCH", "path": "/v1/things"}, "method 'FETCH'"),
        ({"method": "GET", "path": "v1/things"}, "starts with /"),
        ({"method": "POST", "path": "/v1/things/{id}", "per_operation": True}, "needs {name}"),
    ],
)
def test_a_malformed_declaration_is_refused(arguments: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        Route(handler=_hello, summary="a thing", **arguments)
