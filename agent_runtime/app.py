"""The agent runtime's HTTP service: ``create_app(settings)`` builds the aiohttp Application.

This module only wires: it builds the components, hangs them off the app under the typed keys of
``agent_runtime.state``, adds the middlewares and registers the declared routes. The handlers live
in their rooms (health, openapi, auth_routes, compliance, report_routes, operation_routes), each
exporting its ``ROUTES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from agent_contract.config import AuthMode, ComplianceFramework, RuntimeConfig
from agent_contract.keyfiles import KeyRing
from agent_runtime import agent_card, auth_routes, compliance, health, openapi, operation_routes, report_routes
from agent_runtime.api import MAX_BODY_BYTES
from agent_runtime.audit import AuditLog
from agent_runtime.crypto import FieldEncryptor
from agent_runtime.limits import LIMITER, Limiter, MemoryLimitCounters, PostgresLimitCounters, upkeep
from agent_runtime.metrics import RuntimeMetrics
from agent_runtime.middlewares import MIDDLEWARES, failure_summaries, hide_server_version
from agent_runtime.operations import BUILTINS, Operation, Registry, discover_plugins
from agent_runtime.operations.chat import chat_operation
from agent_runtime.resilience import Bulkhead, CircuitBreaker, Deadlines
from agent_runtime.routing import Route, public_paths, register_routes
from agent_runtime.security.rbac import Authorizer
from agent_runtime.security.revocation import RevocationList
from agent_runtime.security.throttle import FailureDigest, LoginThrottle
from agent_runtime.security.tokens import LocalTokens, OidcTokens, VerifiedCache
from agent_runtime.security.users import UserStore
from agent_runtime.settings import Settings
from agent_runtime.sharedstate import PostgresEngine, PostgresRevocations, PostgresThrottleCounters
from agent_runtime.state import (
    AUDIT,
    AUTH_FAILURES,
    AUTHORIZER,
    BREAKERS,
    BULKHEADS,
    CONFIG,
    DEADLINES,
    ENCRYPTOR,
    HTTP,
    ID_SOURCE,
    KEYS,
    LIMIT_REFUSALS,
    LOCAL_TOKENS,
    METRICS,
    OIDC_TOKENS,
    PUBLIC_PATHS,
    READINESS,
    REGISTRY,
    REVOKED,
    ROUTE_TABLE,
    SETTINGS,
    STORE,
    THROTTLE,
    TRACER,
    TRACER_PROVIDER,
    USERS,
    VERIFIED,
    WORKERS,
)
from agent_runtime.store import Store
from agent_runtime.tracing import make_tracer_provider
from agent_runtime.workers import WorkerPool

# Every route the runtime serves, in the order the OpenAPI document lists them.
ALL_ROUTES: tuple[Route, ...] = (
    *health.ROUTES,
    *openapi.ROUTES,
    *agent_card.ROUTES,
    *auth_routes.ROUTES,
    *compliance.ROUTES,
    *report_routes.ROUTES,
    *operation_routes.ROUTES,
)


def _bulkhead(metrics: RuntimeMetrics, name: str, config: RuntimeConfig) -> Bulkhead:
    limits = config.resilience
    metrics.bulkhead_capacity.labels(name).set(limits.max_concurrent_per_operation)
    bulkhead = Bulkhead(limits.max_concurrent_per_operation, limits.max_queued_per_operation)
    # Read when scraped: setting the gauges on each call took 3 locked updates a request (about
    # 4 % of the loop's time on ping, profiled).
    metrics.bulkhead_in_use.labels(name).set_function(lambda: bulkhead.in_use)
    metrics.bulkhead_queued.labels(name).set_function(lambda: bulkhead.waiting)
    return bulkhead


def breaker(app: web.Application, dependency: str) -> CircuitBreaker:
    """The circuit breaker of a dependency (a model endpoint, a tool), made on first use."""
    breakers = app[BREAKERS]
    if dependency not in breakers:
        metrics = app[METRICS]
        metrics.circuit_state.labels(dependency).set(0)
        breakers[dependency] = CircuitBreaker(
            dependency,
            app[CONFIG].resilience.circuit_breaker,
            on_change=lambda name, state: metrics.circuit_state.labels(name).set(int(state)),
        )
    return breakers[dependency]


async def _fetch_jwks(app: web.Application, url: str) -> dict[str, Any]:
    async with app[HTTP].get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
        response.raise_for_status()
        document: dict[str, Any] = await response.json(content_type=None)
        return document


def _catalogue(app: web.Application, config: RuntimeConfig, operations: dict[str, Operation] | None) -> Registry:
    """The enabled operations, out of the given catalogue plus those bound to this app."""
    catalogue = dict(operations if operations is not None else {**BUILTINS, **discover_plugins()})
    if config.model is not None and "chat" in config.operations:
        catalogue["chat"] = chat_operation(
            config.model,
            config.egress.allowed_hosts,
            config.resilience.retry,
            lambda: app[HTTP],
            lambda: breaker(app, "model"),
            metrics=app[METRICS].genai,
            tracer=lambda: app[TRACER],
            limiter=lambda: app.get(LIMITER),
        )
    if "generate_report" in config.operations and "generate_report" not in catalogue:
        catalogue["generate_report"] = report_routes.report_operation(app)
    return Registry(config.operations, catalogue)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """What lives as long as the server: HTTP client, databases, audit writer, retention task."""
    app[HTTP] = aiohttp.ClientSession()
    await app[STORE].open()  # with PostgreSQL: connects and migrates (the revocations share it)
    await app[REVOKED].open()
    await app[AUDIT].start()
    retention = asyncio.create_task(compliance.retention_loop(app), name="retention")
    yield
    retention.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await retention
    await app[AUDIT].close()  # the last records and a final checkpoint reach the disk
    await app[REVOKED].close()
    await app[STORE].close()
    await app[HTTP].close()
    app[TRACER_PROVIDER].shutdown()  # flushes the spans still batched


def _state(app: web.Application, settings: Settings, encryptor: FieldEncryptor | None) -> None:
    """The store, revocations, login throttle and limit counters: this replica's own (SQLite files,
    counters in memory), or with DATABASE_URL one PostgreSQL shared by every replica."""
    if settings.database_url is None:
        app[STORE] = Store(settings.data_dir / "store.sqlite3", encryptor=encryptor)
        app[REVOKED] = RevocationList(settings.data_dir / "revocations.sqlite3")
        app[THROTTLE] = LoginThrottle(clock=time.monotonic)  # one process: immune to clock steps
        app[LIMITER] = Limiter(settings.config, MemoryLimitCounters(), app[METRICS])
        return
    engine = PostgresEngine(settings.database_url, breaker(app, "database"))
    app[STORE] = Store(engine, encryptor=encryptor)
    app[REVOKED] = PostgresRevocations(engine)
    app[THROTTLE] = LoginThrottle(PostgresThrottleCounters(engine))
    app[LIMITER] = Limiter(settings.config, PostgresLimitCounters(engine), app[METRICS])


def create_app(
    settings: Settings, operations: dict[str, Operation] | None = None, tracer_provider: TracerProvider | None = None
) -> web.Application:
    """``operations``: the catalogue to enable from (default: the built-ins); ``tracer_provider``:
    where spans go (default: made from the config, exporting over OTLP when configured)."""
    config = settings.config
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=MAX_BODY_BYTES)
    metrics = RuntimeMetrics()
    app[METRICS] = metrics
    provider = tracer_provider or make_tracer_provider(config.observability, config.namespace)
    app[TRACER_PROVIDER] = provider
    app[TRACER] = provider.get_tracer("agent_runtime")
    app[ID_SOURCE] = random.Random(secrets.randbits(128))  # noqa: S311 -- ids must be unique, not secret
    keys = KeyRing.load(config.auth.keys_dir)
    app[SETTINGS] = settings
    app[CONFIG] = config
    app[KEYS] = keys
    app[LOCAL_TOKENS] = LocalTokens(config.auth, keys)
    app[VERIFIED] = VerifiedCache()
    app[USERS] = UserStore.load(config.auth.users_file)
    app[AUTH_FAILURES] = FailureDigest()
    app[LIMIT_REFUSALS] = FailureDigest(overflow="(other callers)")
    app[BREAKERS] = {}
    app[AUDIT] = AuditLog(
        settings.audit_file,
        keys,
        to_stdout=config.audit.stdout,
        checkpoint_every=config.audit.checkpoint_every,
        checkpoint_seconds=config.audit.checkpoint_seconds,
        on_write=metrics.observe_audit_batch,
    )
    app[AUTHORIZER] = Authorizer(config)
    app[REGISTRY] = _catalogue(app, config, operations)
    app[agent_card.CARD] = agent_card.build_card(config, app[REGISTRY])  # public: built from an allow-list
    app[BULKHEADS] = {name: _bulkhead(metrics, name, config) for name in app[REGISTRY].operations}
    app[DEADLINES] = Deadlines(config.resilience.operation_timeout_seconds)
    app[WORKERS] = WorkerPool()
    app[ENCRYPTOR] = FieldEncryptor(keys)
    # HIPAA: stored results may hold PHI, so they are encrypted at rest.
    hipaa = ComplianceFramework.HIPAA in config.compliance.frameworks
    _state(app, settings, encryptor=app[ENCRYPTOR] if hipaa else None)
    app[READINESS] = health.readiness_of(app)
    if config.auth.mode is AuthMode.OIDC:
        app[OIDC_TOKENS] = OidcTokens(config.auth, lambda url: _fetch_jwks(app, url))
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(failure_summaries)  # after _resources: it still writes to the audit log
    app.cleanup_ctx.append(operation_routes.worker_pool)
    app.cleanup_ctx.append(upkeep)  # after _resources: it reads the database
    app.on_response_prepare.append(hide_server_version)
    # The one route table: served, let through without a token when public, and documented.
    app[ROUTE_TABLE] = ALL_ROUTES
    app[PUBLIC_PATHS] = public_paths(ALL_ROUTES)
    register_routes(app.router, ALL_ROUTES)
    return app
