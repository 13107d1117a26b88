"""The operation registry: each operation declares the permission and data level it needs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent_runtime.config import Permission, SecurityLevel

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Operation:
    name: str
    permission: Permission
    level: SecurityLevel
    handler: Handler
    description: str


async def _ping(payload: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True}


BUILTINS: dict[str, Operation] = {
    "ping": Operation(
        "ping", Permission.EXECUTE, SecurityLevel.PUBLIC, _ping, "Answers pong: a no-op for smoke tests."
    ),
}


class Registry:
    """The operations this agent enables (config.operations), out of those that exist."""

    def __init__(self, enabled: list[str], available: dict[str, Operation] | None = None) -> None:
        catalogue = available if available is not None else BUILTINS
        self.operations = {name: catalogue[name] for name in enabled if name in catalogue}
        self.missing = [name for name in enabled if name not in catalogue]

    def get(self, name: str) -> Operation | None:
        return self.operations.get(name)
