"""SQLAlchemy engines for chatforge's databases: a SQLite file by default, or a PostgreSQL server.

Use it like this::

    engine = engine_for("sqlite:///chatforge.db")          # or "postgresql://user:password@host/database"
    Base.metadata.create_all(engine)                        # your tables; the serve store and rating tables share it

`postgresql://` (or `postgres://`) means psycopg 3 (`postgresql+psycopg://`), the driver chatforge installs, with
connections checked before use. A SQLite file gets its folder made, WAL journal (readers do not wait for the
writer), a 30 s busy wait, foreign keys on, and may be used from many threads; `sqlite://` (in memory) is one shared
connection, so every thread sees the same database. Any other URL raises DatabaseURLError (a ValueError) saying
what is wrong, without the password.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool


class DatabaseURLError(ValueError):
    """A database URL that is not a URL, names an unsupported database, or needs a driver that is not installed."""


def engine_for(url: str) -> Engine:
    """An engine for a SQLite or PostgreSQL URL (see the module docstring); DatabaseURLError for anything else."""
    try:
        parsed: URL = make_url(url)
    except ArgumentError:
        shown = url.rpartition("@")[2] if isinstance(url, str) else repr(url)  # never echo a password
        raise DatabaseURLError(f"database URL {shown!r} is not a URL; use sqlite:///file.db or "
                               "postgresql://user:password@host/database") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we install
    backend = parsed.get_backend_name()
    shown = parsed.render_as_string(hide_password=True)
    try:
        if backend == "sqlite":
            return _sqlite_engine(parsed)
        if backend == "postgresql":
            return create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=10)
    except ImportError as exc:
        raise DatabaseURLError(f"database {shown}: its driver is not installed ({exc}); PostgreSQL uses psycopg "
                               "(pip install 'psycopg[binary]')") from None
    raise DatabaseURLError(f"database {shown}: only sqlite:///file.db and postgresql://... are supported")


def _sqlite_engine(parsed: URL) -> Engine:
    if not parsed.database or parsed.database == ":memory:":  # one shared connection, or each thread sees its own db
        engine = create_engine(parsed, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    else:
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=8, max_overflow=16)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(connection: sqlite3.Connection, _record: object) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across crashes of the process
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
