"""What an operation is: its permission, data level, input model and handler."""

from __future__ import annotations

import pickle
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from agent_contract.config import Permission, SecurityLevel
from agent_contract.operations import OperationInfo

# A handler gets its validated input model (or the raw JSON object when it declares none).
Handler = Callable[[Any], Awaitable[dict[str, Any]]]


class InputError(ValueError):
    """Input that passed the schema but that the operation cannot work with: answered with 422."""


@dataclass(frozen=True)
class Operation:
    name: str
    permission: Permission
    level: SecurityLevel
    handler: Handler
    description: str
    input_model: type[BaseModel] | None = None  # validated before the handler runs
    personal_data: bool = False  # with GDPR, needs the subject's consent for the stated purpose
    # Runs in a worker process, not on the event loop, and is killed at the operation's timeout.
    # The handler then goes there by pickle: a module-level function, its input picklable.
    cpu_bound: bool = False

    def __post_init__(self) -> None:
        if self.cpu_bound:
            try:
                pickle.dumps(self.handler)
            except (pickle.PicklingError, AttributeError, TypeError) as error:
                raise TypeError(
                    f"operation {self.name!r} is CPU-bound, so its handler must be a module-level function: {error}"
                ) from None

    @classmethod
    def builtin(
        cls,
        info: OperationInfo,
        handler: Handler,
        input_model: type[BaseModel] | None = None,
        cpu_bound: bool = False,
    ) -> Operation:
        """A built-in operation: what it needs comes from the contract's table, only the
        implementation from here."""
        return cls(
            info.name,
            info.permission,
            info.level,
            handler,
            info.description,
            input_model,
            info.personal_data,
            cpu_bound,
        )
