"""The runtime's data directory and the databases in it are private to the runtime's user."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_runtime.state import SETTINGS
from agent_runtime.store import Store
from tests.runtime.conftest import AppFactory, login


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The common default umask (022), which left the stores world-readable: the runtime must not
    depend on the environment's umask for privacy."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("permissive_umask")
async def test_store_and_revocation_files_are_created_private(make_client: AppFactory) -> None:
    client = await make_client(operations=["generate_report"])
    headers = {"Authorization": f"Bearer {(await login(client, 'ana'))['access_token']}"}
    body = {"input": {"title": "t", "analysis": {"data": [{"a": 1}, {"a": 2}]}}}
    assert (await client.post("/v1/operations/generate_report", json=body, headers=headers)).status == 200
    assert (await client.post("/v1/auth/logout", headers=headers)).status in (200, 204)  # writes a revocation

    data: Path = client.app[SETTINGS].data_dir
    assert _mode(data) == 0o700
    files = sorted(data.glob("*.sqlite3*"))
    names = {path.name for path in files}
    assert {"store.sqlite3", "revocations.sqlite3", "store.sqlite3-wal", "revocations.sqlite3-wal"} <= names
    assert {path.name: _mode(path) for path in files} == {path.name: 0o600 for path in files}


@pytest.mark.usefixtures("permissive_umask")
async def test_a_store_file_of_an_older_version_is_upgraded_in_place(tmp_path: Path) -> None:
    """A file made before reports had subjects and approvals had consents: its rows stay readable,
    it gains the new columns and loses its loose mode."""
    path = tmp_path / "data" / "store.sqlite3"
    path.parent.mkdir()
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE results (id TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT NOT NULL,"
            " created_at REAL NOT NULL, content_type TEXT NOT NULL, body BLOB NOT NULL)"
        )
        old.execute(
            "CREATE TABLE approvals (id TEXT PRIMARY KEY, operation TEXT NOT NULL, requester TEXT NOT NULL,"
            " input TEXT NOT NULL, created_at REAL NOT NULL, status TEXT NOT NULL, decided_by TEXT, decided_at REAL)"
        )
        old.execute("INSERT INTO results VALUES ('r1', 'report', 'agent', 1.0, 'application/json', X'7B7D')")
        old.execute("INSERT INTO approvals VALUES ('a1', 'analyze_data', 'otto', '{}', 1.0, 'pending', NULL, NULL)")
    old.close()
    assert _mode(path) == 0o644

    store = Store(path)
    await store.open()
    try:
        kept = await store.get("r1")
        assert kept is not None
        assert (kept.owner, kept.body, kept.subject) == ("agent", b"{}", None)
        approval = await store.get_approval("a1")
        assert approval is not None
        assert (approval["status"], approval["subject"], approval["purpose"]) == ("pending", None, None)
        new = await store.put("report", "ana", "application/json", b"{}", subject="jane")
        assert [r.id for r in await store.results_of("jane")] == [new.id]
    finally:
        await store.close()
    assert _mode(path) == 0o600
