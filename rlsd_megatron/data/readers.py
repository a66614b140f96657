"""Row readers for prompt files: JSON Lines, JSON arrays and Parquet.

Each reader yields :class:`RawRow` s in file order, each naming where it came from
(``path, line N`` for JSON Lines, 1-based line numbers; ``path, item N`` for a JSON array;
``path, row N`` for Parquet, 1-based). A row that cannot be read (bytes that are not UTF-8,
text that is not JSON, JSON that is not an object) is yielded with ``problem`` set rather
than raised, so the caller applies one bad-row policy to every kind. Blank lines are not rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

__all__ = ["DataError", "RawRow", "read_rows", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A data problem: which file and row, what was wrong, and how to fix or skip it."""


@dataclass(frozen=True)
class RawRow:
    """One row as read: ``record`` (a dict) or ``problem`` + ``kind`` (``not_utf8``, ``bad_json``)."""

    where: str
    record: dict[str, Any] | None = None
    problem: str | None = None
    kind: str | None = None


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Rows of a ``.jsonl`` / ``.json`` / ``.parquet`` file (see the module docstring).

    A ``.json`` file holding JSON Lines rather than an array is read as JSON Lines, as Hugging
    Face ``datasets`` does. Raises :class:`DataError` for a missing file or an unknown suffix.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist (data.train_files / data.val_files).")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        with path.open("rb") as f:
            head = f.read(4096).lstrip()
        return _json_array_rows(path) if head.startswith(b"[") else _jsonl_rows(path)
    raise DataError(f"data file {str(path)!r} has suffix {path.suffix!r}; supported: {list(SUPPORTED_SUFFIXES)}.")


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}, line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(where, problem=f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} is byte "
                                           f"{exc.start + 1} of the line)", kind="not_utf8")
                continue
            if not text.strip():
                continue
            yield _from_json_text(where, text.rstrip())


def _from_json_text(where: str, text: str) -> RawRow:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRow(where, problem=f"not valid JSON ({exc.msg} at column {exc.colno})", kind="bad_json")
    if not isinstance(record, dict):
        return RawRow(where, problem=f"expected a JSON object, got {_type_name(record)}", kind="bad_json")
    return RawRow(where, record=record)


def _json_array_rows(path: Path) -> Iterator[RawRow]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); a JSON array file "
                        "cannot skip one row: fix the file or convert it to JSON Lines (.jsonl).") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); a JSON "
                        "array file cannot skip one row: fix the file or convert it to JSON Lines (.jsonl).") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of objects or JSON Lines, got a top-level "
                        f"{_type_name(items)}.")
    for number, record in enumerate(items, start=1):
        where = f"{path}, item {number}"
        if isinstance(record, dict):
            yield RawRow(where, record=record)
        else:
            yield RawRow(where, problem=f"expected a JSON object, got {_type_name(record)}", kind="bad_json")


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'pyarrow>=21' (a dependency of rlsd_megatron).") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow.ArrowInvalid and friends
        raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc}).") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            number += 1
            yield RawRow(f"{path}, row {number}", record=record)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
