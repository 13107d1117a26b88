"""Liveness, readiness and metrics: the routes probes and scrapers call without a token."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from agent_runtime.readiness import Readiness
from agent_runtime.resilience import CircuitState
from agent_runtime.routing import Reply, Route
from agent_runtime.state import AUDIT, BREAKERS, BULKHEADS, CONFIG, KEYS, METRICS, READINESS, REGISTRY, STORE


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    report = await request.app[READINESS].report()
    ready = all(check["ok"] for check in report.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": report}, status=200 if ready else 503
    )


async def metrics_view(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _ok(detail: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, **detail}


async def _fail(detail: dict[str, Any]) -> dict[str, Any]:
    return {"ok": False, **detail}


def _saturated(app: web.Application) -> list[str]:
    return [name for name, bulkhead in app[BULKHEADS].items() if bulkhead.in_use >= bulkhead.limit]


async def _dependencies(app: web.Application) -> dict[str, Any]:
    """Open circuits make the pod unready, so traffic goes to replicas whose dependencies answer."""
    states = {name: CircuitState(b.state).name.lower().replace("_", "-") for name, b in app[BREAKERS].items()}
    return {"ok": all(state != "open" for state in states.values()), "circuits": states}


def readiness_of(app: web.Application) -> Readiness:
    """The checks /readyz runs against this app's components."""
    return Readiness(
        {
            "config": lambda: _ok({"agent": app[CONFIG].agent_name}),
            "keys": lambda: _ok({"signing": app[KEYS].active_signing}) if app[KEYS].signing else _fail({}),
            "audit": lambda: _ok({}) if app[AUDIT].healthy else _fail({"reason": "the last audit write failed"}),
            "operations": lambda: _ok({"unavailable": app[REGISTRY].missing, "saturated": _saturated(app)}),
            "dependencies": lambda: _dependencies(app),
            # The store's engine: with PostgreSQL a round trip, so a replica that lost it is unready.
            "state": lambda: app[STORE].engine.ping(),
        }
    )


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/healthz",
        healthz,
        "Liveness: the process and its event loop",
        public=True,
        replies=(Reply(200, "Alive"),),
    ),
    Route(
        "GET",
        "/readyz",
        readyz,
        "Readiness: config, keys, audit, operations, dependencies",
        public=True,
        replies=(Reply(200, "Ready"), Reply(503, "Not ready")),
    ),
    Route(
        "GET",
        "/metrics",
        metrics_view,
        "Prometheus metrics",
        public=True,
        replies=(Reply(200, "Metrics", media_type="text/plain"),),
    ),
)
