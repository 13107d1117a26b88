"""Failed-login throttling and resistance to user enumeration."""

from __future__ import annotations

import statistics
import time

import pytest

from agent_runtime.security import users as users_module
from agent_runtime.security.throttle import ACCOUNT, PAIR, LoginThrottle
from tests.runtime.conftest import PASSWORD, AppFactory


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_backs_off_exponentially_with_a_cap() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for _ in range(PAIR.free_failures):
        assert throttle.retry_after("ada", "10.0.0.1") == 0
        throttle.failed("ada", "10.0.0.1")
    waits = []
    for _ in range(12):
        waits.append(throttle.retry_after("ada", "10.0.0.1"))
        throttle.failed("ada", "10.0.0.1")
    assert waits[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(waits) == PAIR.cap_seconds
    clock.now += PAIR.forget_seconds + 1
    assert throttle.retry_after("ada", "10.0.0.1") == 0  # old failures are forgotten


def test_an_attacker_cannot_lock_the_victim_out_for_good() -> None:
    """Guesses from many addresses slow the account down, capped at a minute; the victim's own
    address is never blocked for longer than that."""
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for attempt in range(1000):
        throttle.failed("victim", f"198.51.100.{attempt % 250}")
    assert throttle.retry_after("victim", "203.0.113.7") <= ACCOUNT.cap_seconds
    clock.now += ACCOUNT.cap_seconds
    assert throttle.retry_after("victim", "203.0.113.7") == 0


def test_success_clears_the_address() -> None:
    throttle = LoginThrottle(FakeClock())
    for _ in range(PAIR.free_failures + 2):
        throttle.failed("ada", "10.0.0.1")
    assert throttle.retry_after("ada", "10.0.0.1") > 0
    throttle.succeeded("ada", "10.0.0.1")
    assert throttle.retry_after("ada", "10.0.0.1") == 0


async def test_brute_force_gets_429_even_with_the_right_password(make_client: AppFactory) -> None:
    client = await make_client()
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
