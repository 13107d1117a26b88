"""Failed-login throttling with capped exponential backoff.

Three counters: per (user, client IP), per client IP and per user. The pair is throttled soonest,
so a guesser at one account is slowed at once; the per-user counter has a high threshold and a
short cap, so an attacker spraying one victim's account from many addresses slows it down but
cannot lock the victim out for good; a success from an address resets that address's counters.
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


@dataclass
class _Counter:
    failures: int
    last: float


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 100_000) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self._counters: dict[tuple[str, str], _Counter] = {}

    def _keys(self, user: str, address: str) -> list[tuple[tuple[str, str], Rule]]:
        return [(("pair", f"{user}\0{address}"), PAIR), (("address", address), ADDRESS), (("account", user), ACCOUNT)]

    def retry_after(self, user: str, address: str) -> float:
        """Seconds to wait before this attempt may be checked; 0 when it may go ahead."""
        now = self.clock()
        wait = 0.0
        for key, rule in self._keys(user, address):
            counter = self._counters.get(key)
            if counter is None or now - counter.last > rule.forget_seconds:
                continue
            excess = counter.failures - rule.free_failures
            if excess >= 0:
                delay = min(rule.cap_seconds, rule.base_seconds * 2**excess)
                wait = max(wait, counter.last + delay - now)
        return max(0.0, wait)

    def failed(self, user: str, address: str) -> None:
        now = self.clock()
        if len(self._counters) > self.max_entries:  # bounded memory under a spray of names
            self._forget_old(now)
        for key, rule in self._keys(user, address):
            counter = self._counters.get(key)
            if counter is None or now - counter.last > rule.forget_seconds:
                self._counters[key] = _Counter(1, now)
            else:
                counter.failures += 1
                counter.last = now

    def succeeded(self, user: str, address: str) -> None:
        self._counters.pop(("pair", f"{user}\0{address}"), None)
        self._counters.pop(("address", address), None)

    def _forget_old(self, now: float) -> None:
        horizon = max(PAIR.forget_seconds, ADDRESS.forget_seconds, ACCOUNT.forget_seconds)
        self._counters = {k: c for k, c in self._counters.items() if now - c.last <= horizon}
