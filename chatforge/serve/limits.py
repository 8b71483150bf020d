"""Per-key rate limits: requests per minute and tokens per minute over a sliding 60-second window.

Use it like this in a route::

    limiter = RateLimiter()                                   # one per server process
    wait_s = limiter.peek(key)                                # before tokenizing: already over the limit? (429)
    wait_s = limiter.check_request(key, prompt_tokens=12, max_tokens=256)
    if wait_s is not None:
        ...                                                   # 429 with `Retry-After: int(wait_s)`
    ...                                                       # generate
    limiter.settle_tokens(key, reserved=12 + 256, used=12 + completion_tokens)

A request reserves prompt + max_tokens from the key's token budget up front (so concurrent requests cannot
overshoot it), and `settle_tokens` gives back what the answer did not use. A request that needs more than the whole
budget runs only when the key has nothing else in its window, and then counts in full, so a key is never locked out
forever by one large request, and never gets more than its budget on average. Limits live in this process's memory:
with several server processes each enforces the limit on its own share.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from chatforge.serve.store import ApiKey

WINDOW_S = 60.0


@dataclass
class _Reservation:
    at: float
    tokens: int
    settled: bool = False


@dataclass
class _KeyWindow:
    request_times: deque[float] = field(default_factory=deque)
    reservations: deque[_Reservation] = field(default_factory=deque)
    tokens_in_window: int = 0

    def expire(self, now: float, window_s: float) -> None:
        while self.request_times and self.request_times[0] <= now - window_s:
            self.request_times.popleft()
        while self.reservations and self.reservations[0].at <= now - window_s:
            self.tokens_in_window -= self.reservations.popleft().tokens


class RateLimiter:
    """Sliding-window request and token limits per key id; thread-safe; `clock` is injectable for tests."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self._windows: dict[str, _KeyWindow] = {}
        self._lock = threading.Lock()

    def check_request(self, key: ApiKey, prompt_tokens: int, max_tokens: int) -> float | None:
        """None when the request may run (it is then counted); otherwise the whole seconds to wait, at least 1."""
        if key.rpm is None and key.tpm is None:
            return None
        needed = max(0, prompt_tokens) + max(0, max_tokens)
        with self._lock:
            now = self.clock()
            window = self._windows.setdefault(key.id, _KeyWindow())
            window.expire(now, self.window_s)
            wait = max(self._request_wait(window, key.rpm, now), self._token_wait(window, key.tpm, needed, now))
            if wait > 0:
                return float(max(1, math.ceil(wait)))
            if key.rpm is not None:
                window.request_times.append(now)
            if key.tpm is not None:
                window.reservations.append(_Reservation(now, needed))
                window.tokens_in_window += needed
            return None

    def peek(self, key: ApiKey) -> float | None:
        """Seconds to wait when `key` is over its limit already (its rpm used up, or its token budget spent), else
        None; counts nothing. Call it before costly work (tokenizing) so a limited key gets its 429 cheaply."""
        if key.rpm is None and key.tpm is None:
            return None
        with self._lock:
            now = self.clock()
            window = self._windows.get(key.id)
            if window is None:
                return None
            window.expire(now, self.window_s)
            spent = key.tpm is not None and window.tokens_in_window >= key.tpm
            wait = max(self._request_wait(window, key.rpm, now),
                       self._token_wait(window, key.tpm, 1, now) if spent else 0.0)
            return float(max(1, math.ceil(wait))) if wait > 0 else None

    def settle_tokens(self, key: ApiKey, reserved: int, used: int) -> None:
        """After the response: turn the newest open reservation of `reserved` tokens into `used` tokens.

        A reservation that has already left the window is not touched (it no longer counts anyway).
        """
        if key.tpm is None:
            return
        with self._lock:
            window = self._windows.get(key.id)
            if window is None:
                return
            for reservation in reversed(window.reservations):
                if not reservation.settled and reservation.tokens == reserved:
                    reservation.settled, reservation.tokens = True, max(0, used)
                    window.tokens_in_window += reservation.tokens - reserved
                    return

    def _request_wait(self, window: _KeyWindow, rpm: int | None, now: float) -> float:
        if rpm is None or len(window.request_times) < rpm:
            return 0.0
        # the oldest requests must leave until one slot is free
        return window.request_times[len(window.request_times) - rpm] + self.window_s - now

    def _token_wait(self, window: _KeyWindow, tpm: int | None, needed: int, now: float) -> float:
        if tpm is None or window.tokens_in_window <= 0 or window.tokens_in_window + needed <= tpm:
            return 0.0  # an empty window takes even a request bigger than the whole budget
        remaining = window.tokens_in_window
        for reservation in window.reservations:  # oldest first: when does enough of the window expire?
            remaining -= reservation.tokens
            if remaining <= 0 or remaining + needed <= tpm:
                return reservation.at + self.window_s - now
        return self.window_s  # not reached: the loop ends with remaining == 0
