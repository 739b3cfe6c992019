"""Read Alpaca-form rows from JSON arrays, JSON lines and parquet, with file:line for every row.

Pure code (parquet aside, which needs pyarrow). A row that cannot be used raises `DataError`
naming file, line and field in strict mode (`on_bad_row: error`); in lenient mode
(`on_bad_row: drop`) it is dropped and counted by reason, never silently.

What each kind of bad input does (tests/test_bad_input.py pins every line of this table):

- whole-file problems stop the stage in both modes, because no row after them can be trusted:
  bytes that are not UTF-8 (a UTF-16 file, CP949/EUC-KR Korean text), a malformed or truncated
  JSON array, a top-level value that is not an array, bare-CR line ends, an unreadable parquet;
- a JSON-lines line that does not parse is one bad row (`malformed_json`, or
  `truncated_last_line` when it is the last line and the file has no final newline);
- a row that parses but cannot be used: `not_an_object`, `missing_<field>`, `null_<field>`,
  `wrong_type_<field>` (number, list, object, bool), `empty_instruction`, `empty_output`,
  `control_character` (C0 controls other than tab/LF/CR), `invalid_unicode` (a lone surrogate from
  a `\\ud800` escape: it cannot be written back as UTF-8), `duplicate_key` (JSON keeps only the last
  value of a repeated key, so the row silently lost one), `too_deep` (nesting deeper than the JSON
  decoder can follow, about 1000 levels), `number_too_large` (an integer of more than
  `MAX_INT_DIGITS` digits: never converted, since that costs quadratic time);
- accepted as is: a UTF-8 BOM, CRLF line ends (the rows equal the LF file's), blank JSON-lines
  lines, U+2028/U+2029/NEL inside strings (legal JSON; never treated as line ends), a missing
  `input` (Alpaca rows without input mean input ""), and placeholder-like text such as `{input}`
  (templates substitute in one pass, so it comes out literally).

Too-long rows and exact duplicates are policy, not bad input: preprocess drops or truncates them
(`preprocess.overlength`, `preprocess.dedupe`) and counts them in the data report.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from qlora_kit.errors import DataError
from qlora_kit.config import Recipe

FIELDS = ("instruction", "input", "output")
# readable rows the kit calls unusable; the sources trained on them (`preprocess.clean_rows: false`
# keeps them, as their code did)
CLEANING_PROBLEMS = frozenset({"empty_instruction", "empty_output", "control_character"})

# C0 controls other than tab, LF and CR: never meaningful in instruction data and often the sign
# of a bad conversion; NUL also truncates strings in some C tokenizer paths.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# json.loads turns a "\ud800" escape into a lone surrogate, which UTF-8 cannot encode: the row
# would crash the writer (or the tokenizer) later instead of being reported here.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_UTF16_32_BOMS = (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff", b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True)
class SourceRow:
    file: str
    line: int
    fields: dict[str, str] | None  # None: the row could not be read at all
    problem: str = ""  # reason key when the row is bad
    detail: str = ""
    unit: str = "line"  # what `line` counts: "line" (JSON, JSON lines) or "row" (parquet)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file}: row {self.line}"


MAX_INT_DIGITS = 100
_VALUE_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class _BigInt:
    """An integer literal too long to convert (int() of n digits costs O(n^2)); a bad row."""

    def __init__(self, digits: str):
        self.digits = digits


class _Object(dict):
    """A decoded JSON object that remembers keys it saw more than once (json keeps the last)."""

    duplicate_keys: tuple[str, ...] = ()
    big_key: str = ""  # a key whose value holds a _BigInt


def _holds_big(v: object) -> bool:
    return isinstance(v, _BigInt) or bool(getattr(v, "big_key", "")) or (
        isinstance(v, list) and any(isinstance(x, _BigInt) or getattr(x, "big_key", "") for x in v))


def _object_pairs(pairs: list[tuple[str, object]]) -> _Object:
    obj = _Object(pairs)
    obj.big_key = next((k for k, v in pairs if _holds_big(v)), "")
    if len(obj) != len(pairs):
        counts: dict[str, int] = {}
        for k, _ in pairs:
            counts[k] = counts.get(k, 0) + 1
        obj.duplicate_keys = tuple(k for k, c in counts.items() if c > 1)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_object_pairs,
                            parse_int=lambda s: int(s) if len(s.lstrip("-")) <= MAX_INT_DIGITS else _BigInt(s))


def _value_end(text: str, pos: int) -> int | None:
    """End of the JSON value at `pos`, by brackets alone (for values too deep to decode)."""
    depth = 0
    for m in _VALUE_TOKENS.finditer(text, pos):
        depth += 1 if m.group() in "[{" else -1 if m.group() in "]}" else 0
        if depth == 0:
            return m.end()
    return None


_TOO_DEEP = "nested deeper than the JSON decoder can follow (about 1000 levels)"


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(_UTF16_32_BOMS):
        raise DataError(f"{path}:1: the file is UTF-16 or UTF-32 (byte-order mark {raw[:2].hex(' ')}); "
                        "save it as UTF-8")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 BOM is harmless; drop it rather than fail the whole file
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); the whole "
                        "file is refused in every mode, since a decoder guess could garble every row. Convert "
                        "it first (Korean text is often CP949/EUC-KR: iconv -f cp949 -t utf-8)") from None


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, object]]:
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
        raise DataError(f"{path}:{line_at(pos)}: expected a JSON array of rows ('['); a malformed or "
                        "non-array file cannot be read in part, in any mode")
    pos = skip_ws(pos + 1)
    if pos < n and text[pos] == "]":
        return
    while True:
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except RecursionError:
            end = _value_end(text, pos)
            if end is None:
                raise DataError(f"{path}:{line_at(pos)}: malformed JSON: a value {_TOO_DEEP} never ends; the "
                                "file is refused in every mode") from None
            obj = _BadLine("too_deep", f"the row is {_TOO_DEEP}")
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_at(e.pos)}: malformed JSON: {e.msg} (the array cannot be read past "
                            "this point, so the file is refused in every mode)") from None
        yield line_at(pos), obj
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            if skip_ws(pos + 1) != n:
                raise DataError(f"{path}:{line_at(pos)}: text after the closing ']'")
            return
        # name the line where the row ended: that is where the ',' is missing
        raise DataError(f"{path}:{line_at(end)}: malformed JSON: expected ',' or ']' after this row (missing "
                        "comma, or a truncated file?); the file is refused in every mode")


class _BadLine:
    def __init__(self, problem: str, detail: str):
        self.problem, self.detail = problem, detail


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[int, object]]:
    # Split on LF only: str.splitlines() also splits on U+2028/U+2029/NEL/VT/FF, which are legal
    # unescaped inside JSON strings (json.dumps(ensure_ascii=False) writes them), so it would cut
    # valid rows in two. A CR before the LF is CRLF; a lone CR can only be JSON whitespace.
    if "\r" in text and "\n" not in text:
        raise DataError(f"{path}:1: line ends are bare CR (classic Mac); convert them to LF or CRLF")
    lines = text.split("\n")
    ends_with_newline = lines[-1] == ""
    last = len(lines) - (1 if ends_with_newline else 0)
    for i, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line.strip():
            continue
        try:
            yield i, _DECODER.decode(line)
        except RecursionError:
            yield i, _BadLine("too_deep", f"the row is {_TOO_DEEP}")
        except json.JSONDecodeError as e:
            if i == last and not ends_with_newline:
                yield i, _BadLine("truncated_last_line", f"malformed JSON on the last line, which has no newline "
                                                         f"(truncated file?): {e.msg} at column {e.colno}")
            else:
                yield i, _BadLine("malformed_json", f"malformed JSON line: {e.msg} at column {e.colno}")


def _iter_parquet(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}); the file is refused "
                        "in every mode") from None
    for i, rec in enumerate(table.to_pylist(), 1):
        yield i, rec  # "line" = 1-based row number in the parquet file


def read_rows(path: Path, fmt: str, mapping: dict[str, str] | None = None) -> Iterator[SourceRow]:
    """Yield every record as a SourceRow; bad records carry `problem` instead of raising.

    Whole-file problems (see the module docstring) raise DataError whatever the mode.
    """
    path = Path(path)
    mapping = mapping or {}
    unit = "row" if fmt == "parquet" else "line"
    if fmt == "parquet":
        records = _iter_parquet(path)
    else:
        text = _decode(path)
        records = _iter_json_array(path, text) if fmt == "json" else _iter_jsonl(path, text)
    for line, rec in records:
        if isinstance(rec, _BadLine):
            yield SourceRow(str(path), line, None, rec.problem, rec.detail, unit)
            continue
        yield check_row(str(path), line, rec, mapping, unit=unit)


def _kind(val: object) -> str:
    if isinstance(val, _BigInt):
        return "int"
    return "object" if isinstance(val, dict) else type(val).__name__  # _Object is a dict: say "object"


def _missing_detail(key: str, field: str, mapping: dict[str, str], rec: dict) -> str:
    via = f" (data.fields.{field})" if field in mapping else ""
    # a key that differs only by spaces, control characters or a BOM is a conversion accident
    near = [k for k in rec if isinstance(k, str) and k != key
            and _CONTROL.sub("", k).strip().strip("\ufeff").strip() == key]
    hint = f"; found key {near[0]!r}, which has stray spaces or control characters" if near else ""
    return f"field {key!r}{via} is missing{hint}"


def check_row(file: str, line: int, rec: object, mapping: dict[str, str], *, unit: str = "line") -> SourceRow:
    def bad(problem: str, detail: str, fields: dict[str, str] | None = None) -> SourceRow:
        return SourceRow(file, line, fields, problem, detail, unit)

    if not isinstance(rec, dict):
        return bad("not_an_object", f"row is {_kind(rec)}, not an object")
    if getattr(rec, "big_key", ""):
        return bad("number_too_large", f"field {rec.big_key!r} holds an integer of more than {MAX_INT_DIGITS} "
                                       "digits (not converted)")
    out: dict[str, str] = {}
    for field in FIELDS:
        key = mapping.get(field, field)
        if key not in rec:
            if field == "input":  # Alpaca rows without input (KoAlpaca v1.1) mean input ""
                out[field] = ""
                continue
            return bad(f"missing_{field}", _missing_detail(key, field, mapping, rec))
        val = rec[key]
        if val is None:
            return bad(f"null_{field}", f"field {key!r} is null")
        if not isinstance(val, str):
            return bad(f"wrong_type_{field}", f"field {key!r} is {_kind(val)}, expected a string")
        out[field] = val
    names = {f: mapping.get(f, f) for f in FIELDS}
    dups = [k for k in getattr(rec, "duplicate_keys", ()) if k in names.values()]
    if dups:  # a repeated key the kit does not read (e.g. "url") loses nothing we use
        return bad("duplicate_key", f"field {dups[0]!r} appears more than once in the object "
                                    "(JSON keeps only the last value)", out)
    for f in FIELDS:
        m = _SURROGATE.search(out[f])
        if m:
            return bad("invalid_unicode", f"field {names[f]!r} contains a lone surrogate U+{ord(m.group()):04X} "
                                          f"at character {m.start()} (not encodable as UTF-8)", out)
    if not out["instruction"].strip():
        return bad("empty_instruction", f"field {names['instruction']!r} is empty", out)
    if not out["output"].strip():
        return bad("empty_output", f"field {names['output']!r} is empty", out)
    for f in FIELDS:
        m = _CONTROL.search(out[f])
        if m:
            return bad("control_character", f"field {names[f]!r} contains control character "
                                            f"U+{ord(m.group()):04X} at character {m.start()}", out)
    return SourceRow(file, line, out, unit=unit)


def drop_reason(row: SourceRow, clean_rows: bool) -> str:
    """Why a row is not used ("" when it is): its problem, unless the recipe keeps rows of that
    kind (`clean_rows: false` keeps CLEANING_PROBLEMS rows, as the sources did)."""
    if row.problem and (clean_rows or row.problem not in CLEANING_PROBLEMS):
        return row.problem
    return ""


def fail(row: SourceRow) -> DataError:
    return DataError(f"{row.where}: {row.detail}")


# --- the raw files fetch wrote ------------------------------------------------------------

def raw_files(raw_dir: Path) -> list[tuple[Path, str, dict[str, str]]]:
    """(path, format, field mapping) of each data file fetch wrote, in order."""
    man = json.loads((raw_dir / "manifest.json").read_text())
    return [(raw_dir / f["name"], f["format"], f.get("fields", {})) for f in man["facts"]["files"]]


def load_rows(raw_dir: Path, recipe: Recipe) -> list[SourceRow]:
    rows: list[SourceRow] = []
    for path, fmt, mapping in raw_files(raw_dir):
        rows.extend(read_rows(path, fmt, mapping))
    d = recipe.data
    rows = rows[d.skip_rows:]
    return rows[: d.limit] if d.limit is not None else rows
