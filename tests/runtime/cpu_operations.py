"""Operations for the tests of the worker pool, declared as a plugin declares its own. Their
handlers are module-level functions of a module light to import: a worker process imports it to
run them (a CPU-bound handler travels by reference)."""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from typing import Any

from agent_runtime.operations import InputError, Operation, Permission, SecurityLevel
from agent_runtime.workers import Pickled


async def spin(payload: dict[str, Any]) -> dict[str, Any]:
    """Keeps a CPU busy for ``seconds`` without yielding once: work that only a kill stops."""
    deadline = time.monotonic() + float(payload.get("seconds", 0))
    while time.monotonic() < deadline:
        pass
    return {"pid": os.getpid()}


async def crash(payload: dict[str, Any]) -> dict[str, Any]:
    os._exit(3)  # as the kernel's OOM killer would end it: no exception, no reply


async def refuse(payload: dict[str, Any]) -> dict[str, Any]:
    raise InputError("nothing to work with")


def same(value: Any) -> Any:
    return value


def kept_pickled(value: Any) -> Pickled:
    """The value as parsed_body hands a CPU-bound input back: pickled, for the server to hold."""
    return Pickled(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def echo(value: dict[str, Any]) -> dict[str, Any]:
    """The value as the worker received it, with what it found in it."""
    return {
        "value": value,
        "types": {key: type(item).__name__ for key, item in value.items()},
        "blob_sha256": hashlib.sha256(value["blob"]).hexdigest(),
        "pid": os.getpid(),
    }


def _operation(name: str, handler: Any, cpu_bound: bool = True) -> Operation:
    return Operation(name, Permission.EXECUTE, SecurityLevel.PUBLIC, handler, f"test: {name}", cpu_bound=cpu_bound)


SPIN = _operation("spin", spin)
SPIN_ON_THE_LOOP = _operation("spin_on_the_loop", spin, cpu_bound=False)  # a plugin that declares nothing
CRASH = _operation("crash", crash)
REFUSE = _operation("refuse", refuse)
OPERATIONS = {operation.name: operation for operation in (SPIN, SPIN_ON_THE_LOOP, CRASH, REFUSE)}
