"""Rate limits and token budgets (``spec.limits``): per caller (the token's subject) and for the
agent as a whole.

**Algorithm: a sliding window, approximated by two fixed windows** (the "sliding window counter").
Each limit has a window of W seconds (a minute for requests, an hour or a day for tokens), cut into
fixed windows aligned on the Unix epoch (whole minutes, hours, UTC days). Per key we keep the count
of the current fixed window and of the one before it; the count over the last W seconds is
estimated as ``previous * (1 - elapsed / W) + current`` (``elapsed``: seconds into the current
fixed window), i.e. the previous window's events taken as spread evenly over it. Unlike one fixed
window, a burst at a window's end plus one at the next window's start cannot reach twice the limit.

- A request is admitted while ``estimate + 1 <= requestsPerMinute`` and then counted; a refused one
  is not counted (a client that keeps retrying is not locked out for longer).
- A chat is admitted while at least one token of each budget is left (``estimate + 1 <= budget``);
  its tokens are counted when the model has answered (``spend_tokens``), so one call can overshoot.
  Until then it **holds** its most (its input and its max_tokens) against both budgets in this
  process: calls in progress count as spent for the next admission, so parallel calls cannot all
  be admitted on tokens none of them has been charged yet. Refused only for what calls in progress
  hold, a caller may retry in ``HELD_RETRY_SECONDS``: they end, and give back what they did not use.
- **Retry-After** is the time until, with nothing more counted, the estimate has come down far
  enough to admit one more: within the current fixed window when the previous window's share is
  what is over, else in the next one, where the current count becomes the decaying previous.

**Where the counts live**: with ``DATABASE_URL``, in the shared PostgreSQL (every replica counts
against the same numbers; see ``PostgresLimitCounters``); otherwise in this process, in LRU tables
whose entries are dropped once both of their windows are over and, past ``max_entries``, least
recently used first, so that no number of callers grows memory without bound.

**Fail closed**: a limit that cannot be checked because the shared state is unreachable refuses the
request (``StateUnavailableError``, answered 503 like every other check that needs the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import NamedTuple, Protocol

from aiohttp import web

from agent_contract.config import RateLimit, RuntimeConfig
from agent_runtime.metrics import RuntimeMetrics
from agent_runtime.sharedstate import PostgresEngine, StateUnavailableError

log = logging.getLogger("agent_runtime")

# The authenticated caller (the token's subject) of the operation running in this task: set by
# operation_routes before the operation runs, read by operations that spend tokens.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller")

MINUTE, HOUR, DAY = 60, 3600, 86400
REFRESH_SECONDS = 15.0  # how often the spend gauges are re-read from the shared state
PURGE_SECONDS = 3600.0  # how often windows that are over are deleted
HELD_RETRY_SECONDS = 1.0  # Retry-After of a refusal for what calls in progress hold, not yet spent
# Rounding slack when comparing an estimate (a float) with a limit: at the instant Retry-After
# names, the estimate equals the threshold up to floating-point error, and must be admitted.
_SLACK = 1e-9


class LimitExceededError(Exception):
    """A rate limit or token budget refuses the request. ``limit`` names the limit as its field under
    ``spec.limits`` (``perCaller.requestsPerMinute``); ``retry_after_seconds``: when one more would be
    admitted, if nothing else is counted meanwhile."""

    def __init__(self, limit: str, retry_after_seconds: float, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_seconds = retry_after_seconds
        self.message = message


class Count(NamedTuple):
    """A key's two fixed windows: the number of the current one (time // W) and both counts."""

    window: int
    previous: int
    current: int

    def at(self, index: int) -> Count:
        """The same counts seen from fixed window ``index`` (rolled forward; a count a replica with
        a clock ahead of ours already rolled is taken as it is)."""
        if self.window >= index:
            return self
        if self.window == index - 1:
            return Count(index, self.current, 0)
        return Count(index, 0, 0)


class Slot(NamedTuple):
    key: str
    seconds: int  # the window


def estimate(count: Count, now: float, seconds: int) -> float:
    """The count over the last ``seconds`` seconds, as the two fixed windows estimate it."""
    index = int(now // seconds)
    rolled = count.at(index)
    elapsed = min(max(now - index * seconds, 0.0), seconds) if rolled.window == index else 0.0
    return rolled.previous * (1 - elapsed / seconds) + rolled.current


def wait_seconds(count: Count, now: float, seconds: int, limit: int) -> float:
    """Seconds from ``now`` until ``estimate + 1 <= limit`` with nothing more counted; 0: admitted now."""
    index = int(now // seconds)
    rolled = count.at(index)
    elapsed = min(max(now - index * seconds, 0.0), seconds) if rolled.window == index else 0.0
    room = limit - 1  # what the estimate must come down to
    slack = _SLACK * max(1, limit)
    if rolled.previous * (1 - elapsed / seconds) + rolled.current <= room + slack:
        return 0.0
    if rolled.current <= room:
        # In this window: previous * (1 - (elapsed + t) / W) + current = room.
        wait = seconds * (1 - (room - rolled.current) / rolled.previous) - elapsed
    else:
        # In the next window, where this one's count is the previous: current * (1 - t' / W) = room.
        wait = (seconds - elapsed) + seconds * (1 - room / rolled.current)
    # To the microsecond: a whole number of seconds must not round up to the next by float error.
    return max(round(wait, 6), 0.0)


class LimitCounters(Protocol):
    """Where the counts live: this process, or the shared state of every replica."""

    async def add(
        self, slots: Sequence[Slot], amount: int, now: float, check: Callable[[dict[str, Count]], None] | None
    ) -> dict[str, Count]:
        """Adds ``amount`` to each slot's current window and returns the counts after it. ``check``
        first sees the counts before it, all slots at once, and raises to add nothing at all."""
        ...

    async def read(self, slots: Sequence[Slot], now: float) -> dict[str, Count]: ...

    async def purge(self, now: float) -> int:
        """Forgets the keys whose windows are both over (their estimate is 0)."""
        ...


class MemoryLimitCounters:
    """The counts of one process, one LRU table per window length. Nothing awaits in ``add``, so a
    check and its increment cannot interleave with another request's on the event loop."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries  # per window length
        self._tables: dict[int, OrderedDict[str, Count]] = {}

    def _table(self, seconds: int, index: int) -> OrderedDict[str, Count]:
        table = self._tables.setdefault(seconds, OrderedDict())
        # Least recently counted first: those whose windows are both over go at once (amortised).
        while table:
            key, oldest = next(iter(table.items()))
            if oldest.window >= index - 1:
                break
            del table[key]
        return table

    async def add(
        self, slots: Sequence[Slot], amount: int, now: float, check: Callable[[dict[str, Count]], None] | None
    ) -> dict[str, Count]:
        before = {}
        for slot in slots:
            index = int(now // slot.seconds)
            stored = self._table(slot.seconds, index).get(slot.key)
            before[slot.key] = stored.at(index) if stored is not None else Count(index, 0, 0)
        if check is not None:
            check(before)
        after = {}
        for slot in slots:
            table = self._tables[slot.seconds]
            count = before[slot.key]
            table[slot.key] = after[slot.key] = Count(count.window, count.previous, count.current + amount)
            table.move_to_end(slot.key)
            if len(table) > self.max_entries:
                # More callers in two windows than the table holds: the least recently active is
                # forgotten (its count restarts), rather than memory growing without bound.
                table.popitem(last=False)
        return after

    async def read(self, slots: Sequence[Slot], now: float) -> dict[str, Count]:
        counts = {}
        for slot in slots:
            index = int(now // slot.seconds)
            stored = self._table(slot.seconds, index).get(slot.key)
            counts[slot.key] = stored.at(index) if stored is not None else Count(index, 0, 0)
        return counts

    async def purge(self, now: float) -> int:
        removed = 0
        for seconds, table in self._tables.items():
            size = len(table)
            self._table(seconds, int(now // seconds))
            removed += size - len(table)
        return removed

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())


class PostgresLimitCounters:
    """The counts in the shared PostgreSQL (table ``limit_windows``, migration 2 in sharedstate.py),
    one row per key holding its two fixed windows. One UPSERT rolls the windows forward, adds, and
    returns the counts, with the rows locked until the transaction ends: replicas counting at once
    are counted one after the other, and a refused request's increments are rolled back, on every
    key at once."""

    # Rolled to the caller's window, then added to. A row a replica with a clock ahead already
    # rolled further is added to as it is: a count is never reset by a clock that lags.
    _ADD = """
        INSERT INTO limit_windows AS w (key, window_index, previous, current, expires_at)
        SELECT t.key, t.window_index, 0, $4::bigint, (t.window_index + 2) * t.seconds
        FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS t (key, window_index, seconds)
        ORDER BY t.key
        ON CONFLICT (key) DO UPDATE SET
            previous = CASE WHEN w.window_index >= excluded.window_index THEN w.previous
                            WHEN w.window_index = excluded.window_index - 1 THEN w.current ELSE 0 END,
            current = CASE WHEN w.window_index >= excluded.window_index THEN w.current ELSE 0 END + excluded.current,
            window_index = greatest(w.window_index, excluded.window_index),
            expires_at = greatest(w.expires_at, excluded.expires_at)
        RETURNING key, window_index, previous, current
    """

    def __init__(self, engine: PostgresEngine) -> None:
        self.engine = engine

    async def add(
        self, slots: Sequence[Slot], amount: int, now: float, check: Callable[[dict[str, Count]], None] | None
    ) -> dict[str, Count]:
        ordered = sorted(set(slots))  # one lock order on every replica: no deadlock between them
        arguments = ([s.key for s in ordered], [int(now // s.seconds) for s in ordered], [s.seconds for s in ordered])
        async with self.engine.connection() as connection:
            if check is None:  # one statement: atomic on its own
                rows = await connection.fetch(self._ADD, *arguments, amount)
                return {row["key"]: Count(row["window_index"], row["previous"], row["current"]) for row in rows}
            async with connection.transaction():  # check raising rolls the increments back
                rows = await connection.fetch(self._ADD, *arguments, amount)
                after = {row["key"]: Count(row["window_index"], row["previous"], row["current"]) for row in rows}
                check({key: count._replace(current=count.current - amount) for key, count in after.items()})
                return after

    async def read(self, slots: Sequence[Slot], now: float) -> dict[str, Count]:
        rows = await self.engine.fetch(
            "SELECT key, window_index, previous, current FROM limit_windows WHERE key = ANY(?::text[])",
            ([slot.key for slot in slots],),
        )
        stored = {key: Count(index, previous, current) for key, index, previous, current in rows}
        counts = {}
        for slot in slots:
            index = int(now // slot.seconds)
            count = stored.get(slot.key)
            counts[slot.key] = count.at(index) if count is not None else Count(index, 0, 0)
        return counts

    async def purge(self, now: float) -> int:
        """In batches, each under the statement timeout however many callers the table holds."""
        removed = 0
        while True:
            rows = await self.engine.fetch(
                "DELETE FROM limit_windows WHERE key IN (SELECT key FROM limit_windows WHERE expires_at < ?"
                " LIMIT 1000 FOR UPDATE SKIP LOCKED) RETURNING 1",
                (now,),
            )
            removed += len(rows)
            if len(rows) < 1000:
                return removed


class Rule(NamedTuple):
    field: str  # under spec.limits: "perCaller.requestsPerMinute"
    scope: str  # "caller" or "agent"
    name: str  # the metrics' label: "requests_per_minute"
    seconds: int
    limit: int


_WINDOWS = (("requests_per_minute", "requestsPerMinute", MINUTE), ("tokens_per_hour", "tokensPerHour", HOUR),
            ("tokens_per_day", "tokensPerDay", DAY))  # fmt: skip


def _rules(scope: str, prefix: str, limits: RateLimit) -> list[Rule]:
    rules = []
    for name, field, seconds in _WINDOWS:
        value = getattr(limits, name)
        if value is not None:
            rules.append(Rule(f"{prefix}.{field}", scope, name, seconds, value))
    return rules


def _describe(rule: Rule) -> str:
    unit = "requests" if rule.name == "requests_per_minute" else "tokens"
    per = {MINUTE: "a minute", HOUR: "an hour", DAY: "a day"}[rule.seconds]
    whose = "for each caller" if rule.scope == "caller" else "for the agent"
    return f"spec.limits.{rule.field}: at most {rule.limit} {unit} {per} {whose}"


class Limiter:
    """The rate limits and token budgets of ``config.limits`` over ``counters``."""

    def __init__(
        self,
        config: RuntimeConfig,
        counters: LimitCounters,
        metrics: RuntimeMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Wall-clock time: the fixed windows are aligned on it, the same on every replica.
        self.counters = counters
        self.clock = clock
        self.metrics = metrics
        limits = config.limits
        caller_rules = _rules("caller", "perCaller", limits.per_caller)
        agent_rules = _rules("agent", "perAgent", limits.per_agent)
        self.request_rules = [r for r in caller_rules + agent_rules if r.name == "requests_per_minute"]
        self.token_rules = [r for r in caller_rules + agent_rules if r.name != "requests_per_minute"]
        self.agent = f"{config.namespace}/{config.agent_name}"
        # The agent's spend is always counted, budget or not: it is what agent_tokens_spent shows.
        self.spend_slots = {HOUR: Slot(self._key("agent", "", HOUR), HOUR), DAY: Slot(self._key("agent", "", DAY), DAY)}
        self._known: dict[str, Count] = {}  # the agent's spend as last read or written
        self._held: dict[str, int] = {}  # tokens held by calls in progress here, by budget key
        for rule in caller_rules + agent_rules:
            metrics.limit.labels(rule.scope, rule.name).set(rule.limit)
        metrics.tokens_spent.labels("hour").set_function(lambda: self.agent_spend(HOUR))
        metrics.tokens_spent.labels("day").set_function(lambda: self.agent_spend(DAY))

    def _key(self, scope: str, caller: str, seconds: int) -> str:
        kind = "requests" if seconds == MINUTE else "tokens"
        if scope == "agent":
            return f"agent:{self.agent}:{kind}:{seconds}"
        # A digest, not the subject: fixed length, storable whatever the subject holds, and no
        # user names in the shared table.
        digest = hashlib.blake2b(caller.encode(errors="surrogatepass"), digest_size=16).hexdigest()
        return f"caller:{digest}:{kind}:{seconds}"

    def _slot(self, rule: Rule, caller: str) -> Slot:
        return Slot(self._key(rule.scope, caller, rule.seconds), rule.seconds)

    def _check(self, rules: list[Rule], caller: str, counts: dict[str, Count], now: float) -> None:
        """Raises for the rule that keeps the caller waiting longest, if any refuses: counting what
        calls in progress here hold as spent, though only until they end (``HELD_RETRY_SECONDS``)."""
        refused = []
        for rule in rules:
            key = self._slot(rule, caller).key
            wait = wait_seconds(counts[key], now, rule.seconds, rule.limit)
            if wait == 0 and self._held.get(key):
                rolled = counts[key].at(int(now // rule.seconds))
                held = rolled._replace(current=rolled.current + self._held[key])
                if wait_seconds(held, now, rule.seconds, rule.limit) > 0:
                    refused.append((HELD_RETRY_SECONDS, rule, "calls in progress hold the rest; "))
                continue
            if wait > 0:
                refused.append((wait, rule, ""))
        if not refused:
            return
        wait, rule, held_note = max(refused, key=lambda item: item[0])
        for _, each, _ in refused:
            self.metrics.limit_exceeded.labels(each.scope, each.name).inc()
        raise LimitExceededError(rule.field, wait, f"{_describe(rule)}; {held_note}retry in {math.ceil(wait)} s")

    async def admit_request(self, caller: str) -> None:
        """Counts one request against each requestsPerMinute (the caller's and the agent's), all or
        none: a request refused by one limit is not counted against the other."""
        if not self.request_rules:
            return
        now = self.clock()
        slots = [self._slot(rule, caller) for rule in self.request_rules]
        await self.counters.add(slots, 1, now, lambda before: self._check(self.request_rules, caller, before, now))

    async def admit_tokens(self, caller: str) -> None:
        """Refuses while the caller's or the agent's spend over the last hour or day (and what
        calls in progress here hold) leaves less than one token of its budget. Counts nothing:
        ``spend_tokens`` does, once they are spent."""
        await self._admit_tokens(caller)

    async def _admit_tokens(self, caller: str) -> list[str]:
        """``admit_tokens``; the keys of the budgets checked."""
        if not self.token_rules:
            return []
        now = self.clock()
        slots = {self._slot(rule, caller) for rule in self.token_rules} | set(self.spend_slots.values())
        counts = await self.counters.read(sorted(slots), now)
        self._remember(counts)
        self._check(self.token_rules, caller, counts, now)
        return sorted({self._slot(rule, caller).key for rule in self.token_rules})

    @contextlib.asynccontextmanager
    async def holding_tokens(self, caller: str, tokens: int) -> AsyncIterator[None]:
        """Admits a model call (``admit_tokens``) and holds ``tokens``, its most, against the
        caller's and the agent's budgets until it ends: spend its tokens (``spend_tokens``) inside."""
        keys = await self._admit_tokens(caller)
        # No await between the check and the hold: the next admission on this loop sees it.
        for key in keys:
            self._held[key] = self._held.get(key, 0) + tokens
        try:
            yield
        finally:
            for key in keys:
                left = self._held[key] - tokens
                if left > 0:
                    self._held[key] = left
                else:
                    del self._held[key]  # only calls in progress: bounded by the bulkhead

    async def spend_tokens(self, caller: str, tokens: int) -> None:
        """Counts tokens a model call used against the caller's and the agent's budgets. Raises
        StateUnavailableError when the shared state cannot be reached (the spend is then lost)."""
        if tokens < 0:
            raise ValueError(f"tokens: must not be negative, got {tokens}")
        if tokens == 0:
            return
        slots = {self._slot(rule, caller) for rule in self.token_rules if rule.scope == "caller"}
        slots |= set(self.spend_slots.values())
        self._remember(await self.counters.add(sorted(slots), tokens, self.clock(), None))

    def _remember(self, counts: dict[str, Count]) -> None:
        for slot in self.spend_slots.values():
            if slot.key in counts:
                self._known[slot.key] = counts[slot.key]

    def agent_spend(self, seconds: int) -> float:
        """The agent's tokens over the last hour or day (the gauge): as last read or written here,
        decayed to now. With shared state, ``refresh`` brings in the other replicas' spend."""
        count = self._known.get(self.spend_slots[seconds].key)
        return estimate(count, self.clock(), seconds) if count is not None else 0.0

    async def refresh(self) -> None:
        self._remember(await self.counters.read(sorted(self.spend_slots.values()), self.clock()))

    async def purge(self) -> int:
        return await self.counters.purge(self.clock())


LIMITER = web.AppKey("limiter", Limiter)


async def upkeep(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: re-reads the agent's spend (the other replicas' too) for the gauges, and
    deletes the windows that are over. An unreachable database is tried again at the next turn."""

    async def loop() -> None:
        limiter = app[LIMITER]
        last_purge = -math.inf
        while True:
            try:
                await limiter.refresh()
                if time.monotonic() - last_purge >= PURGE_SECONDS:
                    await limiter.purge()
                    last_purge = time.monotonic()
            except StateUnavailableError as unavailable:
                log.warning("limit counters not refreshed: %s", unavailable)
            await asyncio.sleep(REFRESH_SECONDS)

    task = asyncio.create_task(loop(), name="limits-upkeep")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
