"""Revoked token ids (logout, refresh rotation) and revoked sessions (logout, a replayed refresh
token), kept until the token, or the last token of the session, would have expired anyway.

Stored in the embedded SQLite store under the data directory and held in memory for the per-request
check: right for one replica. With several, each would have its own list, and a token revoked on
one would still be accepted by the others until it expires; with DATABASE_URL set the list lives
in PostgreSQL instead (agent_runtime.sharedstate.PostgresRevocations, the same interface).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent_runtime.store import open_sqlite

# Sessions share the table with token ids; the prefix keeps the two name spaces apart.
_SESSION = "session:"


class Revocations(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def revoked(self, token_id: str | None, session_id: str) -> bool: ...
    async def revoke(self, token_id: str, expires_at: float) -> None: ...
    async def revoke_session(self, session_id: str, until: float) -> None: ...
    async def use_once(self, token_id: str, expires_at: float) -> bool: ...
    async def purge_expired(self) -> int: ...


class RevocationList:
    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._revoked: dict[str, float] = {}
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time

    async def open(self) -> None:
        self._db = open_sqlite(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS revoked (jti TEXT PRIMARY KEY, expires_at REAL NOT NULL)")
        now = self.clock()
        self._db.execute("DELETE FROM revoked WHERE expires_at < ?", (now,))
        self._revoked = dict(self._db.execute("SELECT jti, expires_at FROM revoked").fetchall())

    async def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _is_revoked(self, token_id: str) -> bool:
        expires_at = self._revoked.get(token_id)
        return expires_at is not None and expires_at >= self.clock()

    async def revoked(self, token_id: str | None, session_id: str) -> bool:
        """Whether the token (when ``token_id`` is given) or its session is revoked."""
        return bool(token_id and self._is_revoked(token_id)) or bool(
            session_id and self._is_revoked(_SESSION + session_id)
        )

    async def revoke_session(self, session_id: str, until: float) -> None:
        """Every token of the session is refused from now on (``until``: when its last one expires)."""
        await self.revoke(_SESSION + session_id, until)

    async def use_once(self, token_id: str, expires_at: float) -> bool:
        """Marks a single-use token as used; False when it already was. The check and the mark
        happen with no await between them, so two concurrent uses cannot both get True."""
        if self._is_revoked(token_id):
            return False
        await self.revoke(token_id, expires_at)
        return True

    async def revoke(self, token_id: str, expires_at: float) -> None:
        self._revoked[token_id] = expires_at
        if len(self._revoked) % 1000 == 0:
            now = self.clock()
            self._revoked = {jti: exp for jti, exp in self._revoked.items() if exp >= now}
        await asyncio.to_thread(self._store, token_id, expires_at)

    async def purge_expired(self) -> int:
        now = self.clock()
        expired = [jti for jti, expires_at in self._revoked.items() if expires_at < now]
        for jti in expired:
            del self._revoked[jti]
        await asyncio.to_thread(self._delete_expired, now)
        return len(expired)

    def _delete_expired(self, now: float) -> None:
        with self._lock:
            if self._db is not None:
                self._db.execute("DELETE FROM revoked WHERE expires_at < ?", (now,))

    def _store(self, token_id: str, expires_at: float) -> None:
        with self._lock:
            if self._db is not None:
                self._db.execute("INSERT OR REPLACE INTO revoked VALUES (?, ?)", (token_id, expires_at))
