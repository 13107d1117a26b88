"""Failed-login throttling (reserved before the password check, per address behind trusted
proxies only) and resistance to user enumeration."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent_runtime.security import users as users_module
from agent_runtime.security.throttle import ACCOUNT, ADDRESS, PAIR, LoginThrottle
from agent_runtime.state import AUDIT, THROTTLE
from tests.runtime.conftest import PASSWORD, AppFactory


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _fail(throttle: LoginThrottle, user: str, address: str) -> None:
    await (await throttle.reserve(user, address)).failed()


async def test_throttle_backs_off_exponentially_with_a_cap() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(PAIR.free_failures):
        assert await throttle.retry_after("ada", "10.0.0.1") == 0
        await _fail(throttle, "ada", "10.0.0.1")
    waits = []
    for _ in range(12):
        wait = await throttle.retry_after("ada", "10.0.0.1")
        waits.append(wait)
        clock.now += wait  # the guesser waits as told, then guesses again
        await _fail(throttle, "ada", "10.0.0.1")
    assert waits[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(waits) == PAIR.cap_seconds
    clock.now += PAIR.forget_seconds + 1
    assert await throttle.retry_after("ada", "10.0.0.1") == 0  # old failures are forgotten


async def test_an_attacker_cannot_lock_the_victim_out_for_good() -> None:
    """Guesses from many addresses slow the account down, capped at a minute; the victim's own
    address is never blocked for longer than that."""
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock)
    for attempt in range(1000):
        clock.now += await throttle.retry_after("victim", f"198.51.100.{attempt % 250}")
        await _fail(throttle, "victim", f"198.51.100.{attempt % 250}")
    assert await throttle.retry_after("victim", "203.0.113.7") <= ACCOUNT.cap_seconds
    clock.now += ACCOUNT.cap_seconds
    assert await throttle.retry_after("victim", "203.0.113.7") == 0


def _frozen(client: TestClient[web.Request, web.Application]) -> FakeClock:
    """The app's throttle on a clock that stands still, so no backoff runs out mid-test."""
    clock = FakeClock()
    client.app[THROTTLE].clock = clock
    return clock


async def _login(
    client: TestClient[web.Request, web.Application], user: str, password: str, forwarded_for: str | None = None
) -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    response = await client.post("/v1/auth/login", json={"username": user, "password": password}, headers=headers)
    return response.status


async def test_concurrent_guesses_are_limited_as_if_sequential(
    make_client: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 guesses at one account sent at once: only the free ones reach argon2, the rest get 429
    (the attempt is reserved before the password check, not counted after it)."""
    client = await make_client()
    _frozen(client)
    verified: list[str] = []
    real_verify = users_module._verify

    def counting(password_hash: str, password: str) -> bool:
        verified.append(password)
        return real_verify(password_hash, password)

    monkeypatch.setattr(users_module, "_verify", counting)
    statuses = await asyncio.gather(*(_login(client, "ada", f"guess {i}") for i in range(30)))
    assert sorted(statuses) == [401] * PAIR.free_failures + [429] * (30 - PAIR.free_failures)
    assert len(verified) == PAIR.free_failures
    # The refusals are audited in aggregate (the first now, a count later), not one record each.
    throttled = [r for r in client.app[AUDIT].recent if r["details"].get("reason") == "throttled"]
    assert [(r["action"], r["actor"]) for r in throttled] == [("login", "ada")]


async def test_a_good_login_does_not_clear_the_address(make_client: AppFactory) -> None:
    """An attacker logging into its own account between guesses at others keeps its failures."""
    client = await make_client()
    _frozen(client)
    for i in range(ADDRESS.free_failures - 1):
        assert await _login(client, f"nobody{i}", "guess") == 401
    assert await _login(client, "vic", PASSWORD) == 200  # the attacker's own account
    assert await _login(client, "nobody-else", "guess") == 401
    assert await _login(client, "otto", "guess") == 429  # this address has used up its failures


async def test_behind_a_trusted_proxy_each_client_has_its_own_address(make_client: AppFactory) -> None:
    """With the ingress (here: loopback) in auth.trustedProxies, X-Forwarded-For names the client,
    read from the right: what the client itself put on the left cannot pick its address."""
    client = await make_client(auth={"trustedProxies": ["127.0.0.0/8", "10.0.0.0/8"]})
    _frozen(client)
    for i in range(ADDRESS.free_failures):
        assert await _login(client, f"nobody{i}", "guess", "203.0.113.5") == 401
    assert await _login(client, "ada", PASSWORD, "203.0.113.5") == 429
    assert await _login(client, "ada", PASSWORD, "198.51.100.77, 203.0.113.5") == 429  # spoofed left part
    assert await _login(client, "ada", PASSWORD, "203.0.113.5, 10.1.2.3") == 429  # through a second proxy
    assert await _login(client, "ada", PASSWORD, "203.0.113.6") == 200  # another client is not locked out
    records = [r for r in client.app[AUDIT].recent if r["action"] == "login"]
    assert {r["client_ip"] for r in records} == {"203.0.113.5", "203.0.113.6"}


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(make_client: AppFactory) -> None:
    client = await make_client()  # no trusted proxies: the peer's address is the client's
    _frozen(client)
    for i in range(ADDRESS.free_failures):
        assert await _login(client, f"nobody{i}", "guess", f"198.51.100.{i}") == 401
    assert await _login(client, "ada", PASSWORD, "198.51.100.200") == 429
    assert {r["client_ip"] for r in client.app[AUDIT].recent if r["action"] == "login"} == {"127.0.0.1"}


async def test_trusted_proxies_must_be_networks(make_client: AppFactory) -> None:
    with pytest.raises(ValueError, match=r"trustedProxies|trusted_proxies"):
        await make_client(auth={"trustedProxies": ["ingress.example"]})


async def test_brute_force_gets_429_even_with_the_right_password(make_client: AppFactory) -> None:
    client = await make_client()
    _frozen(client)
    for _ in range(PAIR.free_failures):
        response = await client.post("/v1/auth/login", json={"username": "ada", "password": "guess"})
        assert response.status == 401
    blocked = await client.post("/v1/auth/login", json={"username": "ada", "password": PASSWORD})
    assert blocked.status == 429
    assert int(blocked.headers["Retry-After"]) >= 1
    assert (await blocked.json())["code"] == "too_many_attempts"
    other = await client.post("/v1/auth/login", json={"username": "otto", "password": PASSWORD})
    assert other.status == 200  # another account from the same address is not blocked yet


async def test_unknown_user_and_wrong_password_look_the_same(
    make_client: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client()
    verified: list[str] = []
    real_verify = users_module._verify

    def counting(password_hash: str, password: str) -> bool:
        verified.append(password_hash[:10])
        return real_verify(password_hash, password)

    monkeypatch.setattr(users_module, "_verify", counting)
    timings: dict[str, list[float]] = {"unknown": [], "wrong": []}
    bodies = {}
    for round_ in range(4):  # a different user each round keeps the throttle out of the way
        for kind, user in (("unknown", f"nobody{round_}"), ("wrong", ["ada", "otto", "ana", "vic"][round_])):
            started = time.perf_counter()
            response = await client.post("/v1/auth/login", json={"username": user, "password": "not it"})
            timings[kind].append(time.perf_counter() - started)
            body = await response.json()
            bodies[kind] = (response.status, body["code"], body["message"])
    assert bodies["unknown"] == bodies["wrong"] == (401, "invalid_credentials", "the user name or password is wrong")
    assert len(verified) == 8  # an argon2 verification for unknown users too
    ratio = statistics.median(timings["unknown"]) / statistics.median(timings["wrong"])
    assert 0.5 < ratio < 2.0, timings


async def test_login_input_is_validated(make_client: AppFactory) -> None:
    client = await make_client()
    for body in (
        {},
        {"username": "ada"},
        {"username": 5, "password": "x"},
        {"username": "ada", "password": "x" * 2000},
    ):
        response = await client.post("/v1/auth/login", json=body)
        assert response.status == 400
        assert "bytes is required" in (await response.json())["message"]


async def test_attempts_a_dead_replica_never_finished_stop_counting_even_on_a_busy_address() -> None:
    """20 attempts reserved and never finished (their replica died), then steady good logins from
    the same address keep its counter fresh: the dead attempts still stop counting after a minute."""
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock)
    for index in range(ADDRESS.free_failures):
        await throttle.reserve(f"user{index}", "10.0.0.9")  # never finished
    assert await throttle.retry_after("newcomer", "10.0.0.9") > 0
    for _ in range(7):  # a good login every 10 s from the same address
        clock.now += 10
        wait = await throttle.retry_after("vic", "10.0.0.9")
        clock.now += wait
        await (await throttle.reserve("vic", "10.0.0.9")).succeeded()
    assert await throttle.retry_after("newcomer", "10.0.0.9") == 0
