"""spec.limits through HTTP: requests a minute and tokens an hour or a day, per caller and for the
agent; 429 with a Retry-After a retry can trust, an audit record and metrics; windows that slide and
roll over on an injected clock (no sleeps); and, on a real PostgreSQL, two runtimes that count as one.

The chat here is a stand-in operation named ``chat`` (what the limiter treats as spending tokens)
that spends a fixed number of tokens through the app's limiter, for the caller in ``CALLER``, as the
real chat does once its model has answered."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent_contract.config import CircuitBreakerConfig, RuntimeConfig
from agent_contract.operations import CHAT
from agent_runtime.app import create_app
from agent_runtime.limits import (
    CALLER,
    DAY,
    HOUR,
    LIMITER,
    Count,
    Limiter,
    MemoryLimitCounters,
    PostgresLimitCounters,
    Slot,
    wait_seconds,
)
from agent_runtime.metrics import RuntimeMetrics
from agent_runtime.operations import BUILTINS, Operation
from agent_runtime.resilience import CircuitBreaker
from agent_runtime.security.throttle import FailureDigest
from agent_runtime.settings import Settings, SettingsError
from agent_runtime.sharedstate import PostgresEngine, StateUnavailableError
from agent_runtime.state import AUDIT, LIMIT_REFUSALS
from eao_devtools.testkit.postgres import PostgresServer
from tests.runtime.conftest import MATRIX_OPERATIONS, AppFactory, fresh_database, login, make_layout

Client = TestClient[web.Request, web.Application]
T0 = 1_699_920_000.0  # a UTC midnight (and so a whole hour and minute): every window starts here
TOKENS_PER_CHAT = 60
CHAT_BODY = {"input": {"messages": [{"role": "user", "content": "hello"}]}}


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fake_chat(app_of: dict[str, web.Application]) -> Operation:
    async def handler(_: Any) -> dict[str, Any]:
        await app_of["app"][LIMITER].spend_tokens(CALLER.get(), TOKENS_PER_CHAT)
        return {"content": "hi", "caller": CALLER.get()}

    return Operation.builtin(CHAT, handler)


async def limited_client(make_client: AppFactory, limits: dict[str, Any]) -> tuple[Client, Clock]:
    """A runtime with ``limits``, ping and the stand-in chat enabled, its limiter on a clock we move."""
    app_of: dict[str, web.Application] = {}
    client = await make_client(
        extra_operations={"chat": fake_chat(app_of)}, securityLevel="confidential", limits=limits
    )
    app_of["app"] = client.app
    clock = Clock()
    client.app[LIMITER].clock = clock
    return client, clock


async def bearer(client: Client, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {(await login(client, user))['access_token']}"}


async def ping(client: Client, headers: dict[str, str]) -> Any:
    return await client.post("/v1/operations/ping", json={}, headers=headers)


async def chat(client: Client, headers: dict[str, str]) -> Any:
    return await client.post("/v1/operations/chat", json=CHAT_BODY, headers=headers)


async def refusal(response: Any, limit: str) -> int:
    """Asserts a 429 naming ``limit``; returns its Retry-After."""
    body = await response.json()
    assert response.status == 429, body
    assert (body["code"], body["limit"]) == ("limit_exceeded", limit), body
    assert body["message"].startswith(f"spec.limits.{limit}:"), body
    assert body["request_id"] == response.headers["X-Request-ID"]
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit(), retry_after
    assert int(retry_after) >= 1
    return int(retry_after)


async def metric_lines(client: Client, name: str) -> list[str]:
    text = await (await client.get("/metrics")).text()
    return [line for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]


# --- requests a minute --------------------------------------------------------------------------------


async def test_the_request_over_the_limit_is_429_with_a_retry_after_that_holds_and_is_audited(
    make_client: AppFactory,
) -> None:
    client, clock = await limited_client(make_client, {"perCaller": {"requestsPerMinute": 3}})
    otto = await bearer(client, "otto")
    for _ in range(3):
        assert (await ping(client, otto)).status == 200
    clock.now = T0 + 10
    retry_after = await refusal(await ping(client, otto), "perCaller.requestsPerMinute")
    # Sliding: the 3 of this minute decay over the next one; 1 fits again once they weigh 2 or less,
    # 20 s into it (a fixed window would admit 3 more at once at the minute, 50 s from now).
    assert retry_after == 70
    clock.now = T0 + 10 + retry_after - 1
    await refusal(await ping(client, otto), "perCaller.requestsPerMinute")
    clock.now = T0 + 10 + retry_after
    assert (await ping(client, otto)).status == 200
    await refusal(await ping(client, otto), "perCaller.requestsPerMinute")  # and only the one

    admin = await bearer(client, "ada")
    records = (await (await client.get("/v1/audit?type=operation", headers=admin)).json())["records"]
    # The first refusal of the minute is recorded; the other two are counted (and summed later).
    [refused] = [r for r in records if r["result"] == "rate_limited"]
    assert (refused["actor"], refused["action"]) == ("otto", "ping")
    assert refused["details"] == {"limit": "perCaller.requestsPerMinute", "retry_after_seconds": 70}


async def test_a_flood_of_refusals_costs_one_audit_record_per_caller_limit_and_window(
    make_client: AppFactory,
) -> None:
    """A client hammering past its limit must not cost an fsynced audit record per request: the
    first refusal of each (operation, limit, caller) in a window is recorded, the rest counted in the
    metrics and recorded as one summary when the window ends, or at shutdown."""
    client, _ = await limited_client(make_client, {"perCaller": {"requestsPerMinute": 1}})
    digest: FailureDigest = client.app[LIMIT_REFUSALS]
    digest.clock = window = Clock(0.0)
    otto, ana = await bearer(client, "otto"), await bearer(client, "ana")
    assert [(await ping(client, caller)).status for caller in (otto, ana)] == [200, 200]
    for _ in range(30):
        await refusal(await ping(client, otto), "perCaller.requestsPerMinute")
    for _ in range(5):
        await refusal(await ping(client, ana), "perCaller.requestsPerMinute")

    def refusals() -> list[tuple[str, Any]]:
        records = client.app[AUDIT].recent
        return [(r["actor"], r["details"].get("repeated")) for r in records if r["result"] == "rate_limited"]

    assert refusals() == [("otto", None), ("ana", None)]
    found = await metric_lines(client, "agent_operations_total")
    assert 'agent_operations_total{operation="ping",result="rate_limited"} 35.0' in found
    window.now += digest.interval_seconds  # the window ends: the next refusal writes its summaries first
    await refusal(await ping(client, otto), "perCaller.requestsPerMinute")
    assert refusals()[2:] == [("otto", 29), ("ana", 4), ("otto", None)]
    summary = next(r for r in client.app[AUDIT].recent if r["details"].get("repeated") == 29)
    assert (summary["action"], summary["type"]) == ("ping", "operation")
    assert summary["details"] == {"limit": "perCaller.requestsPerMinute", "repeated": 29, "window_seconds": 60.0}
    for _ in range(3):
        await refusal(await ping(client, otto), "perCaller.requestsPerMinute")
    await client.close()  # what is still counted at shutdown is written too
    assert refusals()[-1] == ("otto", 3)


async def test_a_per_caller_limit_spares_other_callers_and_a_per_agent_limit_does_not(
    make_client: AppFactory,
) -> None:
    client, _ = await limited_client(
        make_client, {"perCaller": {"requestsPerMinute": 2}, "perAgent": {"requestsPerMinute": 3}}
    )
    otto, ana = await bearer(client, "otto"), await bearer(client, "ana")
    assert [(await ping(client, otto)).status for _ in range(2)] == [200, 200]
    for _ in range(3):  # refused by its own limit: not counted against the agent's
        await refusal(await ping(client, otto), "perCaller.requestsPerMinute")
    assert (await ping(client, ana)).status == 200  # another caller: its own 2
    await refusal(await ping(client, ana), "perAgent.requestsPerMinute")  # but the agent's 3 are used
    # A refusal by the agent's limit does not count against the caller's either.
    assert (await metric_lines(client, "agent_limit_exceeded_total")) == [
        'agent_limit_exceeded_total{limit="requests_per_minute",scope="caller"} 3.0',
        'agent_limit_exceeded_total{limit="requests_per_minute",scope="agent"} 1.0',
    ]


async def test_without_limits_nothing_is_refused_or_counted(make_client: AppFactory) -> None:
    client = await make_client()
    otto = await bearer(client, "otto")
    statuses = await asyncio.gather(*(ping(client, otto) for _ in range(50)))
    assert {response.status for response in statuses} == {200}
    assert await metric_lines(client, "agent_limit") == []  # absent: unlimited
    assert await metric_lines(client, "agent_limit_exceeded_total") == []


async def test_concurrent_requests_are_admitted_up_to_the_limit_exactly(make_client: AppFactory) -> None:
    client, _ = await limited_client(make_client, {"perAgent": {"requestsPerMinute": 7}})
    otto = await bearer(client, "otto")
    statuses = sorted(r.status for r in await asyncio.gather(*(ping(client, otto) for _ in range(20))))
    assert statuses == [200] * 7 + [429] * 13


async def test_other_routes_are_not_rate_limited(make_client: AppFactory) -> None:
    client, _ = await limited_client(make_client, {"perCaller": {"requestsPerMinute": 1}})
    otto = await bearer(client, "otto")
    assert (await ping(client, otto)).status == 200
    await refusal(await ping(client, otto), "perCaller.requestsPerMinute")
    for _ in range(5):  # reading consents, an authenticated route that is not an operation
        assert (await client.get("/v1/gdpr/consents/jane@example.com", headers=otto)).status in (200, 404)


# --- tokens an hour and a day -------------------------------------------------------------------------


async def test_chat_is_refused_once_the_hourly_budget_is_spent_until_it_has_slid_away(
    make_client: AppFactory,
) -> None:
    client, clock = await limited_client(make_client, {"perCaller": {"tokensPerHour": 100}})
    otto, ana = await bearer(client, "otto"), await bearer(client, "ana")
    first = await chat(client, otto)
    assert first.status == 200, await first.text()
    assert (await first.json())["result"]["caller"] == "otto"  # CALLER is the token's subject
    assert (await chat(client, otto)).status == 200  # 60 spent, 40 left: admitted, and overshoots
    clock.now = T0 + 100
    retry_after = await refusal(await chat(client, otto), "perCaller.tokensPerHour")
    # 120 spent this hour: next hour they decay, and 1 token fits once they weigh 99 or less.
    assert retry_after == (HOUR - 100) + 630  # 120 * (1 - 630 / 3600) = 99
    assert (await ping(client, otto)).status == 200  # a budget of tokens limits only chat
    assert (await chat(client, ana)).status == 200  # another caller's budget
    clock.now = T0 + 100 + retry_after - 1
    await refusal(await chat(client, otto), "perCaller.tokensPerHour")
    clock.now = T0 + 100 + retry_after
    assert (await chat(client, otto)).status == 200
    clock.now = T0 + 3 * HOUR  # two whole hours later nothing is left of any of it
    assert (await chat(client, otto)).status == 200
    assert (await chat(client, otto)).status == 200


async def test_the_agents_daily_budget_refuses_every_caller_and_its_spend_is_a_gauge(
    make_client: AppFactory,
) -> None:
    client, clock = await limited_client(make_client, {"perAgent": {"tokensPerDay": 1000}})
    otto, ana = await bearer(client, "otto"), await bearer(client, "ana")
    assert (await chat(client, otto)).status == 200
    await client.app[LIMITER].spend_tokens("someone-else", 900)  # spent by other calls meanwhile
    assert (await metric_lines(client, "agent_tokens_spent")) == [
        'agent_tokens_spent{window="hour"} 960.0',
        'agent_tokens_spent{window="day"} 960.0',
    ]
    assert (await chat(client, ana)).status == 200  # 40 tokens of the day left: admitted
    for caller in (otto, ana):
        await refusal(await chat(client, caller), "perAgent.tokensPerDay")
    assert await metric_lines(client, "agent_limit") == ['agent_limit{limit="tokens_per_day",scope="agent"} 1000.0']
    assert await metric_lines(client, "agent_limit_exceeded_total") == [
        'agent_limit_exceeded_total{limit="tokens_per_day",scope="agent"} 2.0'
    ]
    clock.now = T0 + HOUR + 1800  # the hour's gauge slides on with the clock, the day's has not moved
    hour, day = await metric_lines(client, "agent_tokens_spent")
    assert (hour, day) == ('agent_tokens_spent{window="hour"} 510.0', 'agent_tokens_spent{window="day"} 1020.0')
    text = await (await client.get("/metrics")).text()
    assert "otto" not in text  # no per-caller series: callers are unbounded
    assert "caller=" not in text


async def test_requests_and_tokens_both_apply_to_chat(make_client: AppFactory) -> None:
    client, _ = await limited_client(
        make_client, {"perCaller": {"requestsPerMinute": 5, "tokensPerHour": 150, "tokensPerDay": 10_000}}
    )
    otto = await bearer(client, "otto")
    assert [(await chat(client, otto)).status for _ in range(3)] == [200, 200, 200]  # 180 tokens now
    await refusal(await chat(client, otto), "perCaller.tokensPerHour")
    # The budget refused it before it was counted as a request: 2 requests of the 5 are left.
    assert [(await ping(client, otto)).status for _ in range(2)] == [200, 200]
    await refusal(await ping(client, otto), "perCaller.requestsPerMinute")


# --- the algorithm, and memory --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "elapsed", "limit", "expected"),
    [
        (Count(0, 0, 2), 10, 3, 0.0),  # room for one
        (Count(0, 0, 3), 10, 3, 50 + 20),  # this window is full: the next, once 3 weigh 2
        (Count(0, 6, 1), 30, 6, 0.0),  # 6 * 0.5 + 1 = 4, and one more is 5 <= 6: admitted
        (Count(0, 6, 2), 0, 6, 60 * (1 - 3 / 6)),  # the previous window must decay to 3
        (Count(0, 5, 0), 0, 1, 60.0),  # a limit of 1: all 5 must be gone
        (Count(-5, 100, 100), 0, 3, 0.0),  # windows long over count nothing
    ],
)
def test_retry_after_is_when_the_estimate_admits_one_more(
    count: Count, elapsed: float, limit: int, expected: float
) -> None:
    assert wait_seconds(count, elapsed, 60, limit) == pytest.approx(expected)


async def test_memory_counters_forget_windows_that_are_over_and_stay_bounded() -> None:
    counters = MemoryLimitCounters(max_entries=50)
    config = RuntimeConfig.model_validate({"agentName": "a", "limits": {"perCaller": {"requestsPerMinute": 5}}})
    clock = Clock()
    limiter = Limiter(config, counters, RuntimeMetrics(), clock=clock)
    for caller in range(40):
        await limiter.admit_request(f"caller-{caller}")
    assert len(counters) == 40
    clock.now += 60  # the previous window still counts
    await limiter.admit_request("caller-0")
    assert len(counters) == 40
    clock.now += 60  # both windows of the 39 others are over
    await limiter.admit_request("someone")
    assert len(counters) == 2  # caller-0's window is now the previous one and still weighs
    for caller in range(1000):  # a thousand callers in one minute: the least recent are forgotten
        await limiter.admit_request(f"many-{caller}")
    assert len(counters) == 50
    clock.now += 3 * DAY
    assert await limiter.purge() == 50
    assert len(counters) == 0


# --- bad configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "named"),
    [
        ({"perCaller": {"requestsPerMinute": 0}}, "limits.perCaller.requestsPerMinute"),
        ({"perCaller": {"requestsPerMinute": -5}}, "limits.perCaller.requestsPerMinute"),
        ({"perAgent": {"tokensPerHour": 0}}, "limits.perAgent.tokensPerHour"),
        ({"perAgent": {"tokensPerDay": -1}}, "limits.perAgent.tokensPerDay"),
        ({"perAgent": {"tokensPerDay": 2.5}}, "limits.perAgent.tokensPerDay"),
        ({"perAgent": {"tokensPerDay": "lots"}}, "limits.perAgent.tokensPerDay"),
        ({"perAgent": {"requestsPerSecond": 5}}, "limits.perAgent.requestsPerSecond"),
    ],
)
def test_a_limit_that_is_not_a_positive_integer_is_refused_naming_the_field(
    tmp_path: Path, limits: dict[str, Any], named: str
) -> None:
    config_file = make_layout(tmp_path / "agent")
    data = yaml.safe_load(config_file.read_text())
    config_file.write_text(yaml.safe_dump({**data, "limits": limits}))
    with pytest.raises(SettingsError) as refused:
        Settings.load(str(config_file), env={})
    assert named in str(refused.value)


# --- two runtimes on one PostgreSQL ---------------------------------------------------------------------


async def shared_runtimes(
    aiohttp_client: Any, tmp_path: Path, url: str, limits: dict[str, Any], count: int = 2
) -> tuple[list[Client], Clock]:
    """``count`` replicas of one agent on one database, their limiters on one clock."""
    config_file = make_layout(tmp_path / "agent", extra_names=["chat"], securityLevel="confidential", limits=limits)
    config = RuntimeConfig.from_yaml(config_file.read_text())
    clock, clients = Clock(), []
    for index in range(count):
        app_of: dict[str, web.Application] = {}  # each replica's chat spends through its own limiter
        catalogue = {**BUILTINS, **MATRIX_OPERATIONS, "chat": fake_chat(app_of)}
        settings = Settings(config.model_copy(update={"data_dir": str(tmp_path / f"data-{index}")}), database_url=url)
        client: Client = await aiohttp_client(create_app(settings, catalogue))
        app_of["app"] = client.app
        client.app[LIMITER].clock = clock
        clients.append(client)
    return clients, clock


async def test_two_runtimes_on_one_database_count_as_one(
    aiohttp_client: Any, tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await fresh_database(postgres)
    (a, b), clock = await shared_runtimes(
        aiohttp_client, tmp_path, url, {"perAgent": {"requestsPerMinute": 4}, "perCaller": {"tokensPerHour": 100}}
    )
    otto_a, otto_b = await bearer(a, "otto"), await bearer(b, "otto")
    assert (await chat(a, otto_a)).status == 200  # a request, and 60 tokens
    assert (await chat(a, otto_a)).status == 200  # another, and 120 tokens
    retry_after = await refusal(await chat(b, otto_b), "perCaller.tokensPerHour")  # spent on A, refused on B
    assert retry_after == HOUR + 630
    assert (await ping(b, otto_b)).status == 200  # the agent's 3rd request
    assert (await ping(a, otto_a)).status == 200  # its 4th
    clock.now = T0 + 15
    retry_after = await refusal(await ping(b, otto_b), "perAgent.requestsPerMinute")
    assert retry_after == 45 + 15  # 4 * (1 - 15 / 60) = 3
    # B's gauge shows the agent's spend, made on A (read when B checked the budget).
    assert 'agent_tokens_spent{window="hour"} 120.0' in await metric_lines(b, "agent_tokens_spent")


async def test_replicas_admitting_at_once_never_exceed_the_shared_limit(
    aiohttp_client: Any, tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await fresh_database(postgres)
    replicas, _ = await shared_runtimes(
        aiohttp_client,
        tmp_path,
        url,
        {"perCaller": {"requestsPerMinute": 10}, "perAgent": {"requestsPerMinute": 12}},
        count=3,
    )
    otto = [await bearer(replica, "otto") for replica in replicas]
    ana = [await bearer(replica, "ana") for replica in replicas]
    calls = [ping(replicas[i % 3], (otto if i % 2 else ana)[i % 3]) for i in range(60)]
    statuses = sorted(response.status for response in await asyncio.gather(*calls))
    assert statuses == [200] * 12 + [429] * 48
    rows = await asyncpg_rows(url, "SELECT key, current FROM limit_windows ORDER BY key")
    counted = {key.split(":")[0]: 0 for key, _ in rows}
    for key, current in rows:
        counted[key.split(":")[0]] += current
    # All or nothing: the agent's 12 are exactly the callers' 12, none of the refused counted anywhere.
    assert counted == {"agent": 12, "caller": 12}
    assert all("otto" not in key and "ana" not in key for key, _ in rows)  # digests, not names


async def asyncpg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    connection = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await connection.fetch(sql)]
    finally:
        await connection.close()


async def test_shared_counters_roll_over_and_are_purged_and_fail_closed(postgres: PostgresServer) -> None:
    engine = PostgresEngine(await fresh_database(postgres), CircuitBreaker("database", CircuitBreakerConfig()))
    await engine.open()
    config = RuntimeConfig.model_validate({"agentName": "a", "limits": {"perAgent": {"tokensPerHour": 100}}})
    clock = Clock()
    limiter = Limiter(config, PostgresLimitCounters(engine), RuntimeMetrics(), clock=clock)
    try:
        await limiter.spend_tokens("otto", 150)
        clock.now = T0 + HOUR + HOUR / 2  # half of last hour's 150 still weighs
        assert limiter.agent_spend(HOUR) == 75
        await limiter.admit_tokens("otto")
        await limiter.spend_tokens("otto", 30)
        (count,) = (
            await PostgresLimitCounters(engine).read([Slot(limiter.spend_slots[HOUR].key, HOUR)], clock.now)
        ).values()
        assert count == Count(int(clock.now // HOUR), 150, 30)  # rolled once, then added to
        clock.now = T0 + 4 * DAY
        assert await limiter.purge() == 2  # the hour's and the day's rows
        assert await engine.fetch("SELECT count(*) FROM limit_windows", ()) == [(0,)]
    finally:
        await engine.close()
    with pytest.raises(StateUnavailableError):  # no database: refused, never admitted unchecked
        await limiter.admit_tokens("otto")
