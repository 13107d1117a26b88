"""Circuit breaker transitions with an injected clock; retries; the bulkhead and load shedding;
the operations' deadlines."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import pytest

from agent_contract.config import CircuitBreakerConfig, RetryConfig
from agent_runtime.resilience import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    Deadlines,
    OverloadedError,
    backoff_delays,
    retry,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: Clock, changes: list[CircuitState] | None = None) -> CircuitBreaker:
    config = CircuitBreakerConfig(failure_ratio=0.5, minimum_throughput=4, window_seconds=10, open_seconds=30)

    def record(_: str, state: CircuitState) -> None:
        if changes is not None:
            changes.append(state)

    return CircuitBreaker("model", config, clock=clock, on_change=record)


def state(breaker: CircuitBreaker) -> CircuitState:
    """The state, read through a call (so the type checker does not pin it between steps)."""
    return breaker.state


def test_stays_closed_below_minimum_throughput() -> None:
    breaker = _breaker(Clock())
    for _ in range(3):
        breaker.allow()
        breaker.record(False)
    assert state(breaker) is CircuitState.CLOSED


def test_opens_at_the_failure_ratio_and_rejects_until_open_seconds_pass() -> None:
    clock = Clock()
    changes: list[CircuitState] = []
    breaker = _breaker(clock, changes)
    for success in (True, False, True, False):  # 2 of 4 failed: ratio 0.5
        breaker.allow()
        breaker.record(success)
    assert state(breaker) is CircuitState.OPEN
    clock.now += 29
    with pytest.raises(CircuitOpenError) as rejected:
        breaker.allow()
    assert rejected.value.retry_after == pytest.approx(1)
    clock.now += 1
    breaker.allow()  # the one trial call
    assert state(breaker) is CircuitState.HALF_OPEN
    with pytest.raises(CircuitOpenError):
        breaker.allow()  # no second trial while the first runs
    breaker.record(True)
    assert state(breaker) is CircuitState.CLOSED
    assert changes == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]


def test_a_failed_trial_opens_again() -> None:
    clock = Clock()
    breaker = _breaker(clock)
    for _ in range(4):
        breaker.allow()
        breaker.record(False)
    clock.now += 30
    breaker.allow()
    breaker.record(False)
    assert state(breaker) is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        breaker.allow()


def test_old_outcomes_leave_the_window() -> None:
    clock = Clock()
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.allow()
        breaker.record(False)
    clock.now += 11  # those failures are now outside the 10 s window
    for _ in range(3):
        breaker.allow()
        breaker.record(True)
    breaker.allow()
    breaker.record(False)
    assert state(breaker) is CircuitState.CLOSED  # 1 failure in 4 recent calls


def test_the_window_holds_many_calls_and_lets_them_go_a_bucket_at_a_time() -> None:
    """The ratio is over every call in the window, however many: 49,999 failures after 50,000
    successes keep it closed, the next failure opens it. Outcomes leave once their whole second
    is older than the window, not before."""
    clock = Clock()
    config = CircuitBreakerConfig(failure_ratio=0.5, minimum_throughput=4, window_seconds=10, open_seconds=30)
    breaker = CircuitBreaker("database", config, clock=clock)
    for call in range(50_000):  # over 5 s
        clock.now = call / 10_000
        breaker.allow()
        breaker.record(True)
    for _ in range(49_999):
        breaker.record(False)
    assert state(breaker) is CircuitState.CLOSED
    breaker.record(False)
    assert state(breaker) is CircuitState.OPEN

    breaker = CircuitBreaker("database", config, clock=clock)
    clock.now = 0.0
    for _ in range(6):
        breaker.record(True)  # in the second [0, 1)
    clock.now = 10.9  # 10.9 s after them, but their second is not wholly out of the window yet
    for _ in range(5):
        breaker.record(False)  # 5 of 11
    assert state(breaker) is CircuitState.CLOSED
    clock.now = 11.0  # now it is: 6 of 6 recent calls failed
    breaker.record(False)
    assert state(breaker) is CircuitState.OPEN


def test_a_window_under_ten_seconds_is_counted_in_tenths_of_it() -> None:
    clock = Clock()
    config = CircuitBreakerConfig(failure_ratio=0.5, minimum_throughput=4, window_seconds=0.5, open_seconds=30)
    breaker = CircuitBreaker("model", config, clock=clock)
    for _ in range(3):
        breaker.record(False)
    clock.now = 0.56  # 0.5 s and a 0.05 s bucket later: gone (a whole-second bucket would keep them)
    for success in (True, True, True, False):
        breaker.record(success)
    assert state(breaker) is CircuitState.CLOSED  # 1 failure in 4 recent calls


async def test_call_wraps_an_async_function() -> None:
    breaker = _breaker(Clock())

    async def boom() -> int:
        raise ValueError("down")

    for _ in range(4):
        with pytest.raises(ValueError, match="down"):
            await breaker.call(boom)
    with pytest.raises(CircuitOpenError):
        await breaker.call(boom)


def test_backoff_is_capped_full_jitter() -> None:
    config = RetryConfig(max_attempts=8, base_delay_seconds=0.1, max_delay_seconds=1.0)
    delays = backoff_delays(config, random.Random(7))
    assert len(delays) == 7
    for attempt, delay in enumerate(delays):
        assert 0 <= delay <= min(1.0, 0.1 * 2**attempt)


async def test_retry_stops_on_success_and_on_fatal_errors() -> None:
    attempts: list[int] = []
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("reset")
        return "ok"

    config = RetryConfig(max_attempts=5, base_delay_seconds=0.1, max_delay_seconds=1.0)
    assert await retry(flaky, config, lambda e: isinstance(e, ConnectionError), sleep=sleep) == "ok"
    assert len(attempts) == 3
    assert len(slept) == 2

    async def fatal() -> str:
        raise PermissionError("no")

    with pytest.raises(PermissionError):
        await retry(fatal, config, lambda e: isinstance(e, ConnectionError), sleep=sleep)
    assert len(slept) == 2  # no retry of a non-retryable error


async def test_bulkhead_limits_concurrency_and_sheds_beyond_its_queue() -> None:
    bulkhead = Bulkhead(limit=2, queue_limit=1)
    release = asyncio.Event()
    peak = 0

    async def work() -> None:
        nonlocal peak
        peak = max(peak, bulkhead.in_use)
        await release.wait()

    tasks = [asyncio.create_task(bulkhead.run(work)) for _ in range(3)]  # 2 run, 1 waits
    while bulkhead.in_use < 2 or bulkhead.waiting < 1:
        await asyncio.sleep(0)
    with pytest.raises(OverloadedError):
        await bulkhead.run(work)
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 2
    assert (bulkhead.in_use, bulkhead.waiting) == (0, 0)


async def test_bulkhead_serves_its_queue_in_order_and_loses_no_place_to_a_cancelled_waiter() -> None:
    """Places pass to waiters first come first served. A waiter cancelled while it waits leaves
    the queue (at once, or when a release comes upon it first); one cancelled after it was handed
    a place hands it on. No place is lost or made: the limit holds throughout, and everything
    ends with nothing in use or waiting."""
    bulkhead = Bulkhead(limit=1, queue_limit=5)
    gates = {name: asyncio.Event() for name in "abcdef"}
    order: list[str] = []

    def work(name: str) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            order.append(name)
            assert bulkhead.in_use == 1
            await gates[name].wait()
            if name == "a":
                running["b"].cancel()  # b's cancellation is still on its way when a's place is released
                asyncio.get_running_loop().call_soon(running["c"].cancel)  # c: handed the place, not started
            return name

        return run

    running = {name: asyncio.create_task(bulkhead.run(work(name))) for name in "abcdef"}
    while bulkhead.waiting < 5:
        await asyncio.sleep(0)
    running["e"].cancel()  # cancelled while it waits: it leaves the queue
    with pytest.raises(asyncio.CancelledError):
        await running["e"]
    assert (bulkhead.in_use, bulkhead.waiting) == (1, 4)
    gates["a"].set()
    assert await running["a"] == "a"
    for name in "bc":
        with pytest.raises(asyncio.CancelledError):
            await running[name]
    gates["d"].set()
    gates["f"].set()
    assert [await running["d"], await running["f"]] == ["d", "f"]
    assert order == ["a", "d", "f"]
    assert (bulkhead.in_use, bulkhead.waiting) == (0, 0)
    assert await bulkhead.run(work("f")) == "f"  # the one place is free again
    assert (bulkhead.in_use, bulkhead.waiting) == (0, 0)


async def test_deadlines_end_each_call_that_outlives_its_own_and_no_other() -> None:
    """One timer for every call: a call that ends in time is untouched, each late call raises
    TimeoutError at its own deadline (not at the first call's, whose timer it shares), the task
    is left uncancelled, and a cancellation from elsewhere stays a cancellation."""
    deadlines = Deadlines(0.3)

    async def call(start_after: float, takes: float) -> tuple[str, float]:
        await asyncio.sleep(start_after)
        started = time.monotonic()
        try:
            await deadlines.run(asyncio.sleep, takes)
        except TimeoutError:
            task = asyncio.current_task()
            assert task is not None
            assert task.cancelling() == 0
            await asyncio.sleep(0)  # no cancellation left pending for the task's next await
            return "timed out", time.monotonic() - started
        return "done", time.monotonic() - started

    quick = asyncio.create_task(call(0.0, 0.05))  # arms the shared timer for its own deadline
    late = [asyncio.create_task(call(start, 60)) for start in (0.1, 0.2)]
    cancelled = asyncio.create_task(call(0.0, 60))
    await asyncio.sleep(0.15)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert (await quick)[0] == "done"
    for task in late:
        outcome, took = await asyncio.wait_for(task, timeout=10)
        assert outcome == "timed out"
        assert 0.29 <= took < 5, took
    assert not deadlines._running  # nothing left behind
    assert deadlines._timer is None


async def test_a_call_that_raises_or_returns_under_a_deadline_does_as_it_would_without() -> None:
    async def fails(_: object) -> None:
        raise ValueError("its own error")

    async def doubles(value: int) -> int:
        return 2 * value

    deadlines = Deadlines(10)
    with pytest.raises(ValueError, match="its own error"):
        await deadlines.run(fails, None)
    assert await deadlines.run(doubles, 21) == 42


async def test_a_call_that_swallows_its_deadlines_cancellation_leaves_the_task_uncancelled() -> None:
    """A badly behaved operation that catches the cancellation and returns: its value is returned
    (as under asyncio.timeout), and the task's cancellation count is taken back, so a later
    deadline of the same task still ends in TimeoutError."""
    deadlines = Deadlines(0.1)

    async def stubborn(_: object) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            return "kept going"
        return "not reached"

    assert await deadlines.run(stubborn, None) == "kept going"
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    with pytest.raises(TimeoutError):
        await deadlines.run(asyncio.sleep, 60)


def test_deadlines_used_on_a_loop_that_closed_still_ring_on_the_next() -> None:
    """One Deadlines on two event loops in turn (the first closed with its timer still armed, as a
    test's or a restarted server's may): calls on the second are still timed out, not left to run."""
    deadlines = Deadlines(0.2)
    asyncio.run(deadlines.run(asyncio.sleep, 0.01))  # its timer, due in 0.2 s, dies with this loop

    async def slow() -> str:
        try:
            await deadlines.run(asyncio.sleep, 60)
        except TimeoutError:
            return "timed out"
        return "ran to the end"

    async def bounded() -> str:  # without the deadline, wait_for's own TimeoutError ends the test
        return await asyncio.wait_for(slow(), 10)

    assert asyncio.run(bounded()) == "timed out"
