"""Where blind A/B ratings are kept: the studies, their items and the ratings, in SQLite or PostgreSQL.

Use it like this::

    store = RatingStore("sqlite:///chatforge.db")      # or postgresql://...; creates the tables when missing
    study = store.find_study(run_a, run_b, data, "test") or store.create_study(run_a, run_b, data, "test")
    item = store.next_item(study.id, "ann")            # None when ann has rated every item
    store.record(study.id, item.id, "ann", "left", comment="clearer")

`chatforge.evaluate.rating` builds the studies (items and both runs' answers) and adds up the results; this module
only stores them. The tables have their own metadata, so they can share a database with the serve store;
the engine comes from `chatforge.db.engine_for`.

Raters see the two answers as "Answer 1" and "Answer 2". Which run is shown first is decided per item and rater by
an HMAC of a random per-study key, so it looks random, never reaches the page, and stays the same on reload; a
rating is stored as "a", "b" or "tie" together with the side A was shown on. Each rater has their own queue (the
study's items in a per-rater shuffled order) and rates an item at most once (a unique (item, rater) constraint).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from chatforge.db import engine_for

DEFAULT_DB_URL = "sqlite:///chatforge.db"
CHOICES = ("a", "b", "tie")
SIDES = ("left", "right", "tie")  # what the page sends: left = "Answer 1", right = "Answer 2"
MAX_RATER_CHARS = 64


class RatingBase(DeclarativeBase):
    """The rating tables' own metadata, so they can share a database with the serve store."""


class StudyRow(RatingBase):
    __tablename__ = "rating_studies"
    __table_args__ = (UniqueConstraint("run_a", "run_b", "data", "split"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_a: Mapped[str] = mapped_column(String(1000))
    run_b: Mapped[str] = mapped_column(String(1000))
    data: Mapped[str] = mapped_column(String(1000))
    split: Mapped[str] = mapped_column(String(200))
    order_key: Mapped[str] = mapped_column(String(64))  # secret: decides left/right order and queue order
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ItemRow(RatingBase):
    __tablename__ = "rating_items"
    __table_args__ = (UniqueConstraint("study_id", "record_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("rating_studies.id"), index=True)
    record_id: Mapped[str] = mapped_column(String(200))  # the conversation's "id", or "test.jsonl:LINE"
    prompt: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    answer_a: Mapped[str] = mapped_column(Text)
    answer_b: Mapped[str] = mapped_column(Text)


class RatingRow(RatingBase):
    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("item_id", "rater"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("rating_items.id"), index=True)
    rater: Mapped[str] = mapped_column(String(MAX_RATER_CHARS))
    choice: Mapped[str] = mapped_column(String(3))  # "a" | "b" | "tie"
    comment: Mapped[str] = mapped_column(Text, default="")
    shown_left: Mapped[str] = mapped_column(String(1))  # "a" | "b": which run was "Answer 1"
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass
class RatingItem:
    """One prompt and the two runs' answers to it."""

    id: int
    study_id: int
    record_id: str
    prompt: list[dict[str, str]]
    answer_a: str
    answer_b: str


@dataclass
class RatingStudy:
    """Two runs compared on one split of one dataset; `items` are all its stored items, in id order."""

    id: int
    run_a: str
    run_b: str
    data: str
    split: str
    created: str
    items: list[RatingItem] = field(default_factory=list)


@dataclass
class StoredRating:
    item_id: int
    rater: str
    choice: str  # "a" | "b" | "tie"
    comment: str
    shown_left: str  # "a" | "b"


class UnknownItemError(LookupError):
    """An item id that is not part of the study being rated (HTTP 404)."""


class AlreadyRatedError(ValueError):
    """This rater already rated this item (HTTP 409)."""


def clean_rater_name(name: str) -> str:
    """The rater's name without surrounding spaces; ValueError when empty or longer than 64 characters."""
    cleaned = name.strip()
    if not cleaned or len(cleaned) > MAX_RATER_CHARS:
        raise ValueError(f"rater name {name!r}: give 1 to {MAX_RATER_CHARS} characters (not only spaces)")
    return cleaned


def _keyed_hash(key: str, text: str) -> bytes:
    return hmac.new(key.encode(), text.encode(), hashlib.sha256).digest()


def shown_left_for(order_key: str, item_id: int, rater: str) -> str:
    """Which run ("a" or "b") `rater` sees as Answer 1 of `item_id`: half each, unpredictable without the key."""
    return "a" if _keyed_hash(order_key, f"side:{item_id}:{rater}")[0] & 1 else "b"


def choice_from_side(side: str, shown_left: str) -> str:
    """The stored choice ("a" | "b" | "tie") for what the page sent ("left" | "right" | "tie")."""
    if side not in SIDES:
        raise ValueError(f"choice {side!r}: expected one of {', '.join(SIDES)}")
    if side == "tie":
        return "tie"
    shown_right = "b" if shown_left == "a" else "a"
    return shown_left if side == "left" else shown_right


class RatingStore:
    """The rating tables in one SQLite or PostgreSQL database; one engine, a short transaction per call.

    Use it like this::

        store = RatingStore("sqlite:///chatforge.db")      # creates the tables when missing
        item = store.next_item(study_id, "ann")            # None when ann has rated every item
        store.record(study_id, item.id, "ann", "left", comment="clearer")
    """

    def __init__(self, db_url: str = DEFAULT_DB_URL) -> None:
        self.db_url = db_url
        self.engine = engine_for(db_url)
        RatingBase.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def find_study(self, run_a: str, run_b: str, data: str, split: str) -> RatingStudy | None:
        with self._session() as session:
            row = session.scalar(select(StudyRow).filter_by(run_a=run_a, run_b=run_b, data=data, split=split))
            return None if row is None else self._study(session, row)

    def create_study(self, run_a: str, run_b: str, data: str, split: str) -> RatingStudy:
        with self._session.begin() as session:
            row = StudyRow(run_a=run_a, run_b=run_b, data=data, split=split, order_key=secrets.token_hex(16),
                           created=datetime.now(UTC))
            session.add(row)
            session.flush()
            return self._study(session, row)

    def study(self, study_id: int) -> RatingStudy:
        """The study with its items; LookupError when there is no such study."""
        with self._session() as session:
            row = session.get(StudyRow, study_id)
            if row is None:
                raise LookupError(f"{self.db_url}: no rating study {study_id}")
            return self._study(session, row)

    def latest_study(self, run_a: str | None = None, run_b: str | None = None) -> RatingStudy:
        """The newest study (of these runs, when given); LookupError naming the stored studies when none fits."""
        with self._session() as session:
            query = select(StudyRow).order_by(StudyRow.created.desc(), StudyRow.id.desc())
            if run_a is not None:
                query = query.filter_by(run_a=run_a)
            if run_b is not None:
                query = query.filter_by(run_b=run_b)
            row = session.scalars(query.limit(1)).first()
            if row is not None:
                return self._study(session, row)
            known = [f"{r.run_a} vs {r.run_b}" for r in session.scalars(select(StudyRow))]
        wanted = f" for {run_a or 'any run'} vs {run_b or 'any run'}" if run_a or run_b else ""
        hint = f"; stored: {', '.join(known)}" if known else "; run `chatforge rate RUN_A RUN_B --data DIR` first"
        raise LookupError(f"{self.db_url}: no rating study{wanted}{hint}")

    def add_items(self, study_id: int, items: Sequence[tuple[str, list[dict[str, str]], str, str]]) -> None:
        """Store (record_id, prompt, answer_a, answer_b) tuples as items of the study."""
        with self._session.begin() as session:
            session.add_all(ItemRow(study_id=study_id, record_id=record_id, prompt=prompt, answer_a=a, answer_b=b)
                            for record_id, prompt, a, b in items)

    def next_item(self, study_id: int, rater: str) -> RatingItem | None:
        """The first item in `rater`'s own shuffled queue that they have not rated; None when they are done."""
        rater = clean_rater_name(rater)
        with self._session() as session:
            order_key = self._order_key(session, study_id)
            rated = set(session.scalars(select(RatingRow.item_id).join(ItemRow).where(
                ItemRow.study_id == study_id, RatingRow.rater == rater)))
            waiting = [i for i in session.scalars(select(ItemRow.id).filter_by(study_id=study_id)) if i not in rated]
            if not waiting:
                return None
            first = min(waiting, key=lambda item_id: _keyed_hash(order_key, f"queue:{rater}:{item_id}"))
            return _item(session.get(ItemRow, first))

    def shown_left(self, study_id: int, item_id: int, rater: str) -> str:
        with self._session() as session:
            return shown_left_for(self._order_key(session, study_id), item_id, clean_rater_name(rater))

    def progress(self, study_id: int, rater: str) -> tuple[int, int]:
        """(items `rater` has rated, items in the study)."""
        rater = clean_rater_name(rater)
        with self._session() as session:
            total = session.scalar(select(func.count(ItemRow.id)).where(ItemRow.study_id == study_id))
            rated = session.scalar(select(func.count(RatingRow.id)).join(ItemRow).where(
                ItemRow.study_id == study_id, RatingRow.rater == rater))
            return rated or 0, total or 0

    def record(self, study_id: int, item_id: int, rater: str, side: str, comment: str = "") -> StoredRating:
        """Store `rater`'s pick ("left" = Answer 1, "right" = Answer 2, "tie") for an item of the study.

        Raises UnknownItemError for an item outside the study, AlreadyRatedError when the rater rated it already,
        ValueError for a bad choice or rater name.
        """
        rater = clean_rater_name(rater)
        with self._session() as session:
            order_key = self._order_key(session, study_id)
            item = session.get(ItemRow, item_id)
            if item is None or item.study_id != study_id:
                raise UnknownItemError(f"item {item_id} is not part of rating study {study_id}")
            shown_left = shown_left_for(order_key, item_id, rater)
            row = RatingRow(item_id=item_id, rater=rater, choice=choice_from_side(side, shown_left),
                            comment=comment.strip(), shown_left=shown_left, created=datetime.now(UTC))
            session.add(row)
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                raise AlreadyRatedError(
                    f"rater {rater!r} already rated item {item_id}; each rater rates an item once") from None
            return StoredRating(item_id, rater, row.choice, row.comment, shown_left)

    def ratings(self, study_id: int) -> list[StoredRating]:
        with self._session() as session:
            rows = session.scalars(select(RatingRow).join(ItemRow).where(ItemRow.study_id == study_id)
                                   .order_by(RatingRow.id))
            return [StoredRating(r.item_id, r.rater, r.choice, r.comment, r.shown_left) for r in rows]

    def _order_key(self, session: Session, study_id: int) -> str:
        row = session.get(StudyRow, study_id)
        if row is None:
            raise LookupError(f"{self.db_url}: no rating study {study_id}")
        return row.order_key

    @staticmethod
    def _study(session: Session, row: StudyRow) -> RatingStudy:
        items = session.scalars(select(ItemRow).filter_by(study_id=row.id).order_by(ItemRow.id))
        return RatingStudy(row.id, row.run_a, row.run_b, row.data, row.split, row.created.isoformat(timespec="seconds"),
                           [_item(i) for i in items])


def _item(row: ItemRow) -> RatingItem:
    return RatingItem(row.id, row.study_id, row.record_id, list(row.prompt), row.answer_a, row.answer_b)
