"""The serve store's tables as SQLAlchemy rows: api_keys, requests, conversations, feedback, rate_events.

Use them through `chatforge.serve.store.Store`; the rate limiter (limits.py) queries `RateEventRow` directly::

    from chatforge.serve.store_schema import Base, RateEventRow
    Base.metadata.create_all(engine)                     # Store does this on open
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Dialect, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out on every backend (SQLite keeps no zone, so it stores naive UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class KeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (sa.Index("ix_api_keys_active_name", "name", unique=True,  # one active key per name
                            sqlite_where=text("revoked_at IS NULL"), postgresql_where=text("revoked_at IS NULL")),)

    id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String)
    scopes: Mapped[str] = mapped_column(sa.String)  # comma-separated, sorted
    rpm: Mapped[int | None] = mapped_column(sa.Integer)
    tpm: Mapped[int | None] = mapped_column(sa.Integer)
    salt: Mapped[bytes] = mapped_column(sa.LargeBinary)
    secret_hash: Mapped[bytes] = mapped_column(sa.LargeBinary)
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class RequestRow(Base):
    __tablename__ = "requests"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(sa.String, index=True)
    key_id: Mapped[str | None] = mapped_column(sa.ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(sa.String)
    route: Mapped[str] = mapped_column(sa.String)
    status: Mapped[int] = mapped_column(sa.Integer)
    latency_s: Mapped[float] = mapped_column(sa.Float)
    ttft_s: Mapped[float | None] = mapped_column(sa.Float)
    tokens_in: Mapped[int] = mapped_column(sa.Integer)
    tokens_out: Mapped[int] = mapped_column(sa.Integer)
    created: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class ConversationRow(Base):
    __tablename__ = "conversations"

    completion_id: Mapped[str] = mapped_column(sa.String, primary_key=True)
    key_id: Mapped[str | None] = mapped_column(sa.ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(sa.String)
    messages: Mapped[list[dict[str, str]]] = mapped_column(sa.JSON)  # redacted
    answer: Mapped[str] = mapped_column(sa.Text)  # redacted
    created: Mapped[datetime] = mapped_column(UtcDateTime)


class FeedbackRow(Base):
    __tablename__ = "feedback"
    __table_args__ = (sa.Index("ix_feedback_one_per_key", "completion_id", "key_id", unique=True),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    completion_id: Mapped[str] = mapped_column(sa.ForeignKey("conversations.completion_id"), index=True)
    key_id: Mapped[str | None] = mapped_column(sa.ForeignKey("api_keys.id"))
    rating: Mapped[int] = mapped_column(sa.SmallInteger)  # -1 or +1
    correction: Mapped[str | None] = mapped_column(sa.Text)  # redacted
    comment: Mapped[str | None] = mapped_column(sa.Text)  # redacted
    created: Mapped[datetime] = mapped_column(UtcDateTime)


class RateEventRow(Base):
    """One admitted request of a rate-limited key: when (epoch seconds) and the tokens it holds in the window."""

    __tablename__ = "rate_events"
    __table_args__ = (sa.Index("ix_rate_events_key_at", "key_id", "at"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(sa.String(64))  # an API key id or a token's rate-limit identity: no FK
    at: Mapped[float] = mapped_column(sa.Float)
    tokens: Mapped[int] = mapped_column(sa.Integer)
    settled: Mapped[bool] = mapped_column(sa.Boolean, default=False)
