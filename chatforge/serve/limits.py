"""Per-key rate limits: requests per minute and tokens per minute over a sliding 60-second window, in the store.

Use it like this in a route (the calls touch the database: run them off the event loop)::

    limiter = RateLimiter(store)                              # every server on the same database shares the windows
    wait_s = limiter.peek(key)                                # before tokenizing: already over the limit? (429)
    wait_s = limiter.check_request(key, prompt_tokens=12, max_tokens=256)
    if wait_s is not None:
        ...                                                   # 429 with `Retry-After: int(wait_s)`
    ...                                                       # generate
    limiter.settle_tokens(key, reserved=12 + 256, used=12 + completion_tokens)

A request reserves prompt + max_tokens from the key's token budget up front (so concurrent requests cannot
overshoot it), and `settle_tokens` gives back what the answer did not use. A request that needs more than the whole
budget runs only when the key has nothing else in its window, and then counts in full, so a key is never locked out
forever by one large request, and never gets more than its budget on average.

The window is a log of admitted requests in the store's `rate_events` table. Each check runs in one transaction
that holds the key's lock (a PostgreSQL advisory lock, or SQLite's single writer), drops the key's expired events,
reads the rest, and inserts the new one when it fits, so a key limited to N requests a minute gets N in total
however many gateway replicas share the database. On PostgreSQL the time is the database server's, so replicas'
clocks need not agree. Keys with neither limit never touch the database. When the database cannot be reached the
check answers 503 (`database_unavailable`): a limit that cannot be counted is not granted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError

from chatforge.serve.engine import ServeUnavailable
from chatforge.serve.store import Store
from chatforge.serve.store_schema import RateEventRow

WINDOW_S = 60.0
log = logging.getLogger("chatforge.serve.limits")


class LimitedKey(Protocol):
    """What the limiter reads of a key (an ApiKey, or any identity with limits)."""

    id: str
    rpm: int | None
    tpm: int | None


class RateLimiter:
    """Sliding-window request and token limits per key id, shared through `store` (see the module docstring).

    Thread-safe. `clock` (epoch seconds) replaces the database's clock, for tests.
    """

    def __init__(self, store: Store, window_s: float = WINDOW_S, clock: Callable[[], float] | None = None) -> None:
        self.store, self.window_s, self.clock = store, window_s, clock
        self._settler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rate-settle")

    def check_request(self, key: LimitedKey, prompt_tokens: int, max_tokens: int) -> float | None:
        """None when the request may run (it is then counted); otherwise the whole seconds to wait, at least 1."""
        rpm, tpm = key.rpm, key.tpm
        if rpm is None and tpm is None:
            return None
        needed = max(0, prompt_tokens) + max(0, max_tokens)
        try:
            with self.store.key_window(key.id) as (session, db_now):
                now = self.clock() if self.clock is not None else db_now
                session.execute(delete(RateEventRow).where(RateEventRow.key_id == key.id,
                                                           RateEventRow.at <= now - self.window_s))
                events = session.execute(select(RateEventRow.at, RateEventRow.tokens)
                                         .where(RateEventRow.key_id == key.id)
                                         .order_by(RateEventRow.at, RateEventRow.id)).all()
                wait = max(self._request_wait([at for at, _ in events], rpm, now),
                           self._token_wait(events, tpm, needed, now))
                if wait > 0:
                    return float(max(1, math.ceil(wait)))
                session.add(RateEventRow(key_id=key.id, at=now, tokens=needed if tpm is not None else 0,
                                         settled=False))
                return None
        except SQLAlchemyError as exc:
            log.error("rate limit check for key %s failed: %s", key.id, type(exc).__name__)
            raise ServeUnavailable("the rate-limit database does not answer; retry shortly", retry_after_s=5.0,
                                   code="database_unavailable") from None

    def peek(self, key: LimitedKey) -> float | None:
        """Seconds to wait when `key` is over its limit already (its rpm used up, or its token budget spent), else
        None; counts nothing. Call it before costly work (tokenizing) so a limited key gets its 429 cheaply."""
        rpm, tpm = key.rpm, key.tpm
        if rpm is None and tpm is None:
            return None
        try:
            with self.store.key_window(key.id) as (session, db_now):
                now = self.clock() if self.clock is not None else db_now
                events = session.execute(select(RateEventRow.at, RateEventRow.tokens)
                                         .where(RateEventRow.key_id == key.id, RateEventRow.at > now - self.window_s)
                                         .order_by(RateEventRow.at, RateEventRow.id)).all()
        except SQLAlchemyError as exc:
            log.error("rate limit peek for key %s failed: %s", key.id, type(exc).__name__)
            raise ServeUnavailable("the rate-limit database does not answer; retry shortly", retry_after_s=5.0,
                                   code="database_unavailable") from None
        spent = tpm is not None and sum(tokens for _, tokens in events) >= tpm
        wait = max(self._request_wait([at for at, _ in events], rpm, now),
                   self._token_wait(events, tpm, 1, now) if spent else 0.0)
        return float(max(1, math.ceil(wait))) if wait > 0 else None

    def settle_tokens(self, key: LimitedKey, reserved: int, used: int) -> None:
        """After the response: turn the newest open reservation of `reserved` tokens into `used` tokens.

        Does not wait: the update runs on a background thread (a failure is logged; the reservation then simply
        counts in full until it leaves the window). A reservation that has already left the window is not touched.
        """
        if key.tpm is None:
            return
        self._settler.submit(self._settle, key.id, reserved, used)

    def wait_settled(self) -> None:
        """Block until every settle submitted so far is written (tests and shutdown)."""
        self._settler.submit(lambda: None).result()

    def close(self) -> None:
        self._settler.shutdown(wait=True)

    def _settle(self, key_id: str, reserved: int, used: int) -> None:
        try:
            with self.store.key_window(key_id) as (session, _now):
                newest_open = (select(RateEventRow.id)
                               .where(RateEventRow.key_id == key_id, RateEventRow.tokens == reserved,
                                      RateEventRow.settled.is_(False))
                               .order_by(RateEventRow.id.desc()).limit(1).scalar_subquery())
                session.execute(update(RateEventRow).where(RateEventRow.id == newest_open)
                                .values(tokens=max(0, used), settled=True))
        except SQLAlchemyError as exc:
            log.error("settling the tokens of key %s failed: %s", key_id, type(exc).__name__)

    def _request_wait(self, times: list[float], rpm: int | None, now: float) -> float:
        if rpm is None or len(times) < rpm:
            return 0.0
        # the oldest requests must leave until one slot is free
        return times[len(times) - rpm] + self.window_s - now

    def _token_wait(self, events: list[tuple[float, int]], tpm: int | None, needed: int, now: float) -> float:
        in_window = sum(tokens for _, tokens in events)
        if tpm is None or in_window <= 0 or in_window + needed <= tpm:
            return 0.0  # an empty window takes even a request bigger than the whole budget
        remaining = in_window
        for at, tokens in events:  # oldest first: when does enough of the window expire?
            remaining -= tokens
            if remaining <= 0 or remaining + needed <= tpm:
                return at + self.window_s - now
        return self.window_s  # not reached: the loop ends with remaining == 0
