"""Failed-login throttling with capped exponential backoff, and the digest of failed authentications.

Three counters: per (user, client IP), per client IP and per user. The pair is throttled soonest,
so a guesser at one account is slowed at once; the per-user counter has a high threshold and a
short cap, so an attacker spraying one victim's account from many addresses slows it down but
cannot lock the victim out for good.

An attempt is reserved before its password is verified and counts as a failure while it runs, so
guesses sent all at once are limited as if they came one after the other. A success clears only
its own (user, address) pair: the per-address counter keeps the failures of every account tried
from that address, so an attacker's own good login does not wipe its guesses at others.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Rule:
    free_failures: int  # failures allowed before any delay
    base_seconds: float
    cap_seconds: float
    forget_seconds: float  # failures older than this no longer count


PAIR = Rule(free_failures=5, base_seconds=1.0, cap_seconds=300.0, forget_seconds=900.0)
ADDRESS = Rule(free_failures=20, base_seconds=1.0, cap_seconds=300.0, forget_seconds=900.0)
ACCOUNT = Rule(free_failures=50, base_seconds=1.0, cap_seconds=60.0, forget_seconds=900.0)

# An attempt still "in flight" after this long was cut off (a replica died mid-check): it no
# longer counts, so a crash cannot leave an account throttled for good.
IN_FLIGHT_STALE_SECONDS = 60.0


@dataclass
class Counter:
    failures: int
    last: float
    # When each reserved attempt not yet finished began: they count as failures meanwhile, each
    # until it finishes or is too old to be running (its replica died, its finish was lost).
    attempts: list[float] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return len(self.attempts)


class ThrottledError(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after:.1f} s")
        self.retry_after = retry_after


class CounterStore(Protocol):
    """Where the counters live: this process (one replica) or the shared database (several).
    ``locked`` hands out the counters of ``keys`` that exist; what the block adds or changes in
    that dict is kept when it ends without an error, and nobody else sees them meanwhile."""

    def locked(self, keys: Iterable[str]) -> AbstractAsyncContextManager[dict[str, Counter]]: ...
    async def forget_older_than(self, horizon: float) -> int: ...


class MemoryCounters:
    """The counters of one process. Nothing awaits inside ``locked``, so on one event loop a check
    and its reservation cannot interleave with another's."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._counters: dict[str, Counter] = {}

    @contextlib.asynccontextmanager
    async def locked(self, keys: Iterable[str]) -> AsyncIterator[dict[str, Counter]]:
        view = {key: self._counters[key] for key in keys if key in self._counters}
        yield view
        self._counters.update(view)
        if len(self._counters) > self.max_entries:  # bounded memory under a spray of names
            horizon = max(PAIR.forget_seconds, ADDRESS.forget_seconds, ACCOUNT.forget_seconds)
            newest = max(counter.last for counter in self._counters.values())
            self._counters = {k: c for k, c in self._counters.items() if c.in_flight or newest - c.last <= horizon}

    async def forget_older_than(self, horizon: float) -> int:
        old = [k for k, c in self._counters.items() if c.last < horizon and not c.in_flight]
        for key in old:
            del self._counters[key]
        return len(old)


class Attempt:
    """A reserved login attempt. Finish it once: ``succeeded()`` or ``failed()``."""

    def __init__(self, throttle: LoginThrottle, user: str, address: str) -> None:
        self._throttle = throttle
        self._keys = throttle._keys(user, address)
        self._finished = False

    async def succeeded(self) -> None:
        await self._finish(failed=False)

    async def failed(self) -> None:
        await self._finish(failed=True)

    async def _finish(self, failed: bool) -> None:
        if self._finished:
            return
        self._finished = True
        await self._throttle._finish(self._keys, failed)


class LoginThrottle:
    def __init__(self, counters: CounterStore | None = None, clock: Callable[[], float] = time.time) -> None:
        # Wall-clock time: with shared counters, every replica must read the same clock.
        self.counters: CounterStore = counters or MemoryCounters()
        self.clock = clock

    @staticmethod
    def _keys(user: str, address: str) -> list[tuple[str, Rule]]:
        # JSON-quoted: unambiguous, and with no NUL byte (which a database's text refuses).
        quoted_user, quoted_address = json.dumps(user), json.dumps(address)
        return [
            (f"pair:{quoted_user}@{quoted_address}", PAIR),
            (f"address:{quoted_address}", ADDRESS),
            (f"account:{quoted_user}", ACCOUNT),
        ]

    @staticmethod
    def _live(counter: Counter | None, rule: Rule, now: float) -> Counter | None:
        """The counter, its failures zeroed once they are old enough to be forgotten and its
        in-flight attempts dropped once they are too old to be running."""
        if counter is not None and now - counter.last > rule.forget_seconds:
            counter.failures = 0
        if counter is not None and counter.attempts and now - min(counter.attempts) > IN_FLIGHT_STALE_SECONDS:
            counter.attempts = [at for at in counter.attempts if now - at <= IN_FLIGHT_STALE_SECONDS]
        return counter

    def _wait(self, keys: list[tuple[str, Rule]], counters: dict[str, Counter], now: float) -> float:
        wait = 0.0
        for key, rule in keys:
            counter = self._live(counters.get(key), rule, now)
            if counter is None:
                continue
            excess = counter.failures + counter.in_flight - rule.free_failures
            if excess >= 0:
                delay = min(rule.cap_seconds, rule.base_seconds * 2**excess)
                wait = max(wait, counter.last + delay - now)
        return max(0.0, wait)

    async def retry_after(self, user: str, address: str) -> float:
        """Seconds to wait before this attempt may be checked; 0 when it may go ahead."""
        keys = self._keys(user, address)
        async with self.counters.locked(key for key, _ in keys) as counters:
            return self._wait(keys, counters, self.clock())

    async def reserve(self, user: str, address: str) -> Attempt:
        """Lets an attempt go ahead, counted as a failure until finished; raises ThrottledError when
        it must wait. The check and the reservation happen under one lock of the counters."""
        keys = self._keys(user, address)
        peek = getattr(self.counters, "peek", None)
        if peek is not None:  # shared counters: refuse what must wait without taking a lock
            wait = self._wait(keys, await peek(key for key, _ in keys), self.clock())
            if wait > 0:
                raise ThrottledError(wait)
        async with self.counters.locked(key for key, _ in keys) as counters:
            now = self.clock()
            wait = self._wait(keys, counters, now)
            if wait <= 0:
                for key, _ in keys:
                    counter = counters.setdefault(key, Counter(0, now))
                    counter.attempts.append(now)
                    counter.last = now
        if wait > 0:  # raised outside the block: the counters' transaction ends normally
            raise ThrottledError(wait)
        return Attempt(self, user, address)

    async def purge_forgotten(self) -> int:
        """Drops counters whose failures are all forgotten and whose attempts are all over."""
        longest = max(PAIR.forget_seconds, ADDRESS.forget_seconds, ACCOUNT.forget_seconds, IN_FLIGHT_STALE_SECONDS)
        return await self.counters.forget_older_than(self.clock() - longest)

    async def _finish(self, keys: list[tuple[str, Rule]], failed: bool) -> None:
        async with self.counters.locked(key for key, _ in keys) as counters:
            now = self.clock()
            for key, rule in keys:
                counter = self._live(counters.get(key), rule, now)
                if counter is None:
                    continue
                if counter.attempts:
                    counter.attempts.remove(min(counter.attempts))
                if failed:
                    counter.failures += 1
                    counter.last = now
                elif key.startswith("pair:"):
                    counter.failures = 0  # this user got in from here; other users' failures stay


@dataclass
class _Window:
    start: float
    repeated: int = 0  # failures after the first one, which was recorded on its own


@dataclass(frozen=True)
class FailureSummary:
    action: str
    reason: str
    address: str
    repeated: int


class FailureDigest:
    """Failed authentications (bad tokens, refused refreshes) summed per (action, reason, address)
    over ``interval_seconds``: the first of a window is recorded at once, the rest only counted
    and recorded as one summary when the window ends. A flood of garbage then costs one audit
    record per key and window instead of an fsync per request. At most ``max_keys`` windows are
    open; further addresses share one window under the address ``overflow``. (Refusals by a rate
    limit are summed the same way, per operation, limit and caller: see LIMIT_REFUSALS.)"""

    OVERFLOW = "(other addresses)"

    def __init__(
        self,
        interval_seconds: float = 60.0,
        max_keys: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        overflow: str = OVERFLOW,
    ) -> None:
        self.interval_seconds = interval_seconds
        self.overflow = overflow
        self.max_keys = max_keys
        self.clock = clock
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._ended: list[FailureSummary] = []
        self._next_end = float("inf")

    def add(self, action: str, reason: str, address: str) -> bool:
        """Counts a failure; True when it is the first of its window and is to be recorded now."""
        now = self.clock()
        key = (action, reason, address)
        if key not in self._windows and len(self._windows) >= self.max_keys:
            key = (action, reason, self.overflow)
        window = self._windows.get(key)
        if window is not None and now - window.start >= self.interval_seconds:
            self._end(key, window)
            window = None
        if window is None:
            self._windows[key] = _Window(now)
            self._next_end = min(self._next_end, now + self.interval_seconds)
            return True
        window.repeated += 1
        return False

    def take(self, everything: bool = False) -> list[FailureSummary]:
        """The summaries of the windows that ended (all of them, with ``everything``)."""
        now = self.clock()
        if everything or now >= self._next_end:
            for key, window in list(self._windows.items()):
                if everything or now - window.start >= self.interval_seconds:
                    self._end(key, window)
            self._next_end = min(
                (w.start + self.interval_seconds for w in self._windows.values()), default=float("inf")
            )
        ended, self._ended = self._ended, []
        return ended

    def _end(self, key: tuple[str, str, str], window: _Window) -> None:
        del self._windows[key]
        if window.repeated:
            self._ended.append(FailureSummary(*key, window.repeated))
