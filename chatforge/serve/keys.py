"""API key secrets: how they look, how they are hashed and checked, and the short-lived cache of checked keys.

The store (`chatforge.serve.store.Store`) calls these; you rarely need them directly::

    key_id = new_key_id()                       # 'k_3f9a2c1d': public, the key's visible prefix and row id
    secret = new_secret(key_id)                 # 'cf-k_3f9a2c1d-<32 urlsafe chars>': shown once, never stored
    salt = new_salt()
    stored = hash_secret(secret, salt)          # what the api_keys row keeps, next to the salt
    key_id_of(secret)                           # 'k_3f9a2c1d', or None when the secret is malformed
    secret_matches(secret, salt, stored)        # True; constant-time comparison

The hash is scrypt (n=2**14, r=8, p=1: ~16 MiB and tens of milliseconds per check, on purpose), so a stolen
database gives no usable keys. Because each check is slow, the server keeps verified keys for `AuthCache.ttl_s`
seconds in memory, under the sha256 of the secret (never the secret itself); revoking through the same Store
drops the entry at once, revoking from another process (the CLI) takes effect within the TTL.

Failed checks are cheap to repeat for no one: `FailedAuthGuard` remembers wrong secrets (by digest) and counts
failures per key id and per client address, so a flood of wrong secrets is refused before any scrypt runs::

    guard = FailedAuthGuard(failures_per_address=20, failures_per_key=50, window_s=60)
    guard.admit("10.0.0.7", secret)          # None: go on and check it; else (status, message, retry_after_s)
    guard.failed(secret)                     # after the check said no
    guard.succeeded("10.0.0.7", secret)      # after it said yes
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

SCOPES = frozenset({"chat", "feedback", "admin"})
RESERVED_NAME_PREFIX = "oauth:"  # the store's rows for OAuth identities; no API key may take such a name
MAX_NAME_CHARS = 100
SECRET_PREFIX = "cf-"
_SECRET_PATTERN = re.compile(r"cf-(k_[0-9a-f]{8})-[A-Za-z0-9_-]{32}")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}

Cached = TypeVar("Cached")


def new_key_id() -> str:
    """A fresh public key id: 'k_' and 8 random hex digits."""
    return "k_" + secrets.token_hex(4)


def new_secret(key_id: str) -> str:
    """The secret a client sends as `Authorization: Bearer <secret>`; 192 random bits after the id."""
    return f"{SECRET_PREFIX}{key_id}-{secrets.token_urlsafe(24)}"


def key_id_of(secret: object) -> str | None:
    """The key id embedded in a well-formed secret, or None for anything else (wrong shape, type or length)."""
    if not isinstance(secret, str):
        return None
    match = _SECRET_PATTERN.fullmatch(secret)
    return match.group(1) if match else None


def new_salt() -> bytes:
    return secrets.token_bytes(16)


def hash_secret(secret: str, salt: bytes) -> bytes:
    """scrypt of the secret under its per-key salt (32 bytes)."""
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


def secret_matches(secret: str, salt: bytes, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret, salt), stored_hash)


def secret_digest(secret: str) -> str:
    """Fast sha256 of a secret: the in-memory cache key, so not even the cache holds a secret in clear."""
    return hashlib.sha256(secret.encode()).hexdigest()


def checked_key_name(name: object) -> str:
    """The key name, stripped; ValueError when it is empty, too long, holds control or escape characters (they
    would reach terminals through `chatforge keys list`), or takes the reserved 'oauth:' prefix."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a key needs a non-empty name")
    name = name.strip()
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"a key name has at most {MAX_NAME_CHARS} characters, got {len(name)}")
    if not name.isprintable():
        raise ValueError(f"the key name {printable(name)} holds control or escape characters; use printable text")
    if name.startswith(RESERVED_NAME_PREFIX):
        raise ValueError(f"key names starting with {RESERVED_NAME_PREFIX!r} are reserved for OAuth identities")
    return name


def printable(text: str) -> str:
    """`text` with every non-printable character shown as a Python escape (\\x1b), safe to print to a terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def checked_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """The scopes as a frozenset; ValueError naming unknown ones, or when none are given."""
    if isinstance(scopes, str):  # "chat,feedback" from a CLI flag
        scopes = [scope.strip() for scope in scopes.split(",") if scope.strip()]
    chosen = frozenset(scopes)
    unknown = sorted(chosen - SCOPES)
    if unknown:
        raise ValueError(f"unknown scope(s) {unknown}; known: {sorted(SCOPES)}")
    if not chosen:
        raise ValueError(f"a key needs at least one scope out of {sorted(SCOPES)}")
    return chosen


class AuthCache(Generic[Cached]):
    """Verified keys by secret digest, for `ttl_s` seconds, at most `max_entries` (least recently used go first).

        cache = AuthCache(ttl_s=30.0)
        cache.put(secret_digest(secret), key.id, key)
        cache.get(secret_digest(secret))     # the key, until 30 s have passed or cache.drop(key.id)

    Thread-safe; `clock` is injectable for tests. ttl_s=0 turns caching off.
    """

    def __init__(self, ttl_s: float = 30.0, max_entries: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._entries: OrderedDict[str, tuple[float, str, Cached]] = OrderedDict()
        self._dropped: set[str] = set()  # revoked ids: a check that raced the revoke must not cache the key again
        self._lock = threading.Lock()

    def get(self, digest: str) -> Cached | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[0] <= self.clock():
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return entry[2]

    def put(self, digest: str, key_id: str, value: Cached) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if key_id in self._dropped:
                return
            self._entries[digest] = (self.clock() + self.ttl_s, key_id, value)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def drop(self, key_id: str) -> None:
        """Forget every cached secret of this key (after a revoke)."""
        with self._lock:
            self._dropped.add(key_id)
            for digest in [d for d, (_, cached_id, _) in self._entries.items() if cached_id == key_id]:
                del self._entries[digest]


class _FailureWindow:
    """Failure times of one key id or client address within the window (oldest first)."""

    def __init__(self) -> None:
        self.times: deque[float] = deque()

    def count(self, now: float, window_s: float) -> int:
        while self.times and self.times[0] <= now - window_s:
            self.times.popleft()
        return len(self.times)


class FailedAuthGuard:
    """Refuses, without hashing, what failed before: a secret seen wrong in the last `bad_secret_ttl_s` (401),
    and any unverified secret from an address or for a key id with too many failures in `window_s` (429).

    `admit` counts a check as a failure up front (so concurrent checks cannot overshoot the limit) and
    `succeeded` takes that back; check the cache of verified keys first (`Store.cached_key`): a key verified
    before a flood keeps working. Thread-safe; memory is bounded (`max_entries` per table, least recently used
    go first); `clock` for tests.
    """

    def __init__(self, failures_per_address: int = 20, failures_per_key: int = 50, window_s: float = 60.0,
                 bad_secret_ttl_s: float = 600.0, max_entries: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_per_address, self.failures_per_key = failures_per_address, failures_per_key
        self.window_s, self.bad_secret_ttl_s, self.max_entries, self.clock = (window_s, bad_secret_ttl_s,
                                                                             max_entries, clock)
        self._bad_secrets: OrderedDict[str, float] = OrderedDict()  # digest -> when it stops being refused
        self._by_address: OrderedDict[str, _FailureWindow] = OrderedDict()
        self._by_key: OrderedDict[str, _FailureWindow] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, address: str, secret: str) -> tuple[int, str, float | None] | None:
        """None when `secret` may be checked now (counted as a failure until `succeeded`); else (401 or 429, a
        message for the client, seconds to wait)."""
        now = self.clock()
        digest = secret_digest(secret)
        key_id = key_id_of(secret)
        with self._lock:
            until = self._bad_secrets.get(digest)
            if until is not None and until > now:
                return 401, "invalid or revoked API key", None
            if self._over(self._by_address, address, self.failures_per_address, now):
                return 429, (f"too many failed authentications from {address} in {self.window_s:g} s; "
                             "retry later"), self.window_s
            if key_id is not None and self._over(self._by_key, key_id, self.failures_per_key, now):
                return 429, (f"too many failed authentications for key {key_id} in {self.window_s:g} s; "
                             "retry later"), self.window_s
            self._window(self._by_address, address).times.append(now)
            if key_id is not None:
                self._window(self._by_key, key_id).times.append(now)
        return None

    def failed(self, secret: str, remember_secret: bool = True) -> None:
        """The admitted `secret` did not authenticate: refuse it outright from now on (`remember_secret=False`
        for tokens that may turn valid later, such as a JWT signed with a key not yet published)."""
        if remember_secret:
            with self._lock:
                self._remember(self._bad_secrets, secret_digest(secret), self.clock() + self.bad_secret_ttl_s)

    def succeeded(self, address: str, secret: str) -> None:
        """The admitted `secret` authenticated: its check no longer counts as a failure."""
        key_id = key_id_of(secret)
        with self._lock:
            for table, name in ((self._by_address, address), (self._by_key, key_id)):
                window = table.get(name) if name is not None else None
                if window is not None and window.times:
                    window.times.pop()

    def _over(self, table: OrderedDict[str, _FailureWindow], name: str, limit: int, now: float) -> bool:
        window = table.get(name)
        return window is not None and window.count(now, self.window_s) >= limit

    def _window(self, table: OrderedDict[str, _FailureWindow], name: str) -> _FailureWindow:
        window = table.get(name)
        if window is None:
            window = _FailureWindow()
        self._remember(table, name, window)
        return window

    def _remember(self, table: OrderedDict[str, Any], name: str, value: Any) -> None:
        table[name] = value
        table.move_to_end(name)
        while len(table) > self.max_entries:
            table.popitem(last=False)
