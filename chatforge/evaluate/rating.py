"""Blind A/B human rating of two runs: the items to rate, where ratings are kept, and what they add up to.

Use it like this::

    study = build_rating_study("runs/a", "runs/b", Path("data/ds"), db_url="sqlite:///chatforge.db", max_items=50)
    serve_rating("sqlite:///chatforge.db", study.id, port=8000)        # chatforge.evaluate.rating_app: the page
    print(format_results(rating_results("sqlite:///chatforge.db")))   # the latest study; or name run_a, run_b

An item is one conversation of DATA/SPLIT.jsonl: its prompt is every turn before the last assistant turn (the whole
conversation when it has none), and each run answers that prompt (`load_run` + `generate_batch`). Items live in the
project database next to the ratings, so building the same study again (same runs, data and split) reuses them and
only generates answers for conversations not stored yet; the page serves every stored item of the study.

Raters see the two answers as "Answer 1" and "Answer 2". Which run is shown first is decided per item and rater by
an HMAC of a random per-study key, so it looks random, never reaches the page, and stays the same on reload; a
rating is stored as "a", "b" or "tie" together with the side A was shown on. Each rater has their own queue (the
study's items in a per-rater shuffled order) and rates an item at most once (a unique (item, rater) constraint).

Results count A wins, ties and B wins with a 95 % Wilson score interval for each proportion (see `wilson_interval`),
plus A's win rate among decisive ratings (ties left out) and per-rater counts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, String, Text, UniqueConstraint, create_engine, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from chatforge.config import GenerationConfig

DEFAULT_DB_URL = "sqlite:///chatforge.db"
CHOICES = ("a", "b", "tie")
SIDES = ("left", "right", "tie")  # what the page sends: left = "Answer 1", right = "Answer 2"
MAX_RATER_CHARS = 64
Z_95 = 1.959963984540054  # the standard normal quantile at 0.975

Log = Callable[[str], None]


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


def rating_engine(db_url: str) -> Engine:
    """An engine for sqlite:///FILE (WAL, 30 s busy wait: many raters' threads) or postgresql://... (psycopg 3)."""
    try:
        url = make_url(db_url)
    except ArgumentError:
        raise ValueError(f"database URL {db_url.rpartition('@')[2]!r} is not a URL; use sqlite:///file.db or "
                         "postgresql://user:password@host/database") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver chatforge installs
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if not url.database or url.database == ":memory:":  # one shared connection, or each thread sees its own db
        return create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(engine, "connect", _use_write_ahead_log)
    return engine


def _use_write_ahead_log(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # raters read while another one writes
    cursor.close()


class RatingStore:
    """The rating tables in one SQLite or PostgreSQL database; one engine, a short transaction per call.

    Use it like this::

        store = RatingStore("sqlite:///chatforge.db")      # creates the tables when missing
        item = store.next_item(study_id, "ann")            # None when ann has rated every item
        store.record(study_id, item.id, "ann", "left", comment="clearer")
    """

    def __init__(self, db_url: str = DEFAULT_DB_URL) -> None:
        self.db_url = db_url
        self.engine = rating_engine(db_url)
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


def read_prompts(split_file: Path, max_items: int | None = None) -> list[tuple[str, list[dict[str, str]]]]:
    """(record id, prompt) of the first `max_items` conversations; errors name the file and line."""
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: no such split file; is {split_file.parent} a prepared dataset?")
    prompts: list[tuple[str, list[dict[str, str]]]] = []
    for line_number, line in enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1):
        if max_items is not None and len(prompts) >= max_items:
            break
        if not line.strip():
            continue
        where = f"{split_file}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        prompt = messages[:assistant_turns[-1]] if assistant_turns else messages
        if not any(m["role"] == "user" for m in prompt):
            raise ValueError(f"{where}: no user turn before the last assistant turn; nothing to ask the runs")
        prompts.append((str(record.get("id") or f"{split_file.name}:{line_number}"),
                        [{"role": m["role"], "content": m["content"]} for m in prompt]))
    return prompts


def study_key(run: str | Path) -> str:
    """How a run or dataset is named in the database: its absolute path when it exists, else as given (hub id)."""
    path = Path(run).expanduser()
    return str(path.resolve()) if path.exists() else str(run)


def generate_answers(run: str, prompts: list[list[dict[str, str]]], generation: GenerationConfig) -> list[str]:
    """`run`'s answer to every prompt (on the GPU when there is one), decoded as `generation` says."""
    import torch

    from chatforge.models.generate import SamplingSettings, chat_prompt_ids, generate_batch
    from chatforge.models.run import load_run

    loaded = load_run(run, device="cuda" if torch.cuda.is_available() else "cpu")
    prompt_ids = [chat_prompt_ids(loaded.tokenizer, prompt) for prompt in prompts]
    settings = [SamplingSettings(max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
                                 top_p=generation.top_p, seed=generation.seed + index) for index in range(len(prompts))]
    answers = [g.text.strip() for g in generate_batch(loaded, prompt_ids, settings, generation.batch_size)]
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return answers


def build_rating_study(
    run_a: str | Path,
    run_b: str | Path,
    data_dir: Path,
    db_url: str = DEFAULT_DB_URL,
    split: str = "test",
    max_items: int | None = None,
    generation: GenerationConfig | None = None,
    log: Log = lambda _msg: None,
) -> RatingStudy:
    """The study of run A vs run B on DATA/SPLIT.jsonl, with both runs' answers stored (see the module docstring).

    Only conversations without a stored item are answered, so a second call is instant and a larger `max_items`
    adds the missing ones. `generation` defaults to GenerationConfig() (greedy, 128 new tokens).
    """
    generation = generation or GenerationConfig()
    key_a, key_b, data_key = study_key(run_a), study_key(run_b), study_key(data_dir)
    if key_a == key_b:
        raise ValueError(f"run A and run B are both {key_a}; rate two different runs")
    prompts = read_prompts(Path(data_dir) / f"{split}.jsonl", max_items)
    if not prompts:
        raise ValueError(f"{Path(data_dir) / f'{split}.jsonl'}: no conversations to rate")
    store = RatingStore(db_url)
    try:
        study = store.find_study(key_a, key_b, data_key, split) or store.create_study(key_a, key_b, data_key, split)
        stored = {item.record_id for item in study.items}
        missing = [(record_id, prompt) for record_id, prompt in prompts if record_id not in stored]
        log(f"rating study {study.id}: {len(prompts) - len(missing)} of {len(prompts)} items stored already")
        if missing:
            log(f"answering {len(missing)} prompts with run A ({key_a})")
            answers_a = generate_answers(str(run_a), [prompt for _, prompt in missing], generation)
            log(f"answering {len(missing)} prompts with run B ({key_b})")
            answers_b = generate_answers(str(run_b), [prompt for _, prompt in missing], generation)
            store.add_items(study.id, [(record_id, prompt, a, b)
                                       for (record_id, prompt), a, b in zip(missing, answers_a, answers_b)])
        return store.study(study.id)
    finally:
        store.close()


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / trials (95 % for the default z).

    With p = successes / trials and n = trials it is (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n). Unlike
    p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and keeps sensible width for small n and for p near 0 or 1,
    which is where a handful of human ratings lands: 5 of 10 gives (0.237, 0.763), 0 of 10 gives (0, 0.278).
    """
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def _proportion(count: int, trials: int) -> dict[str, Any]:
    """{"count", "of", "rate", "low", "high"}; rate and bounds are None when there are no trials."""
    if trials == 0:
        return {"count": count, "of": 0, "rate": None, "low": None, "high": None}
    low, high = wilson_interval(count, trials)
    return {"count": count, "of": trials, "rate": count / trials, "low": low, "high": high}


def rating_results(db_url: str = DEFAULT_DB_URL, run_a: str | None = None, run_b: str | None = None) -> dict[str, Any]:
    """Win/tie/loss of A vs B in the latest study (of these runs, when given), with 95 % Wilson intervals.

    Returns {"study": {...}, "ratings": n, "raters": k, "items_rated": m, "a_wins" / "ties" / "b_wins": share of
    all ratings, "a_wins_decisive": A's share of the ratings that were not ties, "per_rater": {name: {"a_wins",
    "ties", "b_wins"}}, "method": str}; each share is {"count", "of", "rate", "low", "high"}.
    """
    store = RatingStore(db_url)
    try:
        study = store.latest_study(run_a and study_key(run_a), run_b and study_key(run_b))
        ratings = store.ratings(study.id)
    finally:
        store.close()
    counts = Counter(r.choice for r in ratings)
    per_rater: dict[str, dict[str, int]] = {}
    for rating in ratings:
        tally = per_rater.setdefault(rating.rater, {"a_wins": 0, "ties": 0, "b_wins": 0})
        tally[{"a": "a_wins", "tie": "ties", "b": "b_wins"}[rating.choice]] += 1
    return {
        "study": {"id": study.id, "run_a": study.run_a, "run_b": study.run_b, "data": study.data,
                  "split": study.split, "created": study.created, "items": len(study.items)},
        "ratings": len(ratings),
        "raters": len(per_rater),
        "items_rated": len({r.item_id for r in ratings}),
        "a_wins": _proportion(counts["a"], len(ratings)),
        "ties": _proportion(counts["tie"], len(ratings)),
        "b_wins": _proportion(counts["b"], len(ratings)),
        "a_wins_decisive": _proportion(counts["a"], counts["a"] + counts["b"]),
        "per_rater": dict(sorted(per_rater.items())),
        "method": "95 % Wilson score interval per proportion; each rating counts once (raters and items pooled)",
    }


def _percent(share: dict[str, Any]) -> str:
    if share["rate"] is None:
        return "n/a"
    return f"{100 * share['rate']:5.1f} %  [{100 * share['low']:.1f}, {100 * share['high']:.1f}]"


def format_results(results: dict[str, Any]) -> str:
    """The results of `rating_results` as lines for the terminal."""
    study = results["study"]
    lines = [f"Rating study {study['id']} ({study['created']}): A = {study['run_a']}  vs  B = {study['run_b']}",
             f"data {study['data']} split {study['split']}, {study['items']} items"]
    if results["ratings"] == 0:
        return "\n".join([*lines, "no ratings yet"])
    lines.append(f"{results['ratings']} ratings of {results['items_rated']} items by {results['raters']} raters")
    for label, key in (("A wins", "a_wins"), ("ties  ", "ties"), ("B wins", "b_wins")):
        lines.append(f"  {label} {results[key]['count']:5d}  {_percent(results[key])}")
    decisive = results["a_wins_decisive"]
    lines.append(f"A's win rate without ties: {_percent(decisive)} of {decisive['of']} decisive ratings")
    if decisive["low"] is not None and (decisive["low"] > 0.5 or decisive["high"] < 0.5):
        lines.append(f"-> {'A' if decisive['low'] > 0.5 else 'B'} is preferred (the interval excludes 50 %)")
    else:
        lines.append("-> no clear preference yet (the interval includes 50 %)")
    for rater, tally in results["per_rater"].items():
        lines.append(f"  {rater}: A {tally['a_wins']}, tie {tally['ties']}, B {tally['b_wins']}")
    lines.append(results["method"])
    return "\n".join(lines)
