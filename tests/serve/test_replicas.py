"""Two `chatforge serve` apps (uvicorn on loopback, the tiny run) on one real PostgreSQL share keys and limits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from chatforge.models.run import LoadedRun
from chatforge.serve.app import create_app
from chatforge.serve.backends import TorchBackend
from chatforge.serve.store import Store
from tests.serve.conftest import running_server, serve_config
from tests.serve.postgres import PostgresServer

CHAT = "/v1/chat/completions"
HELLO = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
KEY_CACHE_S = 1.0


@dataclass
class Replica:
    url: str
    store: Store


@pytest.fixture
def replicas(served_model: LoadedRun, serve_run: Path, postgres_server: PostgresServer) -> Iterator[list[Replica]]:
    """Two servers, each with its own Store (pool, key cache, limiter), on one PostgreSQL database."""
    database = postgres_server.new_database()
    with ExitStack() as stack:
        started = []
        for _ in range(2):
            cfg = serve_config(serve_run, Path("unused"), key_cache_s=KEY_CACHE_S).model_copy(update={"db": database})
            store = Store(cfg.db, auth_cache_s=cfg.key_cache_s)
            stack.callback(store.close)
            app = create_app(cfg, store=store, backend=TorchBackend(cfg, loaded=served_model))
            started.append(Replica(stack.enter_context(running_server(app)), store))
        yield started


def test_a_key_gets_its_rpm_once_across_two_replicas(replicas: list[Replica]) -> None:
    secret = replicas[0].store.create_key("alice", rpm=4, tpm=None)[0]
    statuses = [httpx.post(replicas[n % 2].url + CHAT, json=HELLO, timeout=60,
                           headers={"Authorization": f"Bearer {secret}"}).status_code for n in range(8)]
    assert sorted(statuses) == [200] * 4 + [429] * 4, statuses
    assert statuses[:4] == [200] * 4  # both replicas served their first two, then both refuse
    assert replicas[1].store.authenticate(secret) is not None


def test_a_revoke_on_one_replica_reaches_the_other_within_the_key_cache_ttl(replicas: list[Replica]) -> None:
    first, second = replicas
    secret = first.store.create_key("bob", rpm=None, tpm=None)[0]
    headers = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(second.url + "/v1/models", headers=headers).status_code == 200  # now in the second's cache
    first.store.revoke_key("bob")
    revoked_at = time.monotonic()
    assert httpx.get(first.url + "/v1/models", headers=headers).status_code == 401  # at once where it was revoked
    while httpx.get(second.url + "/v1/models", headers=headers).status_code == 200:
        assert time.monotonic() - revoked_at < KEY_CACHE_S + 2.0, "the second replica still accepts a revoked key"
        time.sleep(0.05)
    waited = time.monotonic() - revoked_at
    assert waited < KEY_CACHE_S + 2.0


def test_serve_key_cache_s_sets_how_long_a_server_trusts_a_checked_key(tmp_path: Path, serve_run: Path) -> None:
    cfg = serve_config(serve_run, tmp_path / "db.sqlite", key_cache_s=0.25)
    app = create_app(cfg, backend=TorchBackend(cfg, run=serve_run))  # the app makes its own Store from cfg
    store = app.state.serve.store
    secret = store.create_key("carol", rpm=None, tpm=None)[0]
    assert store.authenticate(secret) is not None
    with Store(cfg.db) as cli:
        cli.revoke_key("carol")
    assert store.authenticate(secret) is not None  # still cached
    time.sleep(0.3)
    assert store.authenticate(secret) is None
    store.close()
