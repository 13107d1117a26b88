"""The typed keys of everything hung off the application and each request.

All runtime state lives on the app under these keys (no module globals), so tests build as many
apps as they like; every room imports this one small module instead of importing each other.
"""

from __future__ import annotations

import random

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from agent_contract.config import RuntimeConfig
from agent_contract.keyfiles import KeyRing
from agent_runtime.audit import AuditLog
from agent_runtime.crypto import FieldEncryptor
from agent_runtime.metrics import RuntimeMetrics
from agent_runtime.operations import Registry
from agent_runtime.readiness import Readiness
from agent_runtime.resilience import Bulkhead, CircuitBreaker, Deadlines
from agent_runtime.routing import Route
from agent_runtime.security.rbac import Authorizer, Principal
from agent_runtime.security.revocation import Revocations
from agent_runtime.security.throttle import FailureDigest, LoginThrottle
from agent_runtime.security.tokens import LocalTokens, OidcTokens, VerifiedCache
from agent_runtime.security.users import UserStore
from agent_runtime.settings import Settings
from agent_runtime.store import Store
from agent_runtime.workers import WorkerPool

# --- the application's components ---
SETTINGS = web.AppKey("settings", Settings)
CONFIG = web.AppKey("config", RuntimeConfig)
KEYS = web.AppKey("keys", KeyRing)
LOCAL_TOKENS = web.AppKey("local_tokens", LocalTokens)
OIDC_TOKENS = web.AppKey("oidc_tokens", OidcTokens)
USERS = web.AppKey("users", UserStore)
THROTTLE = web.AppKey("throttle", LoginThrottle)
AUTH_FAILURES = web.AppKey("auth_failures", FailureDigest)
# Refusals by a rate limit or budget (429), summed per (operation, limit, caller) like AUTH_FAILURES.
LIMIT_REFUSALS = web.AppKey("limit_refusals", FailureDigest)
REVOKED = web.AppKey("revoked", Revocations)
AUDIT = web.AppKey("audit", AuditLog)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
REGISTRY = web.AppKey("registry", Registry)
ENCRYPTOR = web.AppKey("encryptor", FieldEncryptor)
HTTP = web.AppKey("http", aiohttp.ClientSession)
VERIFIED = web.AppKey("verified", VerifiedCache)
METRICS = web.AppKey("metrics", RuntimeMetrics)
TRACER_PROVIDER = web.AppKey("tracer_provider", TracerProvider)
TRACER = web.AppKey("tracer", trace.Tracer)
BULKHEADS = web.AppKey("bulkheads", dict[str, Bulkhead])
DEADLINES = web.AppKey("deadlines", Deadlines)  # resilience.operationTimeoutSeconds, for every operation
WORKERS = web.AppKey("workers", WorkerPool)  # where CPU-bound operations run, off the loop
BREAKERS = web.AppKey("breakers", dict[str, CircuitBreaker])
READINESS = web.AppKey("readiness", Readiness)
STORE = web.AppKey("store", Store)
# The declared routes this app serves (the OpenAPI document is built from them) and, derived from
# them, the paths that need no token.
ROUTE_TABLE = web.AppKey("route_table", tuple[Route, ...])
PUBLIC_PATHS = web.AppKey("public_paths", frozenset[str])
# Request and trace ids must be unique, not secret: a seeded PRNG saves an os.urandom system call
# per request on the hot path.
ID_SOURCE = web.AppKey("id_source", random.Random)


# --- per request ---
class RequestContext:
    """What the runtime knows of one request, filled in by the middleware as it learns it: one
    request entry, read once by each function that needs it. Five entries, each a method call to
    read or write, and ``request.app`` (two property calls each time) had cost 27 of the 226
    Python calls a request (counted by bench.request_work)."""

    __slots__ = ("app", "client_request_id", "principal", "request_id", "trace_id", "traced")

    def __init__(self, app: web.Application, request_id: str, trace_id: str, traced: bool) -> None:
        self.app = app
        self.request_id = request_id  # always the server's own
        self.trace_id = trace_id
        self.traced = traced
        self.client_request_id: str | None = None  # the caller's X-Request-ID, when sane
        self.principal: Principal | None = None  # once authenticated


CONTEXT = web.RequestKey("context", RequestContext)
