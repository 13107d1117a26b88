"""The shared state of an agent's replicas on PostgreSQL (asyncpg), used when DATABASE_URL is set.

What must agree across replicas lives here: stored results and reports, the consent ledger,
approvals and their decisions, revoked tokens and sessions, the login throttle's counters, and the
counts of the rate limits and token budgets.
Without DATABASE_URL each replica keeps these in its own SQLite files (right for one replica).

- **Migrations** are numbered and applied at start-up inside one transaction per version, under a
  PostgreSQL advisory lock, so replicas starting together apply each version exactly once.
- **The pool** is bounded (``max_size``), each connection attempt and each statement has a timeout,
  and every call goes through the ``database`` circuit breaker, so an unreachable database fails
  fast instead of piling up requests.
- **Fail closed**: any failure reaching the database raises :class:`StateUnavailableError`, which the
  API answers with 503. Nothing that needs a revocation, consent, approval or throttle check is
  answered as if the check had passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import asyncpg

from agent_runtime.resilience import CircuitBreaker, CircuitOpenError
from agent_runtime.security.throttle import Counter

# The advisory lock the replicas take while migrating (an arbitrary constant of this program).
MIGRATION_LOCK = 0x6561_6F72_756E_0001
MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema: the same tables as the SQLite store, plus revocations and throttle counters.
    """
    CREATE TABLE results (id text PRIMARY KEY, kind text NOT NULL, owner text NOT NULL,
        created_at double precision NOT NULL, content_type text NOT NULL, body bytea NOT NULL, subject text);
    CREATE INDEX results_subject ON results (subject);
    CREATE INDEX results_created_at ON results (created_at);
    CREATE TABLE approvals (id text PRIMARY KEY, operation text NOT NULL, requester text NOT NULL,
        input text NOT NULL, created_at double precision NOT NULL, status text NOT NULL, decided_by text,
        decided_at double precision, subject text, purpose text);
    CREATE INDEX approvals_pending ON approvals (created_at) WHERE status = 'pending';
    CREATE INDEX approvals_subject ON approvals (subject);
    -- Append-only: the history of grants and withdrawals is the proof of consent.
    -- rowid: named as SQLite's implicit column, so one ORDER BY serves both engines.
    CREATE TABLE consents (rowid bigserial PRIMARY KEY, subject text NOT NULL, purpose text NOT NULL,
        granted integer NOT NULL, at double precision NOT NULL, actor text NOT NULL, evidence text NOT NULL);
    CREATE INDEX consents_subject ON consents (subject, purpose, rowid);
    CREATE TABLE revoked (jti text PRIMARY KEY, expires_at double precision NOT NULL);
    CREATE INDEX revoked_expires_at ON revoked (expires_at);
    CREATE TABLE throttle (key text PRIMARY KEY, failures integer NOT NULL, attempts double precision[] NOT NULL,
        last double precision NOT NULL);
    """,
    # 2: rate limits and token budgets (spec.limits): a key's two fixed windows (agent_runtime/limits.py).
    """
    CREATE TABLE limit_windows (key text PRIMARY KEY, window_index bigint NOT NULL, previous bigint NOT NULL,
        current bigint NOT NULL, expires_at double precision NOT NULL);
    CREATE INDEX limit_windows_expires_at ON limit_windows (expires_at);
    """,
)
_PLACEHOLDER = re.compile(r"\?")
# What an unreachable or restarting database raises (asyncpg's internal errors included: a
# connection cut mid-operation can leave its protocol in a state it reports that way).
_OUTAGE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.OperatorInterventionError,  # shutting down, crashed, starting up
)


class StateInputError(ValueError):
    """A value the database cannot hold (a NUL byte, a lone surrogate): the client's fault, 400."""


class StateUnavailableError(Exception):
    """The shared state could not be reached; the request that needed it is refused (503)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the shared state is unavailable: {reason}")
        self.reason = reason


def _numbered(sql: str) -> str:
    """The store's ``?`` placeholders as PostgreSQL's ``$1, $2, ...``."""
    count = iter(range(1, 1000))
    return _PLACEHOLDER.sub(lambda _: f"${next(count)}", sql)


async def _migrate(connection: asyncpg.Connection) -> int:
    """Applies the missing migrations under the advisory lock; returns the schema version."""
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {row[0] for row in await connection.fetch("SELECT version FROM schema_migrations")}
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version in applied:
                continue
            async with connection.transaction():
                await connection.execute(sql)
                await connection.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        return len(MIGRATIONS)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


class PostgresEngine:
    """The store's SQL on a bounded asyncpg pool, every call behind the ``database`` breaker."""

    dialect = "postgres"

    def __init__(
        self,
        url: str,
        breaker: CircuitBreaker,
        min_size: int = 1,
        max_size: int = 10,
        timeout_seconds: float = 5.0,
    ) -> None:
        self.url = url
        self.breaker = breaker
        self.min_size, self.max_size, self.timeout = min_size, max_size, timeout_seconds
        self._pool: asyncpg.Pool | None = None
        self.schema_version = 0

    async def open(self) -> None:
        """Connects and migrates; raises StateUnavailableError when the database cannot be reached
        (the process then exits and the kubelet restarts it, as for any missing dependency)."""
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.timeout,  # to connect
                command_timeout=self.timeout,  # per statement
                max_inactive_connection_lifetime=60,
            )
            async with self._pool.acquire(timeout=self.timeout) as connection:
                self.schema_version = await _migrate(connection)
        except Exception as error:
            await self.close()
            raise StateUnavailableError(type(error).__name__) from None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, with the breaker's verdict on how it went."""
        if self._pool is None:
            raise StateUnavailableError("not connected")
        try:
            self.breaker.allow()
        except CircuitOpenError:
            raise StateUnavailableError("circuit open after repeated failures") from None
        # Every exit records an outcome: a half-open breaker's trial must never be left unreported.
        try:
            async with self._pool.acquire(timeout=self.timeout) as connection:
                yield connection
        except asyncpg.DataError as error:
            self.breaker.record(True)  # refused by the client library: the database is fine
            raise StateInputError(f"a value the database cannot store: {type(error).__name__}") from None
        except _OUTAGE as error:
            self.breaker.record(False)
            raise StateUnavailableError(_describe(error)) from None
        except asyncpg.PostgresError as error:
            # The database answered: an error in our SQL or a constraint, not an outage.
            self.breaker.record(True)
            if isinstance(error, asyncpg.CharacterNotInRepertoireError | asyncpg.UntranslatableCharacterError):
                raise StateInputError(f"a value the database cannot store: {type(error).__name__}") from None
            raise StateUnavailableError(_describe(error)) from None
        except asyncio.CancelledError:
            self.breaker.record(False)  # a call that did not finish in time
            raise
        except BaseException:
            self.breaker.record(True)  # the caller's own exception, not the database's
            raise
        self.breaker.record(True)

    async def fetch(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[Any, ...]]:
        async with self.connection() as connection:
            rows = await connection.fetch(_numbered(sql), *parameters)
        return [tuple(row) for row in rows]

    async def ping(self) -> dict[str, Any]:
        """For /readyz: one round trip, and the schema this replica runs."""
        started = time.monotonic()
        await self.fetch("SELECT 1", ())
        return {"ok": True, "backend": "postgres", "schema": self.schema_version,
                "seconds": round(time.monotonic() - started, 4)}  # fmt: skip


def _describe(error: BaseException) -> str:
    # The error's type only: its text can carry values, hosts or user names.
    return type(error).__name__


class PostgresRevocations:
    """Revoked token ids and sessions shared by every replica: a logout on one is refused by all
    at once, since each check reads the table (one indexed lookup per authenticated request)."""

    SESSION = "session:"

    def __init__(self, engine: PostgresEngine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    async def open(self) -> None:
        return None  # the engine is opened (and migrated) by the store

    async def close(self) -> None:
        return None

    async def revoked(self, token_id: str | None, session_id: str) -> bool:
        ids = [i for i in (token_id, self.SESSION + session_id if session_id else None) if i]
        if not ids:
            return False
        rows = await self.engine.fetch(
            "SELECT 1 FROM revoked WHERE jti = ANY(?::text[]) AND expires_at >= ? LIMIT 1", (ids, self.clock())
        )
        return bool(rows)

    async def revoke(self, token_id: str, expires_at: float) -> None:
        await self.engine.fetch(
            "INSERT INTO revoked (jti, expires_at) VALUES (?, ?)"
            " ON CONFLICT (jti) DO UPDATE SET expires_at = greatest(revoked.expires_at, excluded.expires_at)",
            (token_id, expires_at),
        )

    async def revoke_session(self, session_id: str, until: float) -> None:
        await self.revoke(self.SESSION + session_id, until)

    async def use_once(self, token_id: str, expires_at: float) -> bool:
        """One INSERT decides, across every replica: only the first use gets True."""
        now = self.clock()
        rows = await self.engine.fetch(
            "INSERT INTO revoked (jti, expires_at) VALUES (?, ?) ON CONFLICT (jti) DO UPDATE"
            " SET expires_at = excluded.expires_at WHERE revoked.expires_at < ? RETURNING jti",
            (token_id, expires_at, now),
        )
        return bool(rows)

    async def purge_expired(self) -> int:
        rows = await self.engine.fetch("DELETE FROM revoked WHERE expires_at < ? RETURNING jti", (self.clock(),))
        return len(rows)


class PostgresThrottleCounters:
    """The login throttle's counters in one table, read and written in one transaction with the
    rows locked, so concurrent attempts on different replicas are counted as one stream."""

    def __init__(self, engine: PostgresEngine) -> None:
        self.engine = engine

    @contextlib.asynccontextmanager
    async def locked(self, keys: Iterable[str]) -> AsyncIterator[dict[str, Counter]]:
        wanted = sorted(set(keys))  # one lock order everywhere: no deadlock between replicas
        async with self.engine.connection() as connection, connection.transaction():
            await connection.executemany(
                "INSERT INTO throttle (key, failures, attempts, last) VALUES ($1, 0, '{}', 0) ON CONFLICT DO NOTHING",
                [(key,) for key in wanted],
            )
            rows = await connection.fetch(
                "SELECT key, failures, attempts, last FROM throttle WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE",
                wanted,
            )
            counters = {row["key"]: Counter(row["failures"], row["last"], list(row["attempts"])) for row in rows}
            yield counters
            # An upsert, not an UPDATE: a purge between the insert and the lock cannot lose a count.
            await connection.executemany(
                "INSERT INTO throttle (key, failures, attempts, last) VALUES ($1, $2, $3, $4) ON CONFLICT (key)"
                " DO UPDATE SET failures = excluded.failures, attempts = excluded.attempts, last = excluded.last",
                [(key, c.failures, c.attempts, c.last) for key, c in counters.items()],
            )

    async def peek(self, keys: Iterable[str]) -> dict[str, Counter]:
        """The counters without a lock: enough to refuse an attempt that must wait anyway, so a
        flood of throttled logins takes no row lock and no transaction."""
        rows = await self.engine.fetch(
            "SELECT key, failures, attempts, last FROM throttle WHERE key = ANY(?::text[])", (sorted(set(keys)),)
        )
        return {key: Counter(failures, last, list(attempts)) for key, failures, attempts, last in rows}

    async def forget_older_than(self, horizon: float) -> int:
        """In batches, each under the statement timeout however large the table has grown. Rows
        left in flight by a replica that died are old too: their attempts ended with it."""
        removed = 0
        while True:
            rows = await self.engine.fetch(
                "DELETE FROM throttle WHERE key IN (SELECT key FROM throttle WHERE last < ? LIMIT 1000"
                " FOR UPDATE SKIP LOCKED) RETURNING 1",
                (horizon,),
            )
            removed += len(rows)
            if len(rows) < 1000:
                return removed
