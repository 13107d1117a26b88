"""How a route is declared: once, as data.

Each room exports a tuple of ``Route``s; ``create_app`` registers them on the router, the auth
middleware lets the ``public`` ones through without a token, and ``openapi.build_openapi``
documents them. Adding a route in one place therefore adds it everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JsonSchema = Mapping[str, Any]

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
JSON_MEDIA_TYPE = "application/json"
EVENT_STREAM_MEDIA_TYPE = "text/event-stream"  # Server-Sent Events: an operation's answer streamed
_PATH_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Schema:
    """A JSON schema published by name under the document's components (and referenced there)."""

    name: str
    body: JsonSchema


@dataclass(frozen=True)
class Reply:
    """One documented answer. Without a schema or media type it has no content."""

    status: int
    description: str
    schema: Schema | JsonSchema | None = None
    media_type: str | None = None  # JSON when there is a schema and none is given


@dataclass(frozen=True)
class Body:
    """The request body a route reads (always a JSON object)."""

    schema: Schema | JsonSchema
    required: bool = True


@dataclass(frozen=True)
class QueryParameter:
    name: str
    schema: JsonSchema


@dataclass(frozen=True)
class Route:
    """One HTTP route: how it is served, whether it needs a token, and how it is documented.

    ``errors`` are error statuses answered with the standard ``Error`` body and description;
    path parameters come from ``{...}`` in the path. A ``per_operation`` route is documented once
    per enabled operation, ``{name}`` filled in, with the operation's own summary and request
    schema (its ``summary`` here then only names the route for readers).
    """

    method: str
    path: str
    handler: Handler
    summary: str
    public: bool = field(default=False, kw_only=True)
    query: tuple[QueryParameter, ...] = field(default=(), kw_only=True)
    body: Body | None = field(default=None, kw_only=True)
    replies: tuple[Reply, ...] = field(default=(), kw_only=True)
    errors: tuple[int, ...] = field(default=(), kw_only=True)
    per_operation: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"{self.path}: method {self.method!r} is not one of {sorted(METHODS)}")
        if not self.path.startswith("/"):
            raise ValueError(f"{self.path}: a route path starts with /")
        # The auth middleware compares the raw request path, so a public path must be literal.
        if self.public and self.path_parameters:
            raise ValueError(f"{self.path}: a public route cannot have path parameters")
        if self.per_operation and "{name}" not in self.path:
            raise ValueError(f"{self.path}: a per-operation route needs {{name}} in its path")

    @property
    def path_parameters(self) -> list[str]:
        return _PATH_PARAMETER.findall(self.path)


def register_routes(router: web.UrlDispatcher, routes: Iterable[Route]) -> None:
    for route in routes:
        if route.method == "GET":
            router.add_get(route.path, route.handler)  # and HEAD, as aiohttp does by default
        else:
            router.add_route(route.method, route.path, route.handler)


def public_paths(routes: Iterable[Route]) -> frozenset[str]:
    """The paths the auth middleware lets through without a bearer token."""
    return frozenset(route.path for route in routes if route.public)


ERROR = Schema(
    "Error",
    {
        "type": "object",
        "required": ["code", "message", "request_id"],
        "properties": {
            "code": {"type": "string"},
            "message": {"type": "string"},
            "request_id": {"type": ["string", "null"]},
            "limit": {"type": "string", "description": "On a 429: the limit refusing, as its field under spec.limits."},
        },
    },
)
