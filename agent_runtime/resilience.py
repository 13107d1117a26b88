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
A = TypeVar("A")


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
    through, closing if they all succeed and opening again if any fails.

    The window is counted in buckets of a second (a tenth of a window shorter than 10 s), as
    resilience4j's time-based window is: the calls and failures of each, and their totals. So a
    call costs the same however many calls the window holds, and the window's memory does not
    grow with the request rate. (It had kept every outcome and counted the failures among them
    on every call: at 5,000 calls a second, a 30 s window is 150,000 of them.) An outcome leaves
    the window once its whole bucket is older than ``window_seconds``: up to a bucket late."""

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
        self._bucket_seconds = min(1.0, config.window_seconds / 10)
        self._buckets: collections.deque[list[int]] = collections.deque()  # [bucket number, calls, failures]
        self._calls = 0  # in the window
        self._failures = 0
        self._opened_at = 0.0
        self._trials_started = 0
        self._trials_succeeded = 0

    def _set(self, state: CircuitState) -> None:
        if state is not self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change(self.name, state)

    def _count(self, now: float, success: bool) -> None:
        number = int(now // self._bucket_seconds)
        if not self._buckets or self._buckets[-1][0] != number:
            self._buckets.append([number, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        self._calls += 1
        if not success:
            bucket[2] += 1
            self._failures += 1
        # Buckets wholly older than the window leave it.
        oldest_kept = now - self.config.window_seconds
        while (self._buckets[0][0] + 1) * self._bucket_seconds <= oldest_kept:
            _, calls, failures = self._buckets.popleft()
            self._calls -= calls
            self._failures -= failures

    def _forget(self) -> None:
        self._buckets.clear()
        self._calls = self._failures = 0

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
                self._forget()
                self._set(CircuitState.CLOSED)
            return
        self._count(now, success)
        if self._calls >= self.config.minimum_throughput and self._failures / self._calls >= self.config.failure_ratio:
            self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._forget()
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
    """At most ``limit`` calls at once; at most ``queue_limit`` more may wait, first come first
    served; beyond that, shed. A call that finds a free place and nobody waiting takes it with no
    coroutine or future of its own: that is every call of an agent within its limits, and
    ``asyncio.Semaphore`` cost 72 opcodes and four Python calls a request (counted)."""

    def __init__(self, limit: int, queue_limit: int) -> None:
        self.limit = limit
        self.queue_limit = queue_limit
        self.in_use = 0  # read by the gauges when scraped, not pushed to them on every call
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def run(self, function: Callable[[], Awaitable[T]]) -> T:
        if self.in_use < self.limit and not self._queue:
            self.in_use += 1
        else:
            await self._place()
        try:
            return await function()
        finally:
            self._release()

    async def _place(self) -> None:
        """Waits in the queue until a call that ends hands its place over (in_use unchanged)."""
        if len(self._queue) >= self.queue_limit:
            raise OverloadedError(f"{self.in_use} running and {len(self._queue)} waiting")
        handed = asyncio.get_running_loop().create_future()
        self._queue.append(handed)
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self._release()  # handed a place, then cancelled before it ran: the place goes on
            elif handed in self._queue:  # (a release may have dropped it already, as cancelled)
                self._queue.remove(handed)
            raise

    def _release(self) -> None:
        while self._queue:
            handed = self._queue.popleft()
            if not handed.done():
                handed.set_result(None)
                return
        self.in_use -= 1


class _Running:
    __slots__ = ("cancelling", "deadline", "expired", "task")

    def __init__(self, deadline: float, task: asyncio.Task[object], cancelling: int) -> None:
        self.deadline, self.task, self.cancelling, self.expired = deadline, task, cancelling, False


class Deadlines:
    """Every call ``run`` makes may take at most ``seconds``; one that takes longer is cancelled
    and raises TimeoutError, as under ``asyncio.timeout``. One timer serves all of them: with one
    limit for all, deadlines fall in the order the calls started, so the next to fall due is always
    the oldest still running. ``asyncio.timeout`` arms and cancels a timer of its own per call,
    which cost the event loop 6 µs a request (measured), for a deadline that is nearly never met."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._running: dict[_Running, None] = {}  # in the order they started: the order they fall due
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the last one run on

    async def run(self, function: Callable[[A], Awaitable[T]], argument: A) -> T:
        """``function(argument)`` under the deadline (one argument, not a closure: this is on every
        request's path)."""
        # The loop is kept, not asked for: on Python 3.11 every asyncio.get_running_loop() (and
        # current_task() without a loop) is a getpid() system call, its check for a fork.
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if loop is None or task is None:  # the first call, or one on another loop
            current = asyncio.get_running_loop()
            if current is not loop:  # what an earlier loop armed will never ring: start afresh
                self._timer = None
                self._running.clear()
                loop = self._loop = current
            task = asyncio.current_task(loop)
            if task is None:
                raise RuntimeError("Deadlines.run is for a task")
        running = _Running(loop.time() + self.seconds, task, task.cancelling())
        self._running[running] = None
        if self._timer is None:
            self._timer = loop.call_at(running.deadline, self._expire)
        try:
            return await function(argument)
        except asyncio.CancelledError:
            if running.expired:
                running.expired = False  # our cancellation, taken back here
                # Ours alone, unless someone else cancelled the task too: then theirs goes on.
                if task.uncancel() <= running.cancelling:
                    raise TimeoutError from None
            raise
        finally:
            self._running.pop(running, None)
            if running.expired:  # it expired, but the call swallowed the cancellation: ours taken back
                task.uncancel()  # (as asyncio.timeout does), so later deadlines of the task still work

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._running:
            oldest = next(iter(self._running))
            if oldest.deadline > now:
                self._timer = loop.call_at(oldest.deadline, self._expire)
                return
            del self._running[oldest]
            oldest.expired = True
            oldest.task.cancel()
