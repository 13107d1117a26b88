"""What an operation is: its permission, data level, input model and handler."""

from __future__ import annotations

import pickle
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic import BaseModel

from agent_contract.config import Permission, SecurityLevel
from agent_contract.operations import OperationInfo

# A handler gets its validated input model (or the raw JSON object when it declares none).
Handler = Callable[[Any], Awaitable[dict[str, Any]]]


class StreamEvent(NamedTuple):
    """One Server-Sent Event of a streamed answer: a JSON object, under an event name or none."""

    data: dict[str, Any]
    event: str | None = None


# A streaming handler: an async generator of events, asked for by `Accept: text/event-stream`.
# Whatever fails before its first event is answered as the plain handler's failure would be;
# after it, as an `error` event. Closing it early (the client left) must release what it holds.
StreamHandler = Callable[[Any], AsyncGenerator[StreamEvent, None]]

# What an operation adds to the audit record of its own call (chat: the tokens it used). The route
# gives each call a fresh dict here and merges it into that call's record, whatever the outcome.
CALL_DETAILS: ContextVar[dict[str, Any] | None] = ContextVar("call_details", default=None)


def add_call_details(**details: Any) -> None:
    target = CALL_DETAILS.get()
    if target is not None:
        target.update(details)


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
    stream: StreamHandler | None = None  # the same operation, its answer streamed as it is made

    def __post_init__(self) -> None:
        if self.cpu_bound and self.stream is not None:
            raise TypeError(f"operation {self.name!r} is CPU-bound: it runs in a worker and cannot stream")
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
        stream: StreamHandler | None = None,
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
            stream,
        )
