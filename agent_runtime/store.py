"""The store: what operations keep (reports), consents, approvals and, with GDPR, what must be
purged after ``retentionDays``. One set of SQL on one of two engines: the embedded SQLite file
under the data directory (:class:`SqliteEngine`, one replica) or PostgreSQL when DATABASE_URL is
set (:class:`agent_runtime.sharedstate.PostgresEngine`, shared by every replica).

The directory is created 0700 and the database files 0600, whatever the process umask: they hold
results, consents and approval inputs. With an encryptor (HIPAA), result bodies and approval
inputs are sealed with AES-GCM bound to their id."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent_runtime.crypto import FieldEncryptor


def _private_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # An existing directory is tightened when it is ours; a volume root owned by someone else
    # (an emptyDir with fsGroup) keeps its mode, and the files in it are private anyway.
    with contextlib.suppress(PermissionError):
        if directory.stat().st_uid == os.geteuid():
            directory.chmod(0o700)


def open_sqlite(path: Path) -> sqlite3.Connection:
    """One connection for worker threads (callers serialise with a lock), in WAL mode, autocommit.
    The file is created 0600 before SQLite opens it; SQLite gives its -wal and -shm files the
    database file's mode."""
    _private_directory(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    path.chmod(0o600)  # one made by an older version, under a looser umask
    for companion in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            companion.chmod(0o600)
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    return connection


@dataclass(frozen=True)
class StoredResult:
    id: str
    kind: str
    owner: str  # the principal who made it (may download it; admins may too)
    created_at: float
    content_type: str
    body: bytes
    subject: str | None = None  # the GDPR data subject it is about: found by export and erasure


# Columns added after the first release: (table, column, how), applied to older files on open.
_ADDED_COLUMNS = (
    ("results", "subject", "ALTER TABLE results ADD COLUMN subject TEXT"),
    ("approvals", "subject", "ALTER TABLE approvals ADD COLUMN subject TEXT"),
    ("approvals", "purpose", "ALTER TABLE approvals ADD COLUMN purpose TEXT"),
)
_SELECT_RESULTS = "SELECT id, kind, owner, created_at, content_type, body, subject FROM results"
_SELECT_APPROVALS = (
    "SELECT id, operation, requester, input, created_at, status, decided_by, subject, purpose FROM approvals"
)
_APPROVAL_KEYS = ("id", "operation", "requester", "input", "created_at", "status", "decided_by", "subject", "purpose")


class Engine(Protocol):
    """Runs the store's SQL (``?`` placeholders) and returns the rows as tuples."""

    dialect: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def fetch(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[Any, ...]]: ...
    async def ping(self) -> dict[str, Any]: ...


class SqliteEngine:
    """One SQLite file, one connection used from worker threads one at a time."""

    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
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
        for table, column, alter in _ADDED_COLUMNS:
            present = {row[0] for row in self._db.execute("SELECT name FROM pragma_table_info(?)", (table,))}
            if column not in present:
                self._db.execute(alter)

    async def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _run(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            assert self._db is not None, "the store is not open"
            return list(self._db.execute(sql, parameters).fetchall())

    async def fetch(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self._run, sql, parameters)

    async def ping(self) -> dict[str, Any]:
        return {"ok": self._db is not None, "backend": "sqlite"}


class Store:
    def __init__(
        self,
        engine: Engine | str | Path,
        clock: Callable[[], float] = time.time,
        encryptor: FieldEncryptor | None = None,
    ) -> None:
        """``engine``: where the rows live (a path means an SQLite file there). With an
        ``encryptor`` (HIPAA), every stored body and approval input is sealed with AES-GCM, bound
        to its id."""
        self.engine: Engine = SqliteEngine(engine) if isinstance(engine, (str, Path)) else engine
        self.clock = clock
        self.encryptor = encryptor

    async def open(self) -> None:
        await self.engine.open()

    async def close(self) -> None:
        await self.engine.close()

    async def _run(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[Any, ...]]:
        return await self.engine.fetch(sql, parameters)

    async def put(
        self, kind: str, owner: str, content_type: str, body: bytes, subject: str | None = None
    ) -> StoredResult:
        result = StoredResult(secrets.token_urlsafe(12), kind, owner, self.clock(), content_type, body, subject)
        at_rest = self.encryptor.seal(body, result.id.encode()).encode() if self.encryptor else body
        await self._run(
            "INSERT INTO results (id, kind, owner, created_at, content_type, body, subject)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (result.id, kind, owner, result.created_at, content_type, at_rest, subject),
        )
        return result

    def _result(self, row: tuple[Any, ...]) -> StoredResult:
        identifier, kind, owner, created_at, content_type, body, subject = row
        if self.encryptor is not None and body.startswith(b"v1."):
            body = self.encryptor.open(body.decode(), identifier.encode())
        return StoredResult(identifier, kind, owner, created_at, content_type, body, subject)

    async def get(self, result_id: str) -> StoredResult | None:
        rows = await self._run(_SELECT_RESULTS + " WHERE id = ?", (result_id,))
        if not rows:
            return None
        return self._result(rows[0])

    async def record_consent(self, subject: str, purpose: str, granted: bool, actor: str, evidence: str) -> None:
        await self._run(
            "INSERT INTO consents (subject, purpose, granted, at, actor, evidence) VALUES (?, ?, ?, ?, ?, ?)",
            (subject, purpose, int(granted), self.clock(), actor, evidence),
        )

    async def consent_history(self, subject: str) -> list[dict[str, object]]:
        rows = await self._run(
            "SELECT purpose, granted, at, actor, evidence FROM consents WHERE subject = ? ORDER BY rowid",
            (subject,),
        )
        return [{"purpose": p, "granted": bool(g), "at": a, "actor": who, "evidence": e} for p, g, a, who, e in rows]

    async def has_consent(self, subject: str, purpose: str) -> bool:
        rows = await self._run(
            "SELECT granted FROM consents WHERE subject = ? AND purpose = ? ORDER BY rowid DESC LIMIT 1",
            (subject, purpose),
        )
        return bool(rows and rows[0][0])

    async def results_of(self, subject: str) -> list[StoredResult]:
        """The results made for this data subject."""
        rows = await self._run(_SELECT_RESULTS + " WHERE subject = ? ORDER BY created_at", (subject,))
        return [self._result(row) for row in rows]

    async def erase(self, subject: str) -> dict[str, int]:
        """Art. 17: the subject's results and consent records are deleted. Approvals made for the
        subject lose their input and the subject's name; the rest (who asked, who decided, when)
        is kept as the SOX record, and a pending one can no longer run (status ``erased``)."""
        results = await self._run("DELETE FROM results WHERE subject = ? RETURNING id", (subject,))
        consents = await self._run("DELETE FROM consents WHERE subject = ? RETURNING subject", (subject,))
        approvals = await self._run(
            "UPDATE approvals SET input = '', subject = NULL,"
            " status = CASE status WHEN 'pending' THEN 'erased' ELSE status END WHERE subject = ? RETURNING id",
            (subject,),
        )
        return {"results": len(results), "consents": len(consents), "approvals": len(approvals)}

    @staticmethod
    def _approval_context(approval_id: str) -> bytes:
        # Not the bare id: a sealed result body can never pass for an approval input.
        return f"approval:{approval_id}".encode()

    async def create_approval(
        self,
        operation: str,
        requester: str,
        input_json: str,
        subject: str | None = None,
        purpose: str | None = None,
    ) -> str:
        """A pending approval; ``subject`` and ``purpose`` when the input is a data subject's
        personal data under a consent (checked again when it runs)."""
        approval_id = secrets.token_urlsafe(12)
        at_rest = (
            self.encryptor.seal(input_json.encode(), self._approval_context(approval_id))
            if self.encryptor
            else input_json
        )
        await self._run(
            "INSERT INTO approvals (id, operation, requester, input, created_at, status, subject, purpose)"
            " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
            (approval_id, operation, requester, at_rest, self.clock(), subject, purpose),
        )
        return approval_id

    def _approval(self, row: tuple[Any, ...]) -> dict[str, Any]:
        approval = dict(zip(_APPROVAL_KEYS, row, strict=True))
        if self.encryptor is not None and approval["input"].startswith("v1."):
            approval["input"] = self.encryptor.open(approval["input"], self._approval_context(approval["id"])).decode()
        return approval

    async def get_approval(self, approval_id: str) -> dict[str, Any] | None:
        rows = await self._run(_SELECT_APPROVALS + " WHERE id = ?", (approval_id,))
        if not rows:
            return None
        return self._approval(rows[0])

    async def approvals_of(self, subject: str) -> list[dict[str, Any]]:
        """The approvals made for this data subject, with their inputs."""
        rows = await self._run(
            _SELECT_APPROVALS + " WHERE subject = ? ORDER BY created_at",
            (subject,),
        )
        return [self._approval(row) for row in rows]

    async def pending_approvals(self) -> list[dict[str, Any]]:
        rows = await self._run(
            "SELECT id, operation, requester, created_at FROM approvals WHERE status = 'pending' ORDER BY created_at",
            (),
        )
        return [{"id": i, "operation": o, "requester": r, "created_at": c} for i, o, r, c in rows]

    async def decide_approval(self, approval_id: str, decision: str, decided_by: str) -> bool:
        """Moves a pending approval to ``decision`` once; False if it was no longer pending."""
        rows = await self._run(
            "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ? WHERE id = ? AND status = 'pending' RETURNING id",
            (decision, decided_by, self.clock(), approval_id),
        )
        return bool(rows)

    async def purge_older_than(self, days: int) -> int:
        """Deletes results older than ``days``; returns how many went."""
        horizon = self.clock() - days * 86400
        rows = await self._run("DELETE FROM results WHERE created_at < ? RETURNING id", (horizon,))
        return len(rows)
