"""API key secrets: their shape, salted scrypt hashes, scopes, and the short-lived cache of verified keys."""

from __future__ import annotations

import hashlib

import pytest

from chatforge.serve.keys import (
    AuthCache,
    FailedAuthGuard,
    checked_scopes,
    hash_secret,
    key_id_of,
    new_key_id,
    new_salt,
    new_secret,
    secret_digest,
    secret_matches,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_secrets_carry_their_public_id_and_192_random_bits() -> None:
    ids = {new_key_id() for _ in range(200)}
    assert len(ids) == 200 and all(len(key_id) == 10 and key_id.startswith("k_") for key_id in ids)
    key_id = new_key_id()
    secrets = {new_secret(key_id) for _ in range(200)}
    assert len(secrets) == 200
    for secret in secrets:
        assert secret.startswith(f"cf-{key_id}-") and len(secret) == len(f"cf-{key_id}-") + 32
        assert key_id_of(secret) == key_id


def test_malformed_secrets_have_no_key_id() -> None:
    secret = new_secret("k_0123abcd")
    for wrong in ("", secret + "A", secret[:-1], secret.replace("cf-", "sk-"), "cf-k_0123ABCD-" + "a" * 32,
                  "cf-k_0123abc-" + "a" * 33, " " + secret, secret + "\n", "cf-k_0123abcd-" + "a" * 31 + "!", None, 7):
        assert key_id_of(wrong) is None, wrong
    assert key_id_of("cf-k_0123abcd-" + "a-_Z" * 8) == "k_0123abcd"


def test_hashes_are_salted_scrypt_and_compare_only_the_exact_secret() -> None:
    secret, salt, other_salt = new_secret(new_key_id()), new_salt(), new_salt()
    stored = hash_secret(secret, salt)
    assert stored == hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    assert hash_secret(secret, other_salt) != stored and len(salt) == 16 and salt != other_salt
    assert secret_matches(secret, salt, stored)
    assert not secret_matches(secret[:-1] + ("x" if secret[-1] != "x" else "y"), salt, stored)
    assert not secret_matches(secret, other_salt, stored)
    assert secret_digest(secret) == hashlib.sha256(secret.encode()).hexdigest() != stored.hex()


def test_scopes_are_checked_against_the_known_three() -> None:
    assert checked_scopes(["chat", "feedback", "chat"]) == frozenset({"chat", "feedback"})
    assert checked_scopes("admin, chat") == frozenset({"admin", "chat"})
    known = r"; known: \['admin', 'chat', 'feedback'\]"
    with pytest.raises(ValueError, match=r"unknown scope\(s\) \['Chat', 'write'\]" + known):
        checked_scopes(["Chat", "write"])
    with pytest.raises(ValueError, match="at least one scope"):
        checked_scopes("")


def test_auth_cache_forgets_after_its_ttl() -> None:
    clock = FakeClock()
    cache: AuthCache[str] = AuthCache(ttl_s=30.0, clock=clock)
    cache.put("digest-a", "k_a", "key a")
    clock.now += 29.9
    assert cache.get("digest-a") == "key a"
    clock.now += 0.1
    assert cache.get("digest-a") is None
    off: AuthCache[str] = AuthCache(ttl_s=0, clock=clock)
    off.put("digest-a", "k_a", "key a")
    assert off.get("digest-a") is None


def test_auth_cache_drop_forgets_every_secret_of_a_key_for_good() -> None:
    cache: AuthCache[str] = AuthCache(ttl_s=30.0, clock=FakeClock())
    cache.put("digest-1", "k_a", "key a")
    cache.put("digest-2", "k_a", "key a")
    cache.put("digest-3", "k_b", "key b")
    cache.drop("k_a")
    assert (cache.get("digest-1"), cache.get("digest-2"), cache.get("digest-3")) == (None, None, "key b")
    cache.put("digest-1", "k_a", "key a")  # a check that read the row before the revoke finishes after it
    assert cache.get("digest-1") is None


def test_auth_cache_keeps_the_most_recently_used_when_full() -> None:
    cache: AuthCache[int] = AuthCache(ttl_s=30.0, max_entries=3, clock=FakeClock())
    for number in range(3):
        cache.put(f"d{number}", f"k_{number}", number)
    assert cache.get("d0") == 0  # d1 is now the least recently used
    cache.put("d3", "k_3", 3)
    assert [cache.get(f"d{number}") for number in range(4)] == [0, None, 2, 3]


def test_failed_auth_guard_limits_per_key_id_and_address_and_forgets_after_the_window() -> None:
    clock = FakeClock()
    guard = FailedAuthGuard(failures_per_address=100, failures_per_key=3, window_s=60, clock=clock)
    key_id = new_key_id()
    wrong = [new_secret(key_id) for _ in range(4)]
    for n, secret in enumerate(wrong[:3]):  # three addresses, one key id: the key id's limit applies
        assert guard.admit(f"10.0.0.{n}", secret) is None
        guard.failed(secret)
    assert guard.admit("10.0.0.9", wrong[0])[0] == 401  # a known-wrong secret: refused outright
    status, message, retry_after_s = guard.admit("10.0.0.9", wrong[3])
    assert status == 429 and key_id in message and retry_after_s == 60
    other = new_secret(new_key_id())
    assert guard.admit("10.0.0.9", other) is None  # other keys are not affected
    guard.succeeded("10.0.0.9", other)
    clock.now += 61
    assert guard.admit("10.0.0.9", wrong[3]) is None  # the window has passed


def test_failed_auth_guard_counts_checks_in_flight_so_concurrent_floods_cannot_overshoot() -> None:
    guard = FailedAuthGuard(failures_per_address=2, failures_per_key=100, clock=FakeClock())
    assert guard.admit("10.0.0.1", new_secret(new_key_id())) is None
    assert guard.admit("10.0.0.1", new_secret(new_key_id())) is None  # both still being hashed
    assert guard.admit("10.0.0.1", new_secret(new_key_id()))[0] == 429
    guard.succeeded("10.0.0.1", new_secret(new_key_id()))  # one of them was a valid key after all
    assert guard.admit("10.0.0.1", new_secret(new_key_id())) is None
