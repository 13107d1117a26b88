"""The embedded store: SQLite under the data directory, for what operations keep (reports) and,
with GDPR, what must be purged after ``retentionDays``. Each replica has its own file; a
multi-replica agent that needs shared results needs a shared database (see the README)."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoredResult:
    id: str
    kind: str
    owner: str
    created_at: float
    content_type: str
    body: bytes


class Store:
    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS results (id TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT NOT NULL,"
            " created_at REAL NOT NULL, content_type TEXT NOT NULL, body BLOB NOT NULL)"
        )

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _run(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[object, ...]]:
        with self._lock:
            assert self._db is not None, "the store is not open"
            return list(self._db.execute(sql, parameters).fetchall())

    async def put(self, kind: str, owner: str, content_type: str, body: bytes) -> StoredResult:
        result = StoredResult(secrets.token_urlsafe(12), kind, owner, self.clock(), content_type, body)
        await asyncio.to_thread(
            self._run,
            "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?)",
            (result.id, kind, owner, result.created_at, content_type, body),
        )
        return result

    async def get(self, result_id: str) -> StoredResult | None:
        rows = await asyncio.to_thread(
            self._run, "SELECT id, kind, owner, created_at, content_type, body FROM results WHERE id = ?", (result_id,)
        )
        if not rows:
            return None
        identifier, kind, owner, created_at, content_type, body = rows[0]
        if not isinstance(created_at, float) or not isinstance(body, bytes):
            raise TypeError(f"result {result_id}: unexpected column types in the store")
        return StoredResult(str(identifier), str(kind), str(owner), created_at, str(content_type), body)

    async def purge_older_than(self, days: int) -> int:
        """Deletes results older than ``days``; returns how many went."""
        horizon = self.clock() - days * 86400
        rows = await asyncio.to_thread(self._run, "DELETE FROM results WHERE created_at < ? RETURNING id", (horizon,))
        return len(rows)
