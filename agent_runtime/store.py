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
from typing import Any

from agent_runtime.crypto import FieldEncryptor


def open_sqlite(path: Path) -> sqlite3.Connection:
    """One connection for worker threads (callers serialise with a lock), in WAL mode, autocommit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    return connection


@dataclass(frozen=True)
class StoredResult:
    id: str
    kind: str
    owner: str
    created_at: float
    content_type: str
    body: bytes


class Store:
    def __init__(
        self, path: str | Path, clock: Callable[[], float] = time.time, encryptor: FieldEncryptor | None = None
    ) -> None:
        """With an ``encryptor`` (HIPAA), every stored body is sealed with AES-GCM, bound to its id."""
        self.path = Path(path)
        self.clock = clock
        self.encryptor = encryptor
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time

    def open(self) -> None:
        self._db = open_sqlite(self.path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS results (id TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT NOT NULL,"
            " created_at REAL NOT NULL, content_type TEXT NOT NULL, body BLOB NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS approvals (id TEXT PRIMARY KEY, operation TEXT NOT NULL, requester TEXT NOT NULL,"
            " input TEXT NOT NULL, created_at REAL NOT NULL, status TEXT NOT NULL, decided_by TEXT, decided_at REAL)"
        )
        # Append-only: the history of grants and withdrawals is the proof of consent.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS consents (subject TEXT NOT NULL, purpose TEXT NOT NULL, granted INTEGER NOT NULL,"
            " at REAL NOT NULL, actor TEXT NOT NULL, evidence TEXT NOT NULL)"
        )

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _run(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            assert self._db is not None, "the store is not open"
            return list(self._db.execute(sql, parameters).fetchall())

    async def put(self, kind: str, owner: str, content_type: str, body: bytes) -> StoredResult:
        result = StoredResult(secrets.token_urlsafe(12), kind, owner, self.clock(), content_type, body)
        at_rest = self.encryptor.seal(body, result.id.encode()).encode() if self.encryptor else body
        await asyncio.to_thread(
            self._run,
            "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?)",
            (result.id, kind, owner, result.created_at, content_type, at_rest),
        )
        return result

    def _result(self, row: tuple[Any, ...]) -> StoredResult:
        identifier, kind, owner, created_at, content_type, body = row
        if self.encryptor is not None and body.startswith(b"v1."):
            body = self.encryptor.open(body.decode(), identifier.encode())
        return StoredResult(identifier, kind, owner, created_at, content_type, body)

    async def get(self, result_id: str) -> StoredResult | None:
        rows = await asyncio.to_thread(
            self._run, "SELECT id, kind, owner, created_at, content_type, body FROM results WHERE id = ?", (result_id,)
        )
        if not rows:
            return None
        return self._result(rows[0])

    async def record_consent(self, subject: str, purpose: str, granted: bool, actor: str, evidence: str) -> None:
        await asyncio.to_thread(
            self._run,
            "INSERT INTO consents VALUES (?, ?, ?, ?, ?, ?)",
            (subject, purpose, int(granted), self.clock(), actor, evidence),
        )

    async def consent_history(self, subject: str) -> list[dict[str, object]]:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT purpose, granted, at, actor, evidence FROM consents WHERE subject = ? ORDER BY rowid",
            (subject,),
        )
        return [{"purpose": p, "granted": bool(g), "at": a, "actor": who, "evidence": e} for p, g, a, who, e in rows]

    async def has_consent(self, subject: str, purpose: str) -> bool:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT granted FROM consents WHERE subject = ? AND purpose = ? ORDER BY rowid DESC LIMIT 1",
            (subject, purpose),
        )
        return bool(rows and rows[0][0])

    async def results_of(self, owner: str) -> list[StoredResult]:
        rows = await asyncio.to_thread(
            self._run, "SELECT id, kind, owner, created_at, content_type, body FROM results WHERE owner = ?", (owner,)
        )
        return [self._result(row) for row in rows]

    async def erase(self, subject: str) -> dict[str, int]:
        """Art. 17: the subject's stored results and consent records are deleted."""
        results = await asyncio.to_thread(self._run, "DELETE FROM results WHERE owner = ? RETURNING id", (subject,))
        consents = await asyncio.to_thread(
            self._run, "DELETE FROM consents WHERE subject = ? RETURNING rowid", (subject,)
        )
        return {"results": len(results), "consents": len(consents)}

    async def create_approval(self, operation: str, requester: str, input_json: str) -> str:
        approval_id = secrets.token_urlsafe(12)
        await asyncio.to_thread(
            self._run,
            "INSERT INTO approvals VALUES (?, ?, ?, ?, ?, 'pending', NULL, NULL)",
            (approval_id, operation, requester, input_json, self.clock()),
        )
        return approval_id

    async def get_approval(self, approval_id: str) -> dict[str, Any] | None:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT id, operation, requester, input, created_at, status, decided_by FROM approvals WHERE id = ?",
            (approval_id,),
        )
        if not rows:
            return None
        keys = ("id", "operation", "requester", "input", "created_at", "status", "decided_by")
        return dict(zip(keys, rows[0], strict=True))

    async def pending_approvals(self) -> list[dict[str, Any]]:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT id, operation, requester, created_at FROM approvals WHERE status = 'pending' ORDER BY created_at",
            (),
        )
        return [{"id": i, "operation": o, "requester": r, "created_at": c} for i, o, r, c in rows]

    async def decide_approval(self, approval_id: str, decision: str, decided_by: str) -> bool:
        """Moves a pending approval to ``decision`` once; False if it was no longer pending."""
        rows = await asyncio.to_thread(
            self._run,
            "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ? WHERE id = ? AND status = 'pending' RETURNING id",
            (decision, decided_by, self.clock(), approval_id),
        )
        return bool(rows)

    async def purge_older_than(self, days: int) -> int:
        """Deletes results older than ``days``; returns how many went."""
        horizon = self.clock() - days * 86400
        rows = await asyncio.to_thread(self._run, "DELETE FROM results WHERE created_at < ? RETURNING id", (horizon,))
        return len(rows)
