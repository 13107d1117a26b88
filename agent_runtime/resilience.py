"""Resilience primitives: circuit breaker, retries with jitter, bulkhead with load shedding.

All take an injected clock (and the retry an injected sleep and random source), so their state
transitions are tested exactly, without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import TypeVar

from agent_contract.config import CircuitBreakerConfig, RetryConfig

T = TypeVar("T")


class CircuitState(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitOpenError(RuntimeError):
    """The dependency is failing; the call was not attempted."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit {name!r} is open; retry in {retry_after:.0f}s")
        self.retry_after = retry_after


class CircuitBreaker:
    """A time-window circuit breaker, as resilience4j's: it opens when, over the last
    ``window_seconds``, at least ``minimum_throughput`` calls were made and the share that failed
    reached ``failure_ratio``; after ``open_seconds`` it lets ``half_open_calls`` trial calls
    through, closing if they all succeed and opening again if any fails."""

    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, CircuitState], None] | None = None,
        half_open_calls: int = 1,
    ) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.on_change = on_change
        self.half_open_calls = half_open_calls
        self.state = CircuitState.CLOSED
        self._outcomes: collections.deque[tuple[float, bool]] = collections.deque()
        self._opened_at = 0.0
        self._trials_started = 0
        self._trials_succeeded = 0

    def _set(self, state: CircuitState) -> None:
        if state is not self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change(self.name, state)

    def _prune(self, now: float) -> None:
        while self._outcomes and now - self._outcomes[0][0] > self.config.window_seconds:
            self._outcomes.popleft()

    def allow(self) -> None:
        """Raises CircuitOpenError when the call must not be attempted."""
        now = self.clock()
        if self.state is CircuitState.OPEN:
            remaining = self._opened_at + self.config.open_seconds - now
            if remaining > 0:
                raise CircuitOpenError(self.name, remaining)
            self._set(CircuitState.HALF_OPEN)
            self._trials_started = self._trials_succeeded = 0
        if self.state is CircuitState.HALF_OPEN:
            if self._trials_started >= self.half_open_calls:
                raise CircuitOpenError(self.name, self.config.open_seconds)
            self._trials_started += 1

    def record(self, success: bool) -> None:
        now = self.clock()
        if self.state is CircuitState.HALF_OPEN:
            if not success:
                self._open(now)
                return
            self._trials_succeeded += 1
            if self._trials_succeeded >= self.half_open_calls:
                self._outcomes.clear()
                self._set(CircuitState.CLOSED)
            return
        self._outcomes.append((now, success))
        self._prune(now)
        calls = len(self._outcomes)
        if calls >= self.config.minimum_throughput:
            failures = sum(1 for _, ok in self._outcomes if not ok)
            if failures / calls >= self.config.failure_ratio:
                self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._outcomes.clear()
        self._set(CircuitState.OPEN)

    async def call(self, function: Callable[[], Awaitable[T]]) -> T:
        self.allow()
        try:
            result = await function()
        except Exception:
            self.record(False)
            raise
        self.record(True)
        return result


def backoff_delays(config: RetryConfig, rng: random.Random | None = None) -> list[float]:
    """Full-jitter delays (AWS architecture blog): uniform in [0, min(cap, base * 2^attempt)]."""
    source = rng or random.Random()  # noqa: S311 - jitter, not secrecy
    return [
        source.uniform(0, min(config.max_delay_seconds, config.base_delay_seconds * 2**attempt))
        for attempt in range(config.max_attempts - 1)
    ]


async def retry(
    function: Callable[[], Awaitable[T]],
    config: RetryConfig,
    retryable: Callable[[Exception], bool],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> T:
    """Calls ``function`` up to ``max_attempts`` times while it fails with a retryable error."""
    delays = backoff_delays(config, rng)
    for delay in delays:
        try:
            return await function()
        except Exception as error:
            if not retryable(error):
                raise
        await sleep(delay)
    return await function()


class OverloadedError(RuntimeError):
    """The bulkhead and its queue are full: the request is shed."""


class Bulkhead:
    """At most ``limit`` calls at once; at most ``queue_limit`` more may wait; beyond that, shed."""

    def __init__(self, limit: int, queue_limit: int) -> None:
        self.limit = limit
        self.queue_limit = queue_limit
        self._semaphore = asyncio.Semaphore(limit)
        self.in_use = 0  # read by the gauges when scraped, not pushed to them on every call
        self.waiting = 0

    async def run(self, function: Callable[[], Awaitable[T]]) -> T:
        if self.in_use >= self.limit and self.waiting >= self.queue_limit:
            raise OverloadedError(f"{self.in_use} running and {self.waiting} waiting")
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.in_use += 1
        try:
            return await function()
        finally:
            self.in_use -= 1
            self._semaphore.release()
