"""Read Alpaca-form rows from JSON arrays, JSON lines and parquet, with file:line for every row.

Pure code (parquet aside, which needs pyarrow). A row that cannot be used raises `DataError`
naming file, line and field in strict mode (`on_bad_row: error`); in lenient mode
(`on_bad_row: drop`) it is dropped and counted by reason, never silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """Bad input data; the message names file, line and field."""


@dataclass(frozen=True)
class SourceRow:
    file: str
    line: int
    fields: dict[str, str] | None  # None: the row could not be read at all
    problem: str = ""  # reason key when the row is bad
    detail: str = ""


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 BOM is harmless; drop it rather than fail the whole file
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, object]]:
    dec = json.JSONDecoder()
    pos, n, line, counted = 0, len(text), 1, 0

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    pos = skip_ws(pos)
    if pos >= n or text[pos] != "[":
        raise DataError(f"{path}:{line_at(pos)}: expected a JSON array of rows ('[')")
    pos = skip_ws(pos + 1)
    if pos < n and text[pos] == "]":
        return
    while True:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_at(e.pos)}: malformed JSON: {e.msg}") from None
        yield line_at(pos), obj
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            if skip_ws(pos + 1) != n:
                raise DataError(f"{path}:{line_at(pos)}: text after the closing ']'")
            return
        raise DataError(f"{path}:{line_at(pos)}: malformed JSON: expected ',' or ']' (truncated file?)")


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[int, object]]:
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, DataError(f"{path}:{i}: malformed JSON line: {e.msg}")


def _iter_parquet(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    for i, rec in enumerate(pq.read_table(path).to_pylist(), 1):
        yield i, rec  # "line" = 1-based row number in the parquet file


def read_rows(path: Path, fmt: str, mapping: dict[str, str] | None = None) -> Iterator[SourceRow]:
    """Yield every record as a SourceRow; bad records carry `problem` instead of raising."""
    path = Path(path)
    mapping = mapping or {}
    if fmt == "parquet":
        records = _iter_parquet(path)
    else:
        text = _decode(path)
        records = _iter_json_array(path, text) if fmt == "json" else _iter_jsonl(path, text)
    for line, rec in records:
        if isinstance(rec, DataError):
            yield SourceRow(str(path), line, None, "malformed_json", str(rec))
            continue
        yield check_row(str(path), line, rec, mapping)


def check_row(file: str, line: int, rec: object, mapping: dict[str, str]) -> SourceRow:
    if not isinstance(rec, dict):
        return SourceRow(file, line, None, "not_an_object", f"row is {type(rec).__name__}, not an object")
    out: dict[str, str] = {}
    for field in FIELDS:
        key = mapping.get(field, field)
        if key not in rec:
            if field == "input":  # Alpaca rows without input (KoAlpaca v1.1) mean input ""
                out[field] = ""
                continue
            return SourceRow(file, line, None, f"missing_{field}", f"field '{key}' is missing")
        val = rec[key]
        if val is None:
            return SourceRow(file, line, None, f"null_{field}", f"field '{key}' is null")
        if not isinstance(val, str):
            return SourceRow(file, line, None, f"wrong_type_{field}",
                             f"field '{key}' is {type(val).__name__}, expected a string")
        out[field] = val
    if not out["instruction"].strip():
        return SourceRow(file, line, out, "empty_instruction", "field 'instruction' is empty")
    if not out["output"].strip():
        return SourceRow(file, line, out, "empty_output", f"field '{mapping.get('output', 'output')}' is empty")
    bad = next((c for f in FIELDS for c in out[f] if ord(c) < 32 and c not in "\t\n\r"), None)
    if bad is not None:
        return SourceRow(file, line, out, "control_character",
                         f"a field contains control character U+{ord(bad):04X}")
    return SourceRow(file, line, out)


def fail(row: SourceRow) -> DataError:
    return DataError(f"{row.file}:{row.line}: {row.detail}")
