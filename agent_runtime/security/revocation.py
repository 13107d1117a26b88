"""Revoked token ids (logout, refresh rotation), kept until the token would have expired anyway.

Stored in the embedded SQLite store under the data directory and held in memory for the per-request
check. With several replicas each has its own store, so a token revoked on one replica is still
accepted by the others until it expires (at most the access-token TTL, 15 minutes by default);
a shared store removes that window.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent_runtime.store import open_sqlite


class RevocationList:
    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._revoked: dict[str, float] = {}
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time

    def open(self) -> None:
        self._db = open_sqlite(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS revoked (jti TEXT PRIMARY KEY, expires_at REAL NOT NULL)")
        now = self.clock()
        self._db.execute("DELETE FROM revoked WHERE expires_at < ?", (now,))
        self._revoked = dict(self._db.execute("SELECT jti, expires_at FROM revoked").fetchall())

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def is_revoked(self, token_id: str) -> bool:
        expires_at = self._revoked.get(token_id)
        return expires_at is not None and expires_at >= self.clock()

    async def revoke(self, token_id: str, expires_at: float) -> None:
        self._revoked[token_id] = expires_at
        if len(self._revoked) % 1000 == 0:
            now = self.clock()
            self._revoked = {jti: exp for jti, exp in self._revoked.items() if exp >= now}
        await asyncio.to_thread(self._store, token_id, expires_at)

    def _store(self, token_id: str, expires_at: float) -> None:
        with self._lock:
            if self._db is not None:
                self._db.execute("INSERT OR REPLACE INTO revoked VALUES (?, ?)", (token_id, expires_at))
