"""The operation registry: each operation declares the permission and data level it needs."""

from __future__ import annotations

from typing import Any

from agent_runtime.config import Permission, SecurityLevel
from agent_runtime.operations.analyze import AnalyzeInput, analyze_data
from agent_runtime.operations.base import Handler, InputError, Operation
from agent_runtime.operations.documents import DocumentInput, process_document


async def _ping(payload: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True}


BUILTINS: dict[str, Operation] = {
    "ping": Operation(
        "ping", Permission.EXECUTE, SecurityLevel.PUBLIC, _ping, "Answers pong: a no-op for smoke tests."
    ),
    "analyze_data": Operation(
        "analyze_data",
        Permission.EXECUTE,
        SecurityLevel.INTERNAL,
        analyze_data,
        "Descriptive statistics, quartiles, correlation and outliers of numeric columns.",
        AnalyzeInput,
    ),
    "process_document": Operation(
        "process_document",
        Permission.EXECUTE,
        SecurityLevel.CONFIDENTIAL,
        process_document,
        "Text of a plain, Markdown or HTML document, its entities, and PII/PHI found (redacted in the text).",
        DocumentInput,
        personal_data=True,
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


__all__ = ["BUILTINS", "Handler", "InputError", "Operation", "Registry"]
