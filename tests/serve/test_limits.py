"""Per-key sliding-window limits kept in the store (SQLite and a real PostgreSQL): requests and tokens per minute,
Retry-After, reservations given back, and one budget shared by every limiter on the database."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from chatforge.serve.engine import ServeUnavailable
from chatforge.serve.limits import RateLimiter
from chatforge.serve.store import ApiKey, Store


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


LimiterFactory = Callable[..., RateLimiter]


@pytest.fixture
def limiter_on(database_url: str) -> Iterator[LimiterFactory]:
    """Make limiters on one empty database (each with its own Store, like separate server processes)."""
    stores: list[Store] = []

    def make(clock: FakeClock | None = None) -> RateLimiter:
        stores.append(Store(database_url))
        return RateLimiter(stores[-1], clock=clock or FakeClock())

    yield make
    for store in stores:
        store.close()


def api_key(key_id: str = "k_aaaaaaaa", rpm: int | None = None, tpm: int | None = None) -> ApiKey:
    return ApiKey(id=key_id, name=key_id, scopes=frozenset({"chat"}), rpm=rpm, tpm=tpm,
                  created=datetime(2025, 1, 1, tzinfo=UTC), revoked=False)


def test_requests_per_minute_slide_with_the_window(limiter_on: LimiterFactory) -> None:
    clock = FakeClock()
    limiter, key = limiter_on(clock), api_key(rpm=3)
    for offset in (0.0, 10.0, 20.0):
        clock.now = 5000.0 + offset
        assert limiter.check_request(key, 10, 10) is None
    clock.now = 5030.0
    assert limiter.check_request(key, 10, 10) == 30.0  # the first request leaves the window at 5060
    clock.now = 5059.5
    assert limiter.check_request(key, 10, 10) == 1.0  # 0.5 s rounds up: Retry-After is whole seconds, at least 1
    clock.now = 5060.0
    assert limiter.check_request(key, 10, 10) is None
    assert limiter.check_request(key, 10, 10) == 10.0  # refused requests did not count; the 5010 one is next out


def test_tokens_per_minute_reserve_prompt_plus_max_tokens(limiter_on: LimiterFactory) -> None:
    clock = FakeClock()
    limiter, key = limiter_on(clock), api_key(tpm=1000)
    assert limiter.check_request(key, prompt_tokens=100, max_tokens=300) is None  # 400 reserved at 5000
    clock.now = 5005.0
    assert limiter.check_request(key, 200, 300) is None  # 900 reserved
    clock.now = 5010.0
    assert limiter.check_request(key, 50, 100) == 50.0  # needs 150, only 100 left until 5060
    assert limiter.check_request(key, 50, 50) is None  # exactly fills the budget
    clock.now = 5061.0
    assert limiter.check_request(key, 300, 100) is None  # the 400 of 5000 expired: 600 + 400 fit


def test_settling_gives_back_what_the_answer_did_not_use(limiter_on: LimiterFactory) -> None:
    clock = FakeClock()
    limiter, key = limiter_on(clock), api_key(tpm=1000)
    assert limiter.check_request(key, 100, 800) is None
    assert limiter.check_request(key, 100, 100) == 60.0
    limiter.settle_tokens(key, reserved=900, used=150)  # the answer stopped early
    limiter.wait_settled()
    assert limiter.check_request(key, 100, 700) is None  # 150 + 800 <= 1000
    limiter.settle_tokens(key, reserved=800, used=800)
    limiter.wait_settled()
    assert limiter.check_request(key, 10, 50) == 60.0  # 950 used: 60 more do not fit until the first expires
    limiter.settle_tokens(key, reserved=12345, used=0)  # no such reservation: nothing changes
    limiter.wait_settled()
    assert limiter.check_request(key, 10, 50) == 60.0


def test_a_request_bigger_than_the_budget_runs_alone(limiter_on: LimiterFactory) -> None:
    clock = FakeClock()
    limiter, key = limiter_on(clock), api_key(tpm=100)
    assert limiter.check_request(key, 20, 20) is None
    clock.now = 5010.0
    assert limiter.check_request(key, 150, 50) == 50.0  # waits until the window is empty
    clock.now = 5060.0
    assert limiter.check_request(key, 150, 50) is None  # then runs, and counts in full
    clock.now = 5070.0
    assert limiter.check_request(key, 1, 1) == 50.0


def test_both_limits_apply_and_the_longer_wait_wins(limiter_on: LimiterFactory) -> None:
    clock = FakeClock()
    limiter, key = limiter_on(clock), api_key(rpm=2, tpm=100)
    assert limiter.check_request(key, 10, 80) is None
    clock.now = 5020.0
    assert limiter.check_request(key, 5, 5) is None  # 2 requests, 100 tokens
    clock.now = 5030.0
    assert limiter.check_request(key, 5, 5) == 30.0  # rpm frees at 5060, tokens too
    limiter.settle_tokens(key, reserved=90, used=20)
    limiter.wait_settled()
    assert limiter.check_request(key, 5, 5) == 30.0  # tokens fit now, requests do not


def test_keys_are_limited_separately_and_unlimited_keys_never_wait(limiter_on: LimiterFactory) -> None:
    limiter = limiter_on()
    busy, quiet, free = api_key("k_busy0000", rpm=1), api_key("k_quiet000", rpm=1), api_key("k_free0000")
    assert limiter.check_request(busy, 1, 1) is None
    assert limiter.check_request(busy, 1, 1) == 60.0
    assert limiter.check_request(quiet, 1, 1) is None
    assert all(limiter.check_request(free, 10_000, 10_000) is None for _ in range(1000))


class SlowToReadKey:
    """An ApiKey look-alike whose token limit takes a moment to read: threads get switched mid-check."""

    id, rpm = "k_slow0000", 50

    @property
    def tpm(self) -> int:
        time.sleep(0.0005)
        return 10_000


def test_concurrent_requests_on_two_replicas_share_one_limit(limiter_on: LimiterFactory) -> None:
    replicas = [RateLimiter(limiter_on().store), RateLimiter(limiter_on().store)]  # the database's own clock
    key = SlowToReadKey()
    allowed: list[bool] = []
    lock = threading.Lock()

    def client(limiter: RateLimiter) -> None:
        for _ in range(25):
            verdict = limiter.check_request(key, 10, 10) is None  # type: ignore[arg-type]
            with lock:
                allowed.append(verdict)

    threads = [threading.Thread(target=client, args=(replicas[n % 2],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == 200 and sum(allowed) == 50


class DownStore:
    """A store whose database is gone: every transaction fails as a lost PostgreSQL connection does."""

    @contextmanager
    def key_window(self, key_id: str) -> Iterator[tuple[Any, float]]:
        raise OperationalError("SELECT pg_advisory_xact_lock(...)", {}, ConnectionError("connection refused"))
        yield


def test_an_unreachable_database_refuses_with_503_rather_than_granting() -> None:
    limiter = RateLimiter(DownStore())  # type: ignore[arg-type]
    with pytest.raises(ServeUnavailable, match="rate-limit database") as refused:
        limiter.check_request(api_key(rpm=5), 1, 1)
    assert refused.value.code == "database_unavailable"
    assert limiter.check_request(api_key(), 1, 1) is None  # an unlimited key does not need the database
