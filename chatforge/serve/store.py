"""What the server keeps: API keys (salted hashes only), request records, redacted conversations and feedback.

Use it like this::

    store = Store("sqlite:///chatforge.db")              # or "postgresql://user:pw@host/db"; tables made if missing
    secret, key = store.create_key("alice", scopes=["chat", "feedback"], rpm=60, tpm=20000)
    store.authenticate(secret)                           # ApiKey(id='k_3f9a2c1d', ...), or None
    store.record_request(RequestRecord("req-1", key.id, "my-run", "/v1/chat/completions", 200, 0.41, 0.05, 12, 30))
    store.store_conversation("chatcmpl-1", key.id, "my-run", [{"role": "user", "content": "hi"}], "Hello!")
    store.add_feedback("chatcmpl-1", key.id, rating=+1)
    store.revoke_key("alice")

SQLite (a file, WAL journal, safe from many threads) by default; PostgreSQL through psycopg 3 (`postgresql://`
means `postgresql+psycopg://`). Times are stored and returned in UTC. Conversations, corrections and comments pass
through the same PII redactor as `chatforge prepare` before they are written. Tables: api_keys, requests,
conversations, feedback (which points at its conversation by completion_id), rate_events (the rate limiter's
sliding windows, shared by every server on the database: see chatforge.serve.limits).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from chatforge.config import PiiConfig
from chatforge.core.pii import Redactor
from chatforge.db import DatabaseURLError, engine_for
from chatforge.serve import keys
from chatforge.serve.store_schema import (
    Base,
    ConversationRow,
    FeedbackRow,
    KeyRow,
    RequestRow,
)


class StoreError(ValueError):
    """The database URL is wrong or the database cannot be reached; the message names it (without a password)."""


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ApiKey:
    """What authentication yields; never holds the secret."""

    id: str  # short public id, e.g. "k_3f9a2c1d" (also the key's visible prefix)
    name: str
    scopes: frozenset[str]  # subset of {"chat", "feedback", "admin"}
    rpm: int | None  # requests per minute, None = unlimited
    tpm: int | None  # tokens (prompt + completion) per minute, None = unlimited
    created: datetime
    revoked: bool


@dataclass(frozen=True)
class RequestRecord:
    """One served request, for the requests table (no message content, no secret)."""

    request_id: str
    key_id: str | None
    model: str
    route: str
    status: int
    latency_s: float
    ttft_s: float | None
    tokens_in: int
    tokens_out: int
    created: datetime = field(default_factory=utc_now)


class Store:
    """Keys, request records, conversations and feedback in one SQLAlchemy database; safe to share between threads.

    `pii` picks what `store_conversation` and `add_feedback` redact (default: what `prepare` redacts);
    `auth_cache_s` is how long a verified key is trusted without re-hashing (a revoke from another process, such
    as the CLI, takes effect within it; a revoke through this Store at once).
    """

    def __init__(self, url: str = "sqlite:///chatforge.db", pii: PiiConfig | None = None,
                 auth_cache_s: float = 30.0) -> None:
        try:
            self._engine = engine_for(url)
        except DatabaseURLError as exc:  # not a URL, not SQLite/PostgreSQL, or no driver
            raise StoreError(str(exc)) from None
        self.url = self._engine.url.render_as_string(hide_password=True)
        try:
            Base.metadata.create_all(self._engine)
        except OperationalError as exc:
            self._engine.dispose()
            raise StoreError(f"database {self.url}: cannot open it: {str(exc.orig).strip()}") from None
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._redactor = Redactor.from_config(pii or PiiConfig())
        self._auth_cache: keys.AuthCache[ApiKey] = keys.AuthCache(ttl_s=auth_cache_s)
        self._sqlite_writer = threading.Lock()

    # --- keys ---------------------------------------------------------------------------------------------------

    def create_key(self, name: str, scopes: Iterable[str] = ("chat", "feedback"), rpm: int | None = 60,
                   tpm: int | None = 20000) -> tuple[str, ApiKey]:
        """Make a key; returns (the secret, to show once, and the ApiKey). Only a salted hash is stored.

        ValueError for an empty, unprintable or reserved name (see keys.checked_key_name), unknown scopes, a
        non-positive limit, or a name an active key already has.
        """
        name = keys.checked_key_name(name)
        chosen = keys.checked_scopes(scopes)
        for label, limit in (("rpm", rpm), ("tpm", tpm)):
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise ValueError(f"{label} must be a positive whole number or None (unlimited), got {limit!r}")
        for _ in range(5):  # a fresh id clashes with an existing one about once in 4 billion
            key_id = keys.new_key_id()
            secret, salt = keys.new_secret(key_id), keys.new_salt()
            row = KeyRow(id=key_id, name=name, scopes=",".join(sorted(chosen)), rpm=rpm, tpm=tpm, salt=salt,
                         secret_hash=keys.hash_secret(secret, salt), created=utc_now(), revoked_at=None)
            try:
                with self._sessions.begin() as session:
                    self._refuse_active_name(session, name)
                    session.add(row)
            except IntegrityError:  # another writer took the name (unique index) or the id between check and insert
                with self._sessions() as session:
                    self._refuse_active_name(session, name)
                continue
            return secret, _api_key(row)
        raise StoreError(f"database {self.url}: could not insert a new key into api_keys")

    @staticmethod
    def _refuse_active_name(session: Session, name: str) -> None:
        if session.scalar(select(KeyRow.id).where(KeyRow.name == name, KeyRow.revoked_at.is_(None))):
            raise ValueError(f"an active key named {name!r} exists; revoke it first or pick another name")

    def list_keys(self) -> list[ApiKey]:
        """Every key, revoked ones too, oldest first."""
        with self._sessions() as session:
            return [_api_key(row) for row in session.scalars(select(KeyRow).order_by(KeyRow.created, KeyRow.id))]

    def revoke_key(self, id_or_name: str) -> ApiKey:
        """Revoke a key by id (any state) or by the name of an active key; KeyError when neither matches."""
        with self._sessions.begin() as session:
            row = session.get(KeyRow, id_or_name) or session.scalars(
                select(KeyRow).where(KeyRow.name == id_or_name, KeyRow.revoked_at.is_(None))).first()
            if row is None:
                raise KeyError(f"no key with id or active name {id_or_name!r}; `chatforge keys list` shows them")
            if row.revoked_at is None:
                row.revoked_at = utc_now()
            key = _api_key(row)
        self._auth_cache.drop(key.id)
        return key

    def cached_key(self, secret: str) -> ApiKey | None:
        """The key of a secret verified in the last `auth_cache_s` seconds (no hashing, no database), else None."""
        if keys.key_id_of(secret) is None:
            return None
        return self._auth_cache.get(keys.secret_digest(secret))

    def identity_key(self, subject: str, scopes: Iterable[str], rpm: int | None, tpm: int | None) -> ApiKey:
        """The key row standing for an OAuth identity (made on first sight, never usable as an API key): its id
        is what requests, conversations and feedback of that identity point at, and revoking it (by id or by its
        name 'oauth:<subject>') refuses the identity's tokens. Scopes and limits are the caller's (the token's)."""
        name = keys.RESERVED_NAME_PREFIX + subject
        digest = "identity:" + keys.secret_digest(name)
        cached = self._auth_cache.get(digest)
        if cached is None:
            key_id = "o_" + keys.secret_digest(name)[:12]
            with self._sessions() as session:
                row = session.get(KeyRow, key_id)
            if row is None:
                row = KeyRow(id=key_id, name=name, scopes="", rpm=None, tpm=None, salt=b"", secret_hash=b"",
                             created=utc_now(), revoked_at=None)
                try:
                    with self._sessions.begin() as session:
                        session.add(row)
                except IntegrityError:  # another request (or replica) made it first
                    with self._sessions() as session:
                        row = session.get(KeyRow, key_id)
                if row is None:
                    raise StoreError(f"database {self.url}: could not record the OAuth identity {subject!r}")
            cached = _api_key(row)
            self._auth_cache.put(digest, cached.id, cached)
        return ApiKey(id=cached.id, name=name, scopes=frozenset(scopes), rpm=rpm, tpm=tpm, created=cached.created,
                      revoked=cached.revoked)

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key this secret belongs to, or None when it is malformed, unknown, wrong or revoked."""
        key_id = keys.key_id_of(secret)
        if key_id is None:
            return None
        digest = keys.secret_digest(secret)
        cached = self._auth_cache.get(digest)
        if cached is not None:
            return cached
        with self._sessions() as session:
            row = session.get(KeyRow, key_id)
        if row is None or row.revoked_at is not None or not keys.secret_matches(secret, row.salt, row.secret_hash):
            return None
        key = _api_key(row)
        self._auth_cache.put(digest, key.id, key)
        return key

    # --- requests, conversations, feedback ------------------------------------------------------------------------

    def record_request(self, row: RequestRecord) -> None:
        with self._sessions.begin() as session:
            session.add(RequestRow(request_id=row.request_id, key_id=row.key_id, model=row.model, route=row.route,
                                   status=row.status, latency_s=row.latency_s, ttft_s=row.ttft_s,
                                   tokens_in=row.tokens_in, tokens_out=row.tokens_out, created=row.created))

    def requests(self, limit: int = 100) -> list[RequestRecord]:
        """The latest `limit` request records, newest first."""
        with self._sessions() as session:
            rows = session.scalars(select(RequestRow).order_by(RequestRow.created.desc(), RequestRow.id.desc())
                                   .limit(limit))
            return [RequestRecord(row.request_id, row.key_id, row.model, row.route, row.status, row.latency_s,
                                  row.ttft_s, row.tokens_in, row.tokens_out, row.created) for row in rows]

    def store_conversation(self, completion_id: str, key_id: str | None, model: str, messages: list[dict],
                           answer: str) -> None:
        """Keep a served conversation (PII-redacted) so feedback can refer to it by completion id.

        ValueError when a message has no role or non-text content, or the completion id is stored already.
        """
        redacted_messages, _ = self._redactor.redact_messages(_chat_messages(messages, completion_id))
        redacted_answer, _ = self._redactor.redact(answer)
        try:
            with self._sessions.begin() as session:
                session.add(ConversationRow(completion_id=completion_id, key_id=key_id, model=model,
                                            messages=redacted_messages, answer=redacted_answer, created=utc_now()))
        except IntegrityError:
            raise ValueError(f"completion {completion_id!r}: a conversation with this id is stored already") from None

    def check_feedback_target(self, completion_id: str, key_id: str | None) -> None:
        """Raise KeyError, cheaply and before any redaction, when the completion was not stored or belongs to
        another key (the same answer for both, so completion ids cannot be probed)."""
        with self._sessions() as session:
            self._check_target(session, completion_id, key_id)

    @staticmethod
    def _check_target(session: Session, completion_id: str, key_id: str | None) -> None:
        conversation = session.get(ConversationRow, completion_id)
        if conversation is None or conversation.key_id != key_id:
            raise KeyError(f"completion {completion_id!r} was not stored for this key (unknown id, another key's, "
                           "or its request said store: false), so it cannot take feedback")

    def add_feedback(self, completion_id: str, key_id: str | None, rating: int, correction: str | None = None,
                     comment: str | None = None) -> int:
        """Store a rating (+1 or -1) with an optional corrected answer and comment; returns the feedback row id.

        Only the key the completion was answered to may rate it, and it has one rating per completion: rating
        again replaces the earlier rating, correction and comment (same row id). ValueError for another rating or
        non-text correction/comment; KeyError when the completion was not stored for this key (unknown id,
        another key's, or its request said `store: false`), checked before anything is redacted. Blank
        corrections and comments count as none.
        """
        if isinstance(rating, bool) or rating not in (-1, 1):
            raise ValueError(f"rating must be 1 (thumbs up) or -1 (thumbs down), got {rating!r}")
        for label, value in (("correction", correction), ("comment", comment)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{label} must be text, got {type(value).__name__}")
        self.check_feedback_target(completion_id, key_id)
        correction, comment = (self._redacted_note(value) for value in (correction, comment))
        for attempt in range(2):
            try:
                with self._sessions.begin() as session:
                    row = session.scalars(select(FeedbackRow).where(FeedbackRow.completion_id == completion_id,
                                                                    FeedbackRow.key_id == key_id)
                                          .order_by(FeedbackRow.id.desc())).first()
                    if row is None:
                        row = FeedbackRow(completion_id=completion_id, key_id=key_id)
                        session.add(row)
                    row.rating, row.correction, row.comment, row.created = int(rating), correction, comment, utc_now()
                    session.flush()
                    return row.id
            except IntegrityError:  # a concurrent first rating won the unique (completion_id, key_id) index
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _redacted_note(self, value: str | None) -> str | None:
        if value is None:
            return None
        return self._redactor.redact(value)[0] if value.strip() else None

    def feedback_rows(self) -> list[dict[str, Any]]:
        """Every feedback row, oldest first, joined with its conversation: id, completion_id, key_id, rating,
        correction, comment, created, model, messages, answer."""
        with self._sessions() as session:
            pairs = session.execute(select(FeedbackRow, ConversationRow)
                                    .join(ConversationRow, FeedbackRow.completion_id == ConversationRow.completion_id)
                                    .order_by(FeedbackRow.id))
            return [{"id": fb.id, "completion_id": fb.completion_id, "key_id": fb.key_id, "rating": fb.rating,
                     "correction": fb.correction, "comment": fb.comment, "created": fb.created, "model": conv.model,
                     "messages": conv.messages, "answer": conv.answer} for fb, conv in pairs]

    # --- rate windows -----------------------------------------------------------------------------------------------

    @contextmanager
    def key_window(self, key_id: str) -> Iterator[tuple[Session, float]]:
        """A transaction holding this key's rate-limit lock, and the database's clock in epoch seconds.

        PostgreSQL: a transaction-scoped advisory lock on the key id (every server on the database waits for it)
        and the server's clock, so replicas never disagree on time. SQLite: BEGIN IMMEDIATE (one writer per file)
        and this machine's clock. The lock is released at commit/rollback.
        """
        with self._sessions() as session:
            if self._engine.dialect.name == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key_id, 7))"),
                                {"key_id": key_id})
                now = float(session.scalar(text("SELECT extract(epoch FROM clock_timestamp())")))
                yield from self._committed(session, now)
                return
            with self._sqlite_writer:  # threads of this process queue here rather than in SQLite's busy wait
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
                yield from self._committed(session, time.time())

    @staticmethod
    def _committed(session: Session, now: float) -> Iterator[tuple[Session, float]]:
        try:
            yield session, now
            session.commit()
        except BaseException:
            session.rollback()
            raise

    # --- upkeep -------------------------------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise StoreError when the database does not answer (for a readiness check)."""
        try:
            with self._engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except OperationalError as exc:
            raise StoreError(f"database {self.url}: not answering: {str(exc.orig).strip()}") from None

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _api_key(row: KeyRow) -> ApiKey:
    return ApiKey(id=row.id, name=row.name, scopes=frozenset(row.scopes.split(",")), rpm=row.rpm, tpm=row.tpm,
                  created=row.created, revoked=row.revoked_at is not None)


def _chat_messages(messages: list[Any], completion_id: str) -> list[dict[str, str]]:
    """Messages as plain {"role", "content"[, "name"]} dicts with text content (pydantic models are accepted)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"completion {completion_id!r}: messages must be a non-empty list")
    plain: list[dict[str, str]] = []
    for position, message in enumerate(messages, start=1):
        if hasattr(message, "model_dump"):
            message = message.model_dump(exclude_none=True)
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"completion {completion_id!r}: message {position} needs a 'role' string")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: the text parts are the message
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise ValueError(f"completion {completion_id!r}: message {position} has no text content")
        entry = {"role": message["role"], "content": content}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        plain.append(entry)
    return plain
