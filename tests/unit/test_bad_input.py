"""Bad input in every format the recipes read: nothing lost silently, nothing half-written (issue 8).

Run: python -m pytest -q tests/test_bad_input.py -p no:cacheprovider

The corpus is tests/fixtures/bad (its README lists every file); the JSON-array twin of each
per-row case is made here from the same lines, and the parquet cases are written here with
pyarrow (Hub dataset rows arrive as parquet). Most cases run in process through
`rows.read_rows` + `preprocess.build` with a one-id-per-character tokenizer; one strict case per
format and one lenient run over all three formats go through the real `qlora-kit` CLI on the
tiny model, which is built once for the module with `fetch.run`.

What each kind does in strict (`on_bad_row: error`) and lenient (`on_bad_row: drop`) mode is the
table in src/qlora_kit/text/rows.py's docstring; ROW_CASES below pins it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support.pipeline import fetched_tiny_root
from support.repo import BIN, kit_env, kit_root
from support.chartok import CharTok
from qlora_kit.config import load_recipe
from qlora_kit.text.examples import build
from qlora_kit.errors import DataError
from qlora_kit.text.rows import read_rows
from support.repo import FIXTURES

BAD = FIXTURES / "bad"
ROWS = BAD / "rows"
TINY = load_recipe("tiny")
TPL = TINY.template  # "Q: {instruction}\nA: " / "...\nInput: {input}\nA: " + "{output}{eos}"
# max_length 512: CharTok spends one id per character, so the placeholder row needs more than 128
STRICT = TINY.preprocess.model_copy(update={"on_bad_row": "error", "max_length": 512})
LENIENT = STRICT.model_copy(update={"on_bad_row": "drop"})
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")




TOK = CharTok()

# fixture (rows/NAME.jsonl, bad row on line 2) -> (reason, field the message names, message text)
ROW_CASES = {
    "malformed_json": ("malformed_json", None, r"malformed JSON line: Expecting property name"),
    "missing_output": ("missing_output", "output", r"is missing"),
    "null_instruction": ("null_instruction", "instruction", r"is null"),
    "null_input": ("null_input", "input", r"is null"),
    "wrong_type_number": ("wrong_type_output", "output", r"is int, expected a string"),
    "wrong_type_list": ("wrong_type_instruction", "instruction", r"is list, expected a string"),
    "wrong_type_object": ("wrong_type_input", "input", r"is object, expected a string"),
    "wrong_type_bool": ("wrong_type_output", "output", r"is bool, expected a string"),
    "empty_output": ("empty_output", "output", r"is empty"),
    "blank_output": ("empty_output", "output", r"is empty"),
    "empty_instruction": ("empty_instruction", "instruction", r"is empty"),
    "control_character": ("control_character", "output", r"control character U\+0000 at character 6"),
    "control_escape": ("control_character", "instruction", r"control character U\+001B at character 0"),
    "control_in_key": ("missing_instruction", "instruction", r"found key 'instruction\\x00'"),
    "space_in_key": ("missing_instruction", "instruction", r"found key ' instruction '"),
    "lone_surrogate": ("invalid_unicode", "output", r"lone surrogate U\+D800"),
    "duplicate_key": ("duplicate_key", "output", r"appears more than once"),
    "not_an_object": ("not_an_object", None, r"row is list, not an object"),
}
# rows that look odd but are fine: read as is in both modes (policy cases are further down)
ACCEPTED = {
    "missing_input": {"instruction": 'Rows without input mean input "".', "input": "",
                      "output": 'Kept, with input "".'},
    "duplicate_unused_key": {"instruction": "Two urls.", "input": "", "output": "Kept."},
    "tabs_and_newlines": {"instruction": "Keep\ttabs.", "input": "line 1\r\nline 2", "output": "a\nb"},
    "line_separators": {"instruction": "U+2028 \u2028 U+2029 \u2029 and NEL \u0085 are legal in JSON strings.",
                        "input": "", "output": "One row, not three."},
    "placeholders": {"instruction": "Fill in {input} and {instruction}", "input": "{output} {eos} {bos} {system}",
                     "output": "Literal {input} {0} {} {{x}} %s ${item} </eos> {eos}"},
    "near_duplicate": {"instruction": "하늘은 왜 파란가요?", "input": "",
                       "output": "레일리 산란 때문입니다."},
}


def json_twin(jsonl: Path, dest: Path) -> Path:
    """The same lines as a JSON array, one element per line: JSON-lines line N is array line N + 1."""
    lines = jsonl.read_text(encoding="utf-8").rstrip("\n").split("\n")
    out = dest / f"{jsonl.stem}.json"
    out.write_text("[\n" + ",\n".join(lines) + "\n]\n", encoding="utf-8")
    return out


def case_file(name: str, fmt: str, tmp_path: Path) -> tuple[Path, int]:
    """(file, line of the bad row) of a per-row case in the format asked for."""
    src = ROWS / f"{name}.jsonl"
    return (src, 2) if fmt == "jsonl" else (json_twin(src, tmp_path), 3)


def fields(path: Path, fmt: str, mapping: dict | None = None) -> list[dict]:
    return [r.fields for r in read_rows(path, fmt, mapping)]


def examples(parts) -> list[dict]:
    return [{k: v for k, v in e.to_json().items() if k != "origin"} for e in parts["train"] + parts["val"]]


def run_build(path: Path, fmt: str, pp, mapping: dict | None = None):
    return build(list(read_rows(path, fmt, mapping)), TOK, TPL, pp)


# --- the corpus itself ---------------------------------------------------------------------------

def test_byte_level_fixtures_survived_checkout():
    # .gitattributes keeps these bytes; if a checkout "fixed" them, the tests below would pass
    # without testing anything, so say so here instead
    assert (BAD / "bom.json").read_bytes().startswith(b"\xef\xbb\xbf[")
    assert (BAD / "bom.jsonl").read_bytes().startswith(b"\xef\xbb\xbf{")
    for name in ("crlf.json", "crlf.jsonl"):
        raw = (BAD / name).read_bytes()
        assert raw.count(b"\r\n") == raw.count(b"\n") > 3, name
    assert b"\r" not in (BAD / "clean.jsonl").read_bytes()
    assert (BAD / "utf16.json").read_bytes()[:2] == b"\xff\xfe"
    with pytest.raises(UnicodeDecodeError):
        (BAD / "not_utf8.jsonl").read_bytes().decode("utf-8")
    assert not (BAD / "truncated.jsonl").read_bytes().endswith(b"\n")
    for name in ROW_CASES | ACCEPTED:
        assert len((ROWS / f"{name}.jsonl").read_text(encoding="utf-8").split("\n")) == 4, name


# --- whole-file problems: refused in both modes ------------------------------------------------

def _bare_cr(tmp_path: Path) -> Path:
    p = tmp_path / "bare_cr.jsonl"
    p.write_bytes((BAD / "clean.jsonl").read_bytes().replace(b"\n", b"\r"))
    return p


def _corrupt_parquet(tmp_path: Path) -> Path:
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(fields(BAD / "clean.json", "json")), good)
    p = tmp_path / "corrupt.parquet"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return p


def _json_named_parquet(tmp_path: Path) -> Path:
    p = tmp_path / "json_inside.parquet"
    shutil.copyfile(BAD / "clean.json", p)
    return p


WHOLE_FILE = {
    "malformed.json": (lambda t: BAD / "malformed.json", "json",
                       r"malformed\.json:4: malformed JSON: expected ',' or ']'"),
    "truncated.json": (lambda t: BAD / "truncated.json", "json", r"truncated\.json:5: malformed JSON"),
    "not_an_array.json": (lambda t: BAD / "not_an_array.json", "json",
                          r"not_an_array\.json:1: expected a JSON array of rows"),
    "malformed_json row, as an array": (lambda t: json_twin(ROWS / "malformed_json.jsonl", t), "json",
                                        r"malformed_json\.json:3: malformed JSON: Expecting property name"),
    "not_utf8.jsonl": (lambda t: BAD / "not_utf8.jsonl", "jsonl",
                       r"not_utf8\.jsonl:3: not UTF-8 \(byte 0x[0-9a-f]{2} at offset \d+\).*cp949"),
    "utf16.json": (lambda t: BAD / "utf16.json", "json", r"utf16\.json:1: the file is UTF-16 or UTF-32"),
    "bare CR": (_bare_cr, "jsonl", r"bare_cr\.jsonl:1: line ends are bare CR"),
    "corrupt parquet": (_corrupt_parquet, "parquet", r"corrupt\.parquet: not a readable parquet file"),
    "JSON named .parquet": (_json_named_parquet, "parquet", r"json_inside\.parquet: not a readable parquet file"),
}


@pytest.mark.parametrize("mode", ["error", "drop"])
@pytest.mark.parametrize("case", list(WHOLE_FILE))
def test_whole_file_problems_stop_in_both_modes(case, mode, tmp_path):
    make, fmt, message = WHOLE_FILE[case]
    path = make(tmp_path)
    pp = STRICT if mode == "error" else LENIENT
    with pytest.raises(DataError, match=message) as e:
        run_build(path, fmt, pp)
    assert not RAW_CONTROL.search(str(e.value))  # safe to print to a terminal


# --- one bad row: strict names file, line and field; lenient drops and counts -------------------

# a malformed element ends a JSON array, so that pair is a whole-file case (above), not a row case
ROW_PARAMS = [(n, f) for n in ROW_CASES for f in ("jsonl", "json") if (n, f) != ("malformed_json", "json")]


@pytest.mark.parametrize("name, fmt", ROW_PARAMS)
def test_bad_row_strict_names_file_line_and_field(name, fmt, tmp_path):
    reason, field, message = ROW_CASES[name]
    path, line = case_file(name, fmt, tmp_path)
    rows = list(read_rows(path, fmt))
    assert [r.problem for r in rows] == ["", reason, ""]  # the reader flags it; it does not decide
    with pytest.raises(DataError) as e:
        build(rows, TOK, TPL, STRICT)
    text = str(e.value)
    assert text.startswith(f"{path}:{line}: "), text
    if field:
        assert f"field '{field}'" in text, text
    assert re.search(message, text), text
    assert not RAW_CONTROL.search(text), text


@pytest.mark.parametrize("name, fmt", ROW_PARAMS)
def test_bad_row_lenient_is_dropped_and_counted(name, fmt, tmp_path):
    reason = ROW_CASES[name][0]
    path, _ = case_file(name, fmt, tmp_path)
    parts, rep = run_build(path, fmt, LENIENT)
    j = rep.to_json()
    assert j["rows_in"] == 3 == j["kept"] + j["dropped"]
    assert j["dropped_by_reason"] == {reason: 1} and j["kept"] == 2
    assert sorted(e["instruction"] for e in examples(parts)) == ["Add the two numbers.", "하늘은 왜 파란가요?"]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("name", list(ACCEPTED))
def test_odd_but_valid_rows_are_kept_exactly(name, fmt, tmp_path):
    path, _ = case_file(name, fmt, tmp_path)
    rows = list(read_rows(path, fmt))
    assert len(rows) == 3 and not any(r.problem for r in rows)
    assert rows[1].fields == ACCEPTED[name]
    _, rep = build(rows, TOK, TPL, STRICT)
    assert rep.to_json()["kept"] == 3


def test_truncated_last_jsonl_line_is_named_and_droppable():
    path = BAD / "truncated.jsonl"
    with pytest.raises(DataError, match=r"truncated\.jsonl:6: malformed JSON on the last line, which has no "
                                         r"newline \(truncated file\?\)"):
        run_build(path, "jsonl", STRICT)
    parts, rep = run_build(path, "jsonl", LENIENT)
    assert rep.to_json()["dropped_by_reason"] == {"truncated_last_line": 1} and rep.to_json()["kept"] == 5
    # the five complete lines are exactly the clean file's first five rows
    assert [r.fields for r in read_rows(path, "jsonl") if not r.problem] == fields(BAD / "clean.jsonl", "jsonl")[:5]


def test_a_last_line_without_newline_that_parses_is_fine(tmp_path):
    p = tmp_path / "no_final_newline.jsonl"
    p.write_bytes((BAD / "clean.jsonl").read_bytes().rstrip(b"\n"))
    assert fields(p, "jsonl") == fields(BAD / "clean.jsonl", "jsonl")


# --- accepted encodings: the result equals the clean file's --------------------------------------

@pytest.mark.parametrize("variant", ["bom", "crlf"])
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_bom_and_crlf_give_the_clean_result(variant, fmt):
    clean = list(read_rows(BAD / f"clean.{fmt}", fmt))
    other = list(read_rows(BAD / f"{variant}.{fmt}", fmt))
    assert [(r.line, r.fields) for r in other] == [(r.line, r.fields) for r in clean]
    assert all("\r" not in v and "\ufeff" not in v for r in other for v in r.fields.values())
    a, rep_a = build(clean, TOK, TPL, STRICT)
    b, rep_b = build(other, TOK, TPL, STRICT)
    assert examples(a) == examples(b) and rep_a.to_json() == rep_b.to_json()


def test_json_array_and_json_lines_read_the_same_rows():
    assert fields(BAD / "clean.json", "json") == fields(BAD / "clean.jsonl", "jsonl")


# --- policy, not bad input: length and duplicates ---------------------------------------------------

def test_a_row_far_over_the_limit_is_dropped_or_cut_and_counted():
    path = ROWS / "long_row.jsonl"
    parts, rep = run_build(path, "jsonl", STRICT)  # policy, so strict mode does not stop on it
    assert rep.to_json()["dropped_by_reason"] == {"overlength": 1} and rep.to_json()["kept"] == 2
    cut = STRICT.model_copy(update={"overlength": "truncate"})
    parts, rep = run_build(path, "jsonl", cut)
    j = rep.to_json()
    assert j["truncated"] == 1 and j["kept"] == 3 and j["dropped"] == 0
    assert max(len(e["input_ids"]) for e in examples(parts)) == cut.max_length


@pytest.mark.parametrize("dedupe", [True, False])
def test_exact_duplicates_are_counted_when_dedupe_and_kept_otherwise(dedupe):
    pp = STRICT.model_copy(update={"dedupe": dedupe})
    _, rep = run_build(ROWS / "duplicates.jsonl", "jsonl", pp)
    j = rep.to_json()
    assert j["rows_in"] == 3 == j["kept"] + j["dropped"]
    assert j["dropped_by_reason"] == ({"duplicate": 1} if dedupe else {})
    _, rep = run_build(ROWS / "near_duplicate.jsonl", "jsonl", pp)  # same instruction, other output
    assert rep.to_json()["kept"] == 3


def test_placeholders_in_the_data_come_out_literally():
    parts, _ = run_build(ROWS / "placeholders.jsonl", "jsonl", STRICT)
    ex = next(e for e in examples(parts) if e["instruction"].startswith("Fill in"))
    assert ex["prompt"] == "Q: Fill in {input} and {instruction}\nInput: {output} {eos} {bos} {system}\nA: "
    assert ex["completion"] == "Literal {input} {0} {} {{x}} %s ${item} </eos> {eos}</s>"
    ids = ex["input_ids"]  # the literal "{eos}" / "{bos}" never turn into the special ids
    assert ids.count(TOK.eos_id) == 1 and ids[-1] == TOK.eos_id and ids.count(TOK.bos_id) == 1


# --- parquet (Hub dataset rows) ----------------------------------------------------------------------

A = {"instruction": "Parquet row one", "input": "", "output": "one"}
B = {"instruction": "Parquet row two", "input": "ctx", "output": "two"}


def _table(cols: dict[str, pa.Array]) -> pa.Table:
    return pa.table(cols)


def _str(*vals) -> pa.Array:
    return pa.array(list(vals), type=pa.string())


PARQUET_CASES = {
    # name -> (columns, mapping, reason, row, field, message)
    "null_output": ({"instruction": _str("a", "b", "c"), "input": _str("", "", ""), "output": _str("x", None, "z")},
                    {}, "null_output", 2, "output", r"is null"),
    "int_output": ({"instruction": _str("a", "b", "c"), "input": _str("", "", ""),
                    "output": pa.array([1, 2, 3], type=pa.int64())}, {}, "wrong_type_output", 1, "output", r"is int"),
    "list_instruction": ({"instruction": pa.array([["a"], ["b"], ["c"]]), "input": _str("", "", ""),
                          "output": _str("x", "y", "z")}, {}, "wrong_type_instruction", 1, "instruction", r"is list"),
    "no_output_column": ({"instruction": _str("a", "b", "c"), "input": _str("", "", "")},
                         {}, "missing_output", 1, "output", r"is missing"),
    "binary_output": ({"instruction": _str("a", "b", "c"), "input": _str("", "", ""),
                       "output": pa.array([b"x", b"\xff\xfe not utf-8", b"z"], type=pa.binary())},
                      {}, "wrong_type_output", 1, "output", r"is bytes"),
    "empty_output": ({"instruction": _str("a", "b", "c"), "input": _str("", "", ""), "output": _str("x", "", "z")},
                     {}, "empty_output", 2, "output", r"is empty"),
    "control_character": ({"instruction": _str("a", "b\x07", "c"), "input": _str("", "", ""),
                           "output": _str("x", "y", "z")}, {}, "control_character", 2, "instruction", r"U\+0007"),
    "mapped_null": ({"instruction": _str("a", "b", "c"), "context": _str("", "", ""),
                     "response": _str("x", None, "z")}, {"input": "context", "output": "response"},
                    "null_output", 2, "response", r"is null"),
    "mapped_missing": ({"instruction": _str("a", "b", "c"), "output": _str("x", "y", "z")},
                       {"output": "response"}, "missing_output", 1, "response", r"\(data\.fields\.output\) is missing"),
}


@pytest.mark.parametrize("name", list(PARQUET_CASES))
def test_parquet_bad_rows_strict_and_lenient(name, tmp_path):
    cols, mapping, reason, row, field, message = PARQUET_CASES[name]
    path = tmp_path / f"{name}.parquet"
    pq.write_table(_table(cols), path)
    with pytest.raises(DataError) as e:
        run_build(path, "parquet", STRICT, mapping)
    text = str(e.value)
    assert text.startswith(f"{path}: row {row}: field '{field}'") and re.search(message, text), text
    assert not RAW_CONTROL.search(text), text
    _, rep = run_build(path, "parquet", LENIENT, mapping)
    j = rep.to_json()
    bad = sum(r.problem == reason for r in read_rows(path, "parquet", mapping))
    assert j["rows_in"] == 3 == j["kept"] + j["dropped"] and j["dropped_by_reason"] == {reason: bad} and bad >= 1


def test_parquet_rows_equal_the_json_rows_and_keep_placeholders_and_duplicates(tmp_path):
    clean = fields(BAD / "clean.json", "json")
    path = tmp_path / "clean.parquet"
    pq.write_table(pa.Table.from_pylist(clean), path)
    assert fields(path, "parquet") == clean
    odd = [A, A, ACCEPTED["placeholders"], ACCEPTED["line_separators"], B]
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.Table.from_pylist(odd), path)
    assert fields(path, "parquet") == odd
    _, rep = run_build(path, "parquet", STRICT.model_copy(update={"dedupe": True}))
    assert rep.to_json()["dropped_by_reason"] == {"duplicate": 1} and rep.to_json()["kept"] == 4


# --- through the real CLI: one strict case per format, one lenient run over all three ------------

@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """models/tiny/base built once by fetch.run; each CLI case copies it in as a local model."""
    return fetched_tiny_root(tmp_path_factory.mktemp("bad-input-base")) / "models" / "tiny" / "base"


def kit(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "qlora-kit"), *args], cwd=root, env=kit_env(root), capture_output=True,
                          text=True, timeout=300)


def fetched_root(tmp_path: Path, base: Path, data: Path, fmt: str, *extra: str) -> Path:
    """A fresh kit root whose data/tiny/raw holds `data` (+ extras), fetched by `qlora-kit fetch`."""
    root = kit_root(tmp_path / "kit")
    out = kit(root, "fetch", "--recipe", "tiny", "--set", "model.source=local", "--set", f"model.name={base}",
              "--set", "data.source=local", "--set", f"data.path={data}", "--set", f"data.format={fmt}", *extra)
    assert out.returncode == 0, out.stderr
    return root


def assert_nothing_written(root: Path) -> None:
    assert not (root / "data/tiny/processed").exists()
    assert not (root / "reports/tiny/data_report.json").exists()
    assert not list((root / "data/tiny").glob("processed.partial-*"))


def _strict_json(tmp_path: Path) -> tuple[Path, str]:
    return json_twin(ROWS / "wrong_type_number.jsonl", tmp_path), r"wrong_type_number\.json:3: field 'output' is int"


def _strict_jsonl(tmp_path: Path) -> tuple[Path, str]:
    return ROWS / "null_instruction.jsonl", r"null_instruction\.jsonl:2: field 'instruction' is null"


def _strict_parquet(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "null_output.parquet"
    pq.write_table(_table(PARQUET_CASES["null_output"][0]), path)
    return path, r"null_output\.parquet: row 2: field 'output' is null"


@pytest.mark.slow
@pytest.mark.parametrize("fmt, make", [("json", _strict_json), ("jsonl", _strict_jsonl),
                                       ("parquet", _strict_parquet)])
def test_cli_strict_exits_2_naming_file_line_field_and_writes_nothing(base_model, tmp_path, fmt, make):
    data, message = make(tmp_path)
    root = fetched_root(tmp_path, base_model, data, fmt)
    out = kit(root, "preprocess", "--recipe", "tiny", "--set", "preprocess.on_bad_row=error")
    assert out.returncode == 2, out.stderr
    assert re.search(r"qlora-kit preprocess: error: .*" + message, out.stderr), out.stderr
    assert "Traceback" not in out.stderr
    assert_nothing_written(root)


def _lenient_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three files, one per format, mixing clean rows, bad rows and policy cases (counts below)."""
    line2 = {n: (ROWS / f"{n}.jsonl").read_text(encoding="utf-8").split("\n")[1] for n in
             list(ROW_CASES) + list(ACCEPTED) + ["duplicates", "long_row"]}
    jl = (BAD / "clean.jsonl").read_text(encoding="utf-8").rstrip("\n").split("\n")  # 6 clean rows
    jl += [line2[n] for n in ("malformed_json", "missing_output", "null_input", "wrong_type_bool", "blank_output",
                              "control_escape", "control_in_key", "lone_surrogate", "duplicate_key",
                              "not_an_object", "missing_input", "line_separators", "placeholders",
                              "duplicates", "long_row")]
    jsonl = tmp_path / "mixed.jsonl"  # with a BOM and CRLF line ends, and a truncated last line
    jsonl.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(jl) + "\r\n").encode() + line2["near_duplicate"][:30].encode())
    arr = [line2[n] for n in ("wrong_type_number", "null_instruction", "empty_output", "wrong_type_list",
                              "near_duplicate", "tabs_and_newlines", "duplicate_unused_key")]
    js = tmp_path / "mixed.json"
    js.write_text("[\n" + ",\n".join(arr) + "\n]\n", encoding="utf-8")
    pqt = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist([A, {**B, "output": None}, {**B, "output": ""}, A,
                                         {"instruction": "{instruction} in parquet", "input": "{input}",
                                          "output": "{output}"}]), pqt)
    return jsonl, js, pqt


@pytest.mark.slow
def test_cli_lenient_drops_and_counts_by_reason_across_formats(base_model, tmp_path):
    jsonl, js, pqt = _lenient_inputs(tmp_path)
    extra = f"data.extra=[{{path: '{js}', format: json}}, {{path: '{pqt}', format: parquet}}]"
    root = fetched_root(tmp_path, base_model, jsonl, "jsonl", "--set", extra)
    out = kit(root, "preprocess", "--recipe", "tiny", "--set", "preprocess.on_bad_row=drop",
              "--set", "preprocess.dedupe=true", "--set", "preprocess.max_length=512")
    assert out.returncode == 0, out.stderr
    rep = json.loads((root / "reports/tiny/data_report.json").read_text())
    assert rep["dropped_by_reason"] == {
        # mixed.jsonl
        "malformed_json": 1, "missing_output": 1, "null_input": 1, "control_character": 1,
        "missing_instruction": 1, "invalid_unicode": 1, "duplicate_key": 1, "not_an_object": 1,
        "overlength": 1, "truncated_last_line": 1,
        # mixed.json
        "null_instruction": 1, "wrong_type_instruction": 1,
        # mixed.jsonl bool + mixed.json int; blank (jsonl) + "" (json) + "" (parquet); A again twice
        "wrong_type_output": 2, "empty_output": 3, "duplicate": 2,
        # mixed.parquet
        "null_output": 1,
    }
    # kept: 6 clean + missing_input, line_separators, placeholders | near_duplicate, tabs, unused dup key | A, {..}
    assert (rep["rows_in"], rep["kept"], rep["dropped"]) == (22 + 7 + 5, 9 + 3 + 2, 20)
    assert rep["rows_in"] == rep["kept"] + rep["dropped"] == 34
    assert sum(rep["kept_by_split"].values()) == rep["kept"]
    processed = [json.loads(line) for split in ("train", "val")  # not splitlines(): U+2028 is in a row
                 for line in (root / f"data/tiny/processed/{split}.jsonl").read_text(encoding="utf-8").split("\n")
                 if line]
    assert len(processed) == 14 and (root / "data/tiny/processed/manifest.json").is_file()
    lit = next(e for e in processed if e["instruction"] == "Fill in {input} and {instruction}")
    assert lit["prompt"] == "Q: Fill in {input} and {instruction}\nInput: {output} {eos} {bos} {system}\nA: "
    assert lit["completion"] == "Literal {input} {0} {} {{x}} %s ${item} </eos> {eos}</s>"
    manifest = json.loads((root / "data/tiny/processed/manifest.json").read_text())
    eos, bos = manifest["facts"]["special_ids"]["eos"], manifest["facts"]["special_ids"]["bos"]
    assert lit["input_ids"].count(eos) == 1 and lit["input_ids"][-1] == eos and lit["input_ids"].count(bos) == 1
    pq_row = next(e for e in processed if e["instruction"] == "{instruction} in parquet")
    assert pq_row["prompt"] == "Q: {instruction} in parquet\nInput: {input}\nA: "
    # the file's CRLF line ends stay out of the values (only the row that spells "\r\n" keeps one)
    assert [e["instruction"] for e in processed if "\r" in e["prompt"] + e["completion"]] == ["Keep\ttabs."]


# --- interrupted and concurrent runs -----------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_during_preprocess_leaves_no_processed_folder_and_rerun_finishes(base_model, tmp_path):
    big = tmp_path / "big.jsonl"  # enough rows that writing processed/ takes a while to catch
    with open(big, "w", encoding="utf-8") as f:
        for i in range(12000):
            f.write(json.dumps({"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{2 * i}."}) + "\n")
    root = fetched_root(tmp_path, base_model, big, "jsonl")
    proc = subprocess.Popen([str(BIN / "qlora-kit"), "preprocess", "--recipe", "tiny"], cwd=root, env=kit_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    data = root / "data" / "tiny"
    deadline = time.monotonic() + 240
    while not list(data.glob("processed.partial-*")):
        assert proc.poll() is None, f"preprocess ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "preprocess never started writing"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # killed mid-write: only the partial folder exists, nothing that looks finished
    assert list(data.glob("processed.partial-*")), "killed after the rename; the test needs a bigger input"
    assert not (data / "processed").exists() and not (root / "reports/tiny/data_report.json").exists()

    out = kit(root, "preprocess", "--recipe", "tiny")
    assert out.returncode == 0, out.stderr
    assert not list(data.glob("processed.partial-*"))  # the rerun cleared the killed run's partial
    rep = json.loads((root / "reports/tiny/data_report.json").read_text())
    assert rep["rows_in"] == 12000 == rep["kept"] + rep["dropped"]
    n = sum(len((data / f"processed/{s}.jsonl").read_text().splitlines()) for s in ("train", "val"))
    assert n == rep["kept"]


# --- a stage run before the stage that makes its input: one line, exit 2 (issue 16) ----------

@pytest.mark.parametrize("stage, missing, first", [("preprocess", "data/tiny/raw", "fetch"),
                                                   ("train", "models/tiny/base", "fetch"),
                                                   ("merge", "models/tiny/base", "fetch"),
                                                   ("quantize", "models/tiny/merged", "merge"),
                                                   ("evaluate", "models/tiny/merged", "merge")])
def test_a_stage_before_its_inputs_names_the_stage_to_run_first(stage, missing, first, tmp_path, monkeypatch,
                                                               capsys):
    from qlora_kit import cli

    root = kit_root(tmp_path / "kit")
    monkeypatch.setenv("QLORA_KIT_ROOT", str(root))
    assert cli.main([stage, "--recipe", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err == (f"qlora-kit {stage}: error: {root / missing} does not exist yet: run `qlora-kit {first} "
                   f"--recipe tiny` first (or `make {stage} RECIPE=tiny`, which runs every stage {stage} needs)")
