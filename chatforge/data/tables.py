"""Read question/answer tables: CSV/TSV files and parquet files (which may also hold chat records).

Use it through `formats.read_file(path, "csv" | "tsv" | "parquet", options)`; the limits are in the docstring of
`chatforge.data.formats`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chatforge.config import FormatOptions
from chatforge.core.records import make_record
from chatforge.data.items import InputError, Item, Rejection, json_object_format, pick_column, record_from_object

PARQUET_RECORD_COLUMNS = ("messages", "conversations", "meta", "weight", "system", "instruction", "input", "output")


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """csv's field size limit (process-wide) set for one read, then restored."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def read_table(path: Path, delimiter: str, options: FormatOptions, source: str, max_record_bytes: int) -> Iterator[Item]:
    with path.open(encoding="utf-8", errors="replace", newline="") as handle, _csv_field_limit(max_record_bytes):
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            yield from _table_rows(reader, path, options, source)
        except csv.Error as exc:  # a field over the limit, a NUL byte, ...: the reader cannot go on past it
            line = reader.line_num + 1  # the line being read when it failed
            raise InputError(f"{path}:{line}: {exc} (the limit is validate.max_record_bytes)" if "field larger" in str(exc)
                             else f"{path}:{line}: not valid CSV: {exc}") from None


def _table_rows(reader: csv.DictReader, path: Path, options: FormatOptions, source: str) -> Iterator[Item]:
    header = reader.fieldnames or []
    question = pick_column(header, options.question_columns)
    answer = pick_column(header, options.answer_columns)
    if question is None or answer is None:
        raise InputError(
            f"{path}:1: no question/answer columns in header {header}; expected one of "
            f"{options.question_columns} and one of {options.answer_columns} (set prepare.formats in the config)"
        )
    category = pick_column(header, [options.category_column])
    row_start = reader.line_num + 1
    for row in reader:
        line = row_start
        row_start = reader.line_num + 1
        if None in row:
            yield Rejection(source, line, f"row has {len(header) + len(row[None])} fields, header has {len(header)}", row)
            continue
        meta = {"category": row[category]} if category and row.get(category) else {}
        messages = [{"role": "user", "content": row.get(question)}, {"role": "assistant", "content": row.get(answer)}]
        yield make_record(messages, source, line, meta=meta)


def read_parquet(path: Path, options: FormatOptions, source: str) -> Iterator[Item]:
    import pyarrow.parquet as pq  # lazy: ~0.6 s to import (python -X importtime), only parquet inputs need it

    try:
        columns = set(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: cannot read as parquet: {str(exc).splitlines()[0]}") from None
    probe = {name: True for name in columns}
    fmt = json_object_format(probe) if ("instruction" not in columns or "output" in columns) else None
    if fmt:
        wanted = [name for name in PARQUET_RECORD_COLUMNS if name in columns]
        for index, row in enumerate(_parquet_rows(path, wanted), start=1):
            yield record_from_object(row, fmt, source, index)
        return
    question = pick_column(list(columns), options.question_columns)
    answer = pick_column(list(columns), options.answer_columns)
    if question is None or answer is None:
        raise InputError(f"{path}: parquet columns {sorted(columns)} hold no messages/conversations/question-answer")
    category = pick_column(list(columns), [options.category_column])
    wanted = [name for name in (question, answer, category) if name]
    for index, row in enumerate(_parquet_rows(path, wanted), start=1):
        meta = {"category": row[category]} if category and row.get(category) else {}
        messages = [{"role": "user", "content": row.get(question)}, {"role": "assistant", "content": row.get(answer)}]
        yield make_record(messages, source, index, meta=meta)


def _parquet_rows(path: Path, wanted: list[str]) -> list[dict[str, Any]]:
    """Rows of the columns prepare reads (others are never loaded); InputError for a column that holds bytes."""
    import pyarrow.parquet as pq  # lazy: ~0.6 s to import (python -X importtime), only parquet inputs need it

    try:
        table = pq.read_table(path, columns=wanted)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: cannot read as parquet: {str(exc).splitlines()[0]}") from None
    for name, column_type in zip(table.column_names, table.schema.types):
        if _holds_bytes(column_type):
            raise InputError(f"{path}: column '{name}' has type {column_type}; prepare reads text, numbers and "
                             "lists/structs of them (cast the column to string or drop it)")
    return table.to_pylist()


def _holds_bytes(arrow_type: Any) -> bool:
    """True for a binary type, or a list/struct/map/dictionary type with one inside."""
    import pyarrow as pa  # lazy: ~0.5 s to import (python -X importtime), only parquet inputs need it

    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type) or pa.types.is_fixed_size_binary(arrow_type):
        return True
    if pa.types.is_dictionary(arrow_type):
        return _holds_bytes(arrow_type.value_type)
    return any(_holds_bytes(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
