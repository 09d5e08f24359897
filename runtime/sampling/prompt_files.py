"""Prompt files for ``artrt sample``: ``.txt``, ``.jsonl`` and ``.csv``.

- ``.txt``: one prompt a line; blank lines and lines starting with ``#`` are skipped.
- ``.jsonl``: one JSON object a line with ``prompt`` and optional per-item values
  (:data:`FIELDS`); blank lines are skipped.
- ``.csv``: a header row naming columns from :data:`FIELDS` (``prompt`` required);
  empty cells are unset; ``guidance`` may hold several values separated by ``;``.

Every data line is an item and gets the next index (0, 1, ...), malformed ones
included, so fixing a bad line never shifts the seeds of the others. A malformed line
becomes a :class:`BadLine` naming the file and line; only problems with the whole
file (unreadable, unknown extension, bad CSV header) raise :class:`InputError`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artrt.errors import InputError

# Per-item fields and their types; values given here override the command line.
FIELDS = {
    "id": str, "prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance": list,
    "switch": float, "sampler": str, "height": int, "width": int, "n": int, "frames": int,
}
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FORMATS = (".txt", ".jsonl", ".csv")


@dataclass(frozen=True)
class PromptItem:
    """One data line: its 0-based item index, 1-based line number and the values it sets."""

    index: int
    line: int
    prompt: str
    values: dict[str, Any] = field(default_factory=dict)  # every other field the line sets


@dataclass(frozen=True)
class BadLine:
    """A line that could not be used, with the reason."""

    file: str
    line: int
    error: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.error}"


def read_prompt_file(path: str | Path) -> tuple[list[PromptItem], list[BadLine]]:
    """Parse ``path`` into items and bad lines (by file extension)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"prompt file {path} must end in {', '.join(FORMATS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows = {".txt": _txt_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows}[suffix](text, str(path))
    items: list[PromptItem] = []
    bad: list[BadLine] = []
    for index, (line, values) in enumerate(rows):
        try:
            items.append(_item(index, line, values))
        except ValueError as exc:
            bad.append(BadLine(str(path), line, str(exc)))
    return items, bad


def _txt_rows(text: str, _: str) -> Iterator[tuple[int, Any]]:
    for line, raw in enumerate(text.splitlines(), 1):
        prompt = raw.strip()
        if prompt and not prompt.startswith("#"):
            yield line, {"prompt": prompt}


def _jsonl_rows(text: str, _: str) -> Iterator[tuple[int, Any]]:
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as exc:
            yield line, ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})")


def _csv_rows(text: str, name: str) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return
    columns = [c.strip() for c in header]
    unknown = [c for c in columns if c not in FIELDS]
    if unknown or "prompt" not in columns or len(set(columns)) != len(columns):
        raise InputError(f"{name}:1: the CSV header must name distinct columns from {', '.join(FIELDS)} "
                         f"including prompt; got {', '.join(columns)}")
    line = reader.line_num + 1
    for cells in reader:
        if any(c.strip() for c in cells):
            if len(cells) != len(columns):
                yield line, ValueError(f"{len(cells)} cells, the header has {len(columns)}")
            else:
                yield line, {c: _csv_value(c, v) for c, v in zip(columns, cells) if v.strip()}
        line = reader.line_num + 1


def _csv_value(column: str, cell: str) -> Any:
    """A CSV cell as the type its column takes (left as text when it does not parse)."""
    cell = cell.strip()
    kind = FIELDS[column]
    try:
        if kind is int:
            return int(cell)
        if kind is float:
            return float(cell)
        if kind is list:
            return [float(v) for v in re.split(r"[;\s]+", cell) if v]
    except ValueError:
        return cell
    return cell


def _item(index: int, line: int, values: Any) -> PromptItem:
    """Check one row's fields and types; ``ValueError`` says what is wrong."""
    if isinstance(values, ValueError):
        raise values
    if not isinstance(values, dict):
        raise ValueError(f"expected a JSON object, got {type(values).__name__}")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(FIELDS)}")
    prompt = values.get("prompt")
    if prompt is None:
        raise ValueError("missing prompt")
    checked = {name: _check_type(name, value) for name, value in values.items() if value is not None}
    if not checked["prompt"].strip():
        raise ValueError("empty prompt")
    item_id = checked.get("id")
    if item_id is not None and not ID_PATTERN.fullmatch(item_id):
        raise ValueError(f"id {item_id!r} must be 1-128 letters, digits, '.', '_' or '-', not starting with "
                         "'.', '_' or '-'")
    return PromptItem(index, line, checked.pop("prompt"), checked)


def _check_type(name: str, value: Any) -> Any:
    kind = FIELDS[name]
    if kind is list:
        values = value if isinstance(value, list) else [value]
        if values and all(_is_number(v) for v in values):
            return [float(v) for v in values]
        raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}")
    if kind is float and _is_number(value):
        return float(value)
    if kind is int and _is_number(value) and (isinstance(value, int) or value.is_integer()):
        return int(value)
    if kind is str and isinstance(value, str):
        return value
    expected = {str: "a string", int: "a whole number", float: "a number"}[kind]
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or math.isfinite(value))
