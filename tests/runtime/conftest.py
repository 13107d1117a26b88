"""A runtime built from a local layout (`agent-runtime init`), with users of every role."""

from __future__ import annotations

import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent_contract.config import Permission, RuntimeConfig, SecurityLevel
from agent_runtime.app import create_app
from agent_runtime.cli import main as runtime_cli
from agent_runtime.operations import BUILTINS, Operation
from agent_runtime.security.users import hash_line
from agent_runtime.settings import Settings
from eao_devtools.testkit.postgres import PostgresServer

PASSWORD = "correct horse battery staple"
ROLE_USERS = {"admin": "ada", "operator": "otto", "analyst": "ana", "viewer": "vic"}

# The console script of the interpreter running the tests.
AGENT_RUNTIME = str(Path(sys.executable).parent / "agent-runtime")


async def _echo(payload: dict[str, Any]) -> dict[str, Any]:
    return {"echo": payload}


# One operation per (permission, level), for the authorisation matrix.
MATRIX_OPERATIONS = {
    f"{permission.value}_{level.value}": Operation(
        f"{permission.value}_{level.value}", permission, level, _echo, "test"
    )
    for permission in Permission
    for level in SecurityLevel
}


def make_layout(
    directory: Path, algorithm: str = "EdDSA", extra_names: list[str] | None = None, **config_changes: Any
) -> Path:
    assert runtime_cli(["init", str(directory), "--name", "test-agent", "--algorithm", algorithm]) == 0
    users = directory / "users"
    users.write_text(
        users.read_text() + "".join(hash_line(name, [role], PASSWORD) + "\n" for role, name in ROLE_USERS.items())
    )
    config_file = directory / "config.yaml"
    data = RuntimeConfig.from_yaml(config_file.read_text()).model_dump(by_alias=True, mode="json", exclude_none=True)
    data["operations"] = ["ping", "analyze_data", *MATRIX_OPERATIONS, *(extra_names or [])]
    data["audit"] = {"stdout": False}
    for key, value in config_changes.items():  # sections are merged, not replaced
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    config_file.write_text(RuntimeConfig.model_validate(data).to_yaml())
    return config_file


AppFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    make_layout(tmp_path / "agent")
    return tmp_path / "agent"


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> AppFactory:
    async def factory(
        algorithm: str = "EdDSA", extra_operations: dict[str, Operation] | None = None, **config_changes: Any
    ) -> TestClient[web.Request, web.Application]:
        directory = tmp_path / f"agent-{algorithm}-{len(list(tmp_path.iterdir()))}"
        extra = extra_operations or {}
        config_file = make_layout(directory, algorithm, extra_names=list(extra), **config_changes)
        catalogue = {**BUILTINS, **MATRIX_OPERATIONS, **extra}
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            create_app(Settings.load(str(config_file)), catalogue)
        )
        return client

    return factory


async def login(
    client: TestClient[web.Request, web.Application], username: str, password: str = PASSWORD
) -> dict[str, Any]:
    response = await client.post("/v1/auth/login", json={"username": username, "password": password})
    body: dict[str, Any] = await response.json()
    assert response.status == 200, body
    return body


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL per test module, on loopback."""
    # Not under pytest's tmp_path: its parents are private to root, and postgres runs as its own user.
    with PostgresServer(Path(tempfile.mkdtemp(prefix="eao-pg-"))) as server:
        yield server


async def fresh_database(server: PostgresServer) -> str:
    """A database of its own for one test, on the module's server."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(server.url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return server.url.rsplit("/", 1)[0] + f"/{name}"
