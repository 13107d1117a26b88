"""Readiness: named checks, each bounded by a timeout, reported together."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

Check = Callable[[], Awaitable[dict[str, Any]]]


class Readiness:
    """Named checks, each run with a timeout; the report is cached briefly so probes and scrapes
    cannot turn readiness into load."""

    def __init__(self, checks: dict[str, Check], timeout: float = 2.0, cache_seconds: float = 1.0) -> None:
        self.checks = checks
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._cached: tuple[float, dict[str, dict[str, Any]]] | None = None

    async def _run(self, check: Check) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.timeout):
                return await check()
        except TimeoutError:
            return {"ok": False, "reason": f"no answer within {self.timeout:g}s"}
        except Exception as error:
            return {"ok": False, "reason": type(error).__name__}

    async def report(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.cache_seconds:
            return self._cached[1]
        results = await asyncio.gather(*(self._run(check) for check in self.checks.values()))
        report = dict(zip(self.checks, results, strict=True))
        self._cached = (now, report)
        return report
