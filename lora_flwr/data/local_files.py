"""Corpora from local ``.csv``, ``.jsonl`` and ``.txt`` files.

An error about a file's content names the file, the line and what is wrong, never
the text there: a data file may hold private rows, or be a link to a file that is
not data at all (``/etc/passwd``). Column names are shown only when they read as
column names (:func:`_columns_said`).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from lora_flwr.data.corpus import TextDataset, _Corpus

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".txt")

# What a column name looks like: a word character, then at most 47 of words,
# spaces and a little punctuation. A first line of a non-table file (``root:x:0:``,
# a key, a sentence with commas in it) does not.
_COLUMN_NAME = re.compile(r"\w[\w .()\[\]#%+&-]{0,47}")
_MAX_COLUMNS_SHOWN = 50
_MAX_LABELS_LOGGED = 20
# Rows of a csv / jsonl file with the line each ends on.
_Rows = list[tuple[int, dict[str, object]]]


def _load_local(
    name: str, text_column: str, label_column: str, group_column: str
) -> _Corpus:
    """Load a ``.csv``, ``.jsonl`` or ``.txt`` file.

    A name that is neither a built-in corpus nor a file with one of these suffixes
    is rejected by the caller, :func:`lora_flwr.data.datasets._load_corpus`, which
    knows the built-in names.
    """
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise ValueError(
            f"`data.name` = {name!r} is a file of an unsupported type; use a "
            f"{', '.join(LOCAL_SUFFIXES)} file"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"Dataset file not found: {path} (`data.name` = {name!r}); pass an "
            "existing file or a built-in name"
        )
    try:
        if suffix == ".txt":
            with path.open(encoding="utf-8") as fh:
                texts = tuple(line.strip() for line in fh if line.strip())
            unlabelled = f"{path} is a .txt file (text only, no labels)"
            return _Corpus(TextDataset(texts, None, ("",) * len(texts)), 0, unlabelled)
        rows, columns = _read_rows(path, suffix)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"Dataset file {path} is not valid UTF-8 ({exc.reason} at byte "
            f"{exc.start}); re-save it as UTF-8"
        ) from None
    return _rows_to_corpus(rows, columns, path, text_column, label_column, group_column)


def _read_rows(path: Path, suffix: str) -> tuple[_Rows, list[str]]:
    """Rows of a csv / jsonl file, each with the line it ends on, and the columns."""
    rows: _Rows = []
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            try:
                for row in reader:
                    rows.append((reader.line_num, dict(row)))
            except csv.Error as exc:  # csv's messages hold no cell text
                raise ValueError(
                    f"{path}, line {reader.line_num}, is not valid CSV ({exc}); the "
                    "file's content is not shown"
                ) from None
            return rows, list(reader.fieldnames or [])
    columns: dict[str, None] = {}  # ordered set
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                # exc.msg says what was expected ("Expecting value"), not the text.
                raise ValueError(
                    f"{path}, line {lineno}, is not valid JSON ({exc.msg} at column "
                    f"{exc.colno}); the file's content is not shown"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}, line {lineno}, should hold a JSON object but holds a "
                    f"{type(obj).__name__}; the file's content is not shown"
                )
            rows.append((lineno, obj))
            columns.update(dict.fromkeys(obj))
    return rows, list(columns)


def _columns_said(columns: Sequence[str], path: Path) -> str:
    """Say a file's columns, or only their count when they are not column names.

    A header is the file's schema, not its rows, so names that read as column
    names are shown; anything else (the first line of a file that is no table)
    is counted, never echoed.
    """
    where = "line 1" if path.suffix.lower() == ".csv" else "the keys of its objects"
    if not columns:
        return f"{where} names no column"
    if len(columns) <= _MAX_COLUMNS_SHOWN and all(
        isinstance(c, str) and _COLUMN_NAME.fullmatch(c) for c in columns
    ):
        return f"its columns are {list(columns)}"
    return (
        f"{where} does not read as column names ({len(columns)} field(s); the "
        "file's content is not shown)"
    )


def _rows_to_corpus(
    rows: _Rows,
    columns: list[str],
    path: Path,
    text_column: str,
    label_column: str,
    group_column: str,
) -> _Corpus:
    """Pick the text / label / group columns out of parsed rows."""
    if text_column not in columns:
        raise ValueError(
            f"`data.text_column` = {text_column!r} is not a column of {path}; "
            f"{_columns_said(columns, path)}"
        )
    if group_column and group_column not in columns:
        raise ValueError(
            f"`data.group_column` = {group_column!r} is not a column of {path}; "
            f"{_columns_said(columns, path)} (leave it empty when there is none)"
        )
    has_labels = bool(label_column) and label_column in columns
    texts: list[str] = []
    raw_labels: list[object] = []
    groups: list[str] = []
    for line, row in rows:
        value = row.get(text_column)
        text = "" if value is None else str(value).strip()
        if not text:
            continue  # empty rows carry nothing to learn
        texts.append(text)
        groups.append(str(row.get(group_column, "")) if group_column else "")
        if has_labels:
            label = row.get(label_column)
            if label is None or label == "":
                raise ValueError(
                    f"{path}, line {line}, has no value in the label column "
                    f"`data.label_column` = {label_column!r}; fill it or drop the row"
                )
            raw_labels.append(label)
    if not has_labels:
        unlabelled = (
            f"`data.label_column` = {label_column!r} is not a column of {path} "
            f"({_columns_said(columns, path)})"
            if label_column
            else "`data.label_column` is empty"
        )
        return _Corpus(TextDataset(tuple(texts), None, tuple(groups)), 0, unlabelled)
    labels, num_labels = _encode_labels(raw_labels, label_column)
    if num_labels < 2:
        raise ValueError(
            f"`data.label_column` = {label_column!r} of {path} has a single class; "
            "a classification corpus needs at least two"
        )
    return _Corpus(TextDataset(tuple(texts), labels, tuple(groups)), num_labels)


def _encode_labels(
    raw: Sequence[object], label_column: str
) -> tuple[tuple[int, ...], int]:
    """Integer class ids and their count.

    Non-negative integers (also written as strings, as csv gives them) are kept, and
    ``num_labels = max + 1``. Anything else is mapped to the index of its value in
    the sorted distinct values.
    """
    as_int = [_as_int(v) for v in raw]
    if all(v is not None and v >= 0 for v in as_int):
        ints = tuple(int(v) for v in as_int if v is not None)
        return ints, (max(ints) + 1 if ints else 0)
    names = sorted({str(v) for v in raw})
    index = {name: i for i, name in enumerate(names)}
    if len(names) <= _MAX_LABELS_LOGGED and all(map(_COLUMN_NAME.fullmatch, names)):
        logger.info("Labels of column %r mapped to ids: %s", label_column, index)
    else:  # a text column read as labels: its cells are content, not class names
        logger.info(
            "%d distinct values of column %r mapped to ids 0..%d (in sorted order)",
            len(names),
            label_column,
            len(names) - 1,
        )
    return tuple(index[str(v)] for v in raw), len(names)


def _as_int(value: object) -> int | None:
    """``value`` as an int when it is one (or its decimal string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None
