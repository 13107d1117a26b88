"""The operation registry: each operation declares the permission and data level it needs."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from agent_contract.config import Permission, SecurityLevel
from agent_contract.operations import ANALYZE_DATA, BUILTIN_OPERATIONS, PING, PROCESS_DOCUMENT
from agent_runtime.operations.analyze import AnalyzeInput, analyze_data
from agent_runtime.operations.base import Handler, InputError, Operation
from agent_runtime.operations.documents import DocumentInput, process_document


async def _ping(payload: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True}


# The built-ins that need nothing but their input. generate_report (it stores its result) and chat
# (it needs the model's client) are made per app by ``create_app``; all five are declared in
# agent_contract.operations.
BUILTINS: dict[str, Operation] = {
    operation.name: operation
    for operation in (
        Operation.builtin(PING, _ping),
        Operation.builtin(ANALYZE_DATA, analyze_data, AnalyzeInput, cpu_bound=True),
        Operation.builtin(PROCESS_DOCUMENT, process_document, DocumentInput, cpu_bound=True),
    )
}


PLUGIN_GROUP = "agent_runtime.operations"


def discover_plugins() -> dict[str, Operation]:
    """Operations from installed packages: each entry point of the group ``agent_runtime.operations``
    names an Operation (or a function returning one). A plugin cannot replace a built-in."""
    found: dict[str, Operation] = {}
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        loaded = entry.load()
        operation = loaded() if callable(loaded) and not isinstance(loaded, Operation) else loaded
        if not isinstance(operation, Operation):
            raise TypeError(f"plugin {entry.name!r} ({entry.value}) does not provide an Operation")
        if operation.name in BUILTIN_OPERATIONS:
            raise ValueError(f"plugin {entry.name!r} would replace the built-in operation {operation.name!r}")
        found[operation.name] = operation
    return found


class Registry:
    """The operations this agent enables (config.operations), out of those that exist."""

    def __init__(self, enabled: list[str], available: dict[str, Operation] | None = None) -> None:
        catalogue = available if available is not None else BUILTINS
        self.operations = {name: catalogue[name] for name in enabled if name in catalogue}
        self.missing = [name for name in enabled if name not in catalogue]

    def get(self, name: str) -> Operation | None:
        return self.operations.get(name)


# The plugin API: everything a plugin needs to declare an Operation comes from this module.
__all__ = [
    "BUILTINS",
    "PLUGIN_GROUP",
    "Handler",
    "InputError",
    "Operation",
    "Permission",
    "Registry",
    "SecurityLevel",
    "discover_plugins",
]
