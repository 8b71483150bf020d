"""The serve store, on a SQLite file and on a real PostgreSQL server: keys, requests, conversations, feedback."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from chatforge.serve.keys import secret_digest
from chatforge.serve.store import RequestRecord, Store, StoreError

EMAIL, PHONE = "ana.lima@example.com", "+44 20 7946 0958"


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    with Store(database_url) as opened:
        yield opened


def raw_rows(url: str, table: str) -> list[dict[str, Any]]:
    """The table's rows as the database holds them, read without the Store."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(text(f'SELECT * FROM "{table}"'))]
    finally:
        engine.dispose()


def every_cell(url: str) -> list[bytes]:
    """Every value of every column of every row of every table, as bytes."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    tables = inspect(engine).get_table_names()
    engine.dispose()
    cells = []
    for table in tables:
        for row in raw_rows(url, table):
            for value in row.values():
                cells.append(bytes(value) if isinstance(value, (bytes, memoryview)) else str(value).encode())
    return cells


def test_keys_are_stored_as_salted_hashes_only(store: Store, database_url: str) -> None:
    created = [store.create_key(name) for name in ("alice", "bob", "carol")]
    for secret, key in created:
        assert store.authenticate(secret) == key  # also fills the in-memory cache; it must not reach the DB
    cells = every_cell(database_url)
    assert len(cells) >= 3 * 9  # the scan sees the rows: 9 columns per key
    for secret, key in created:
        assert any(cell == key.id.encode() for cell in cells)
        for leaked in (secret, secret[len(f"cf-{key.id}-"):], secret_digest(secret)):
            assert not any(leaked.encode() in cell for cell in cells), f"{leaked!r} is stored"
    rows = raw_rows(database_url, "api_keys")
    assert len({bytes(row["salt"]) for row in rows}) == 3 and all(len(bytes(row["secret_hash"])) == 32 for row in rows)


def test_authenticate_accepts_only_the_exact_live_secret(store: Store) -> None:
    secret, key = store.create_key("alice", scopes=["chat"], rpm=5, tpm=None)
    assert key.id.startswith("k_") and secret.startswith(f"cf-{key.id}-") and len(secret) == 3 + 10 + 1 + 32
    assert (key.name, key.scopes, key.rpm, key.tpm, key.revoked) == ("alice", frozenset({"chat"}), 5, None, False)
    assert key.created.tzinfo is not None and abs(datetime.now(UTC) - key.created) < timedelta(minutes=1)
    assert store.authenticate(secret) == key
    tail = secret[len(f"cf-{key.id}-"):]
    other_tail = ("A" if tail[0] != "A" else "B") + tail[1:]
    for wrong in (f"cf-{key.id}-{other_tail}", "cf-k_00000000-" + tail, secret + "x", secret[:-1], "",
                  "Bearer " + secret, secret.upper(), None, 42):
        assert store.authenticate(wrong) is None, wrong


def test_revoke_takes_effect_at_once_and_frees_the_name(store: Store) -> None:
    secret, key = store.create_key("alice")
    other_secret, other = store.create_key("bob")
    assert store.authenticate(secret) == key  # cached now
    revoked = store.revoke_key("alice")
    assert revoked.id == key.id and revoked.revoked
    assert store.authenticate(secret) is None
    assert store.authenticate(other_secret) == other
    assert store.revoke_key(other.id).revoked and store.authenticate(other_secret) is None  # by id too
    with pytest.raises(KeyError, match="no key with id or active name 'alice'"):
        store.revoke_key("alice")
    new_secret, new_key = store.create_key("alice")
    assert new_key.id != key.id and store.authenticate(new_secret) == new_key
    assert [(k.name, k.revoked) for k in store.list_keys()] == [("alice", True), ("bob", True), ("alice", False)]


def test_create_key_rejects_bad_settings(store: Store) -> None:
    store.create_key("alice")
    with pytest.raises(ValueError, match="active key named 'alice' exists"):
        store.create_key(" alice ")
    with pytest.raises(ValueError, match=r"unknown scope\(s\) \['root'\]"):
        store.create_key("eve", scopes=["chat", "root"])
    with pytest.raises(ValueError, match="at least one scope"):
        store.create_key("eve", scopes=[])
    with pytest.raises(ValueError, match="non-empty name"):
        store.create_key("  ")
    with pytest.raises(ValueError, match="rpm must be a positive whole number"):
        store.create_key("eve", rpm=0)
    with pytest.raises(ValueError, match="tpm must be a positive whole number"):
        store.create_key("eve", tpm=2.5)  # type: ignore[arg-type]
    assert [k.name for k in store.list_keys()] == ["alice"]
    _, admin = store.create_key("ops", scopes="admin,chat")
    assert admin.scopes == frozenset({"admin", "chat"})


def test_a_revoke_from_another_process_reaches_the_server(database_url: str) -> None:
    with Store(database_url, auth_cache_s=0) as server, Store(database_url) as cli:
        secret, key = cli.create_key("alice")
        assert server.authenticate(secret) == key
        cli.revoke_key("alice")
        assert server.authenticate(secret) is None


def test_requests_come_back_newest_first(store: Store) -> None:
    _, key = store.create_key("alice")
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    written = [RequestRecord(f"req-{i}", key.id if i % 2 else None, "tiny", "/v1/chat/completions", 200 + i, 0.5 * i,
                             None if i == 0 else 0.01 * i, 10 + i, 20 + i, start + timedelta(seconds=i))
               for i in (2, 0, 3, 1)]
    for record in written:
        store.record_request(record)
    newest = store.requests(limit=3)
    assert [r.request_id for r in newest] == ["req-3", "req-2", "req-1"]
    assert newest[0] == next(r for r in written if r.request_id == "req-3")
    assert store.requests()[-1].ttft_s is None and store.requests()[-1].key_id is None
    store.record_request(RequestRecord("req-now", None, "tiny", "/v1/models", 401, 0.001, None, 0, 0))
    assert store.requests(limit=1)[0].request_id == "req-now"


def test_conversations_and_feedback_are_stored_redacted(store: Store, database_url: str) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Write to {EMAIL} or call {PHONE}"}]
    store.store_conversation("chatcmpl-1", None, "tiny", messages, f"Sure, I will mail {EMAIL}.")
    store.add_feedback("chatcmpl-1", None, -1, correction=f"Call {PHONE} instead.", comment=f"I am {EMAIL}")
    stored = raw_rows(database_url, "conversations")[0]
    assert "[EMAIL]" in str(stored["messages"]) and "[PHONE]" in str(stored["messages"])
    assert stored["answer"] == "Sure, I will mail [EMAIL]."
    feedback = raw_rows(database_url, "feedback")[0]
    assert (feedback["correction"], feedback["comment"]) == ("Call [PHONE] instead.", "I am [EMAIL]")
    for cell in every_cell(database_url):
        assert EMAIL.encode() not in cell and b"7946" not in cell
    assert messages[1]["content"].endswith(PHONE)  # the caller's messages are not changed


def test_feedback_needs_a_stored_completion_of_the_key_and_a_thumb_and_replaces_its_rating(store: Store) -> None:
    _, key = store.create_key("alice")
    store.store_conversation("chatcmpl-a", key.id, "tiny", [{"role": "user", "content": "hi"}], "Hello!")
    for rating in (0, 2, True, "1"):
        with pytest.raises(ValueError, match="rating must be 1"):
            store.add_feedback("chatcmpl-a", key.id, rating)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="'chatcmpl-zzz' was not stored"):
        store.add_feedback("chatcmpl-zzz", key.id, 1)
    _, other = store.create_key("mallory")
    for stranger in (other.id, None):  # another key's completion looks exactly like an unknown one
        with pytest.raises(KeyError, match="'chatcmpl-a' was not stored for this key"):
            store.add_feedback("chatcmpl-a", stranger, 1)
    first = store.add_feedback("chatcmpl-a", key.id, 1, correction="   ")
    assert [(r["id"], r["rating"], r["correction"]) for r in store.feedback_rows()] == [(first, 1, None)]
    again = store.add_feedback("chatcmpl-a", key.id, -1, correction="Hi there!", comment="too short")
    rows = store.feedback_rows()
    assert again == first and [(r["id"], r["rating"], r["correction"], r["key_id"]) for r in rows] == [
        (first, -1, "Hi there!", key.id)]  # one rating per completion and key: the second replaced the first
    assert rows[0]["messages"] == [{"role": "user", "content": "hi"}] and rows[0]["answer"] == "Hello!"
    assert rows[0]["comment"] == "too short" and rows[0]["model"] == "tiny" and rows[0]["created"].tzinfo


def test_store_conversation_rejects_what_it_cannot_keep(store: Store) -> None:
    store.store_conversation("chatcmpl-1", None, "tiny", [
        {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]}], "ok")
    assert store.feedback_rows() == []
    store.add_feedback("chatcmpl-1", None, 1)
    assert store.feedback_rows()[0]["messages"] == [{"role": "user", "content": "two parts"}]
    with pytest.raises(ValueError, match="'chatcmpl-1': a conversation with this id is stored already"):
        store.store_conversation("chatcmpl-1", None, "tiny", [{"role": "user", "content": "hi"}], "ok")
    with pytest.raises(ValueError, match="message 2 needs a 'role'"):
        store.store_conversation("chatcmpl-2", None, "tiny", [{"role": "user", "content": "a"}, {"content": "b"}], "")
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        store.store_conversation("chatcmpl-3", None, "tiny", [], "ok")


def test_many_threads_share_one_store(store: Store) -> None:
    secret, key = store.create_key("alice")
    failures: list[BaseException] = []

    def serve(worker: int) -> None:
        try:
            for i in range(15):
                assert store.authenticate(secret) == key
                store.record_request(RequestRecord(f"w{worker}-{i}", key.id, "tiny", "/v1/completions", 200, 0.1,
                                                   0.01, 5, 7))
                store.store_conversation(f"c-{worker}-{i}", key.id, "tiny", [{"role": "user", "content": "q"}], "a")
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            failures.append(exc)

    threads = [threading.Thread(target=serve, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(store.requests(limit=1000)) == 60


def test_sqlite_store_uses_wal_and_makes_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "serve.db"
    with Store(f"sqlite:///{path}") as store:
        secret, key = store.create_key("alice")
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Store(f"sqlite:///{path}") as reopened:
        assert reopened.authenticate(secret) == key
    with Store("sqlite://") as in_memory:  # one database for every thread
        _, key = in_memory.create_key("alice")
        seen: list[int] = []
        worker = threading.Thread(target=lambda: seen.append(len(in_memory.list_keys())))
        worker.start()
        worker.join()
        assert seen == [1]


def test_bad_database_urls_say_what_is_wrong_without_the_password() -> None:
    for url, message in (("not a url", "is not a URL"),
                         ("mysql://me:hunter2@db.example.com/chat", "only sqlite"),
                         ("postgresql://me:hunter2@127.0.0.1:1/chat", "cannot open it")):
        with pytest.raises(StoreError, match=message) as raised:
            Store(url)
        assert "hunter2" not in str(raised.value)
