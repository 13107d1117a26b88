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

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    free_failures: int  # failures allowed before any delay
    base_seconds: float
    cap_seconds: float
    forget_seconds: float  # failures older than this no longer count


PAIR = Rule(free_failures=5, base_seconds=1.0, cap_seconds=300.0, forget_seconds=900.0)
ADDRESS = Rule(free_failures=20, base_seconds=1.0, cap_seconds=300.0, forget_seconds=900.0)
ACCOUNT = Rule(free_failures=50, base_seconds=1.0, cap_seconds=60.0, forget_seconds=900.0)

_Key = tuple[str, str]


@dataclass
class _Counter:
    failures: int
    last: float
    in_flight: int = 0  # reserved attempts not yet finished, counted as failures meanwhile


class ThrottledError(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after:.1f} s")
        self.retry_after = retry_after


class Attempt:
    """A reserved login attempt. Finish it once: ``succeeded()`` or ``failed()``."""

    def __init__(self, throttle: LoginThrottle, user: str, address: str) -> None:
        self._throttle = throttle
        self._keys = throttle._keys(user, address)
        self._finished = False

    def succeeded(self) -> None:
        self._finish(failed=False)

    def failed(self) -> None:
        self._finish(failed=True)

    def _finish(self, failed: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self._throttle._finish(self._keys, failed)


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 100_000) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self._counters: dict[_Key, _Counter] = {}

    def _keys(self, user: str, address: str) -> list[tuple[_Key, Rule]]:
        return [(("pair", f"{user}\0{address}"), PAIR), (("address", address), ADDRESS), (("account", user), ACCOUNT)]

    def _live(self, key: _Key, rule: Rule, now: float) -> _Counter | None:
        """The counter, its failures zeroed once they are old enough to be forgotten."""
        counter = self._counters.get(key)
        if counter is not None and now - counter.last > rule.forget_seconds:
            counter.failures = 0
        return counter

    def retry_after(self, user: str, address: str) -> float:
        """Seconds to wait before this attempt may be checked; 0 when it may go ahead."""
        now = self.clock()
        wait = 0.0
        for key, rule in self._keys(user, address):
            counter = self._live(key, rule, now)
            if counter is None:
                continue
            excess = counter.failures + counter.in_flight - rule.free_failures
            if excess >= 0:
                delay = min(rule.cap_seconds, rule.base_seconds * 2**excess)
                wait = max(wait, counter.last + delay - now)
        return max(0.0, wait)

    def reserve(self, user: str, address: str) -> Attempt:
        """Lets an attempt go ahead, counted as a failure until finished; raises ThrottledError when
        it must wait. Nothing awaits between the check and the reservation."""
        wait = self.retry_after(user, address)
        if wait > 0:
            raise ThrottledError(wait)
        now = self.clock()
        if len(self._counters) > self.max_entries:  # bounded memory under a spray of names
            self._forget_old(now)
        for key, _ in self._keys(user, address):
            counter = self._counters.setdefault(key, _Counter(0, now))
            counter.in_flight += 1
            counter.last = now
        return Attempt(self, user, address)

    def _finish(self, keys: list[tuple[_Key, Rule]], failed: bool) -> None:
        now = self.clock()
        for key, rule in keys:
            counter = self._live(key, rule, now)
            if counter is None:
                continue
            counter.in_flight = max(0, counter.in_flight - 1)
            if failed:
                counter.failures += 1
                counter.last = now
            elif key[0] == "pair":
                counter.failures = 0  # this user got in from here; other users' failures stay

    def _forget_old(self, now: float) -> None:
        horizon = max(PAIR.forget_seconds, ADDRESS.forget_seconds, ACCOUNT.forget_seconds)
        self._counters = {k: c for k, c in self._counters.items() if c.in_flight or now - c.last <= horizon}


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
    open; further addresses share one window under the address ``OVERFLOW``."""

    OVERFLOW = "(other addresses)"

    def __init__(
        self, interval_seconds: float = 60.0, max_keys: int = 1000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_seconds = interval_seconds
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
            key = (action, reason, self.OVERFLOW)
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
