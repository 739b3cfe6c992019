"""Hostile data files (issue 14): nesting bombs, huge integers, huge rows and symlinked inputs are
bad rows or refusals with file:line:field, never tracebacks, and cost what a normal row costs.

Every large input is generated here at test time. Rows go through `rows.read_rows` and
`examples.build` with a one-id-per-character tokenizer, plus one real `qlora-kit` run per kind.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from qlora_kit import cli
from qlora_kit.config import load_recipe
from qlora_kit.errors import DataError
from qlora_kit.text.examples import build, char_bound
from qlora_kit.text.rows import MAX_INT_DIGITS, read_rows
from support.chartok import CharTok
from support.repo import kit_root

TINY = load_recipe("tiny")
STRICT = TINY.preprocess.model_copy(update={"on_bad_row": "error", "max_length": 64})
LENIENT = STRICT.model_copy(update={"on_bad_row": "drop"})
GOOD = {"instruction": "Say hi", "input": "", "output": "hi"}
DEPTH = 100_000


def deep(n: int = DEPTH) -> str:
    return "[" * n + "]" * n


def jsonl(tmp_path: Path, lines: list[str], name: str = "rows.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def array(tmp_path: Path, items: list[str], name: str = "rows.json") -> Path:
    p = tmp_path / name
    p.write_text("[\n" + ",\n".join(items) + "\n]\n", encoding="utf-8")
    return p


TOO_DEEP = r"the row is nested deeper than the JSON decoder"
CASES = {
    "too_deep": ('{"instruction": "a", "output": "b", "extra": %s}' % deep(), TOO_DEEP),
    "too_deep_row": (deep(), TOO_DEEP),
    "number_too_large": ('{"instruction": "a", "output": "b", "id": %s}' % ("9" * 5000),
                         rf"field 'id' holds an integer of more than {MAX_INT_DIGITS} digits"),
    "number_in_a_field": ('{"instruction": "a", "output": %s}' % ("1" * 5000), r"field 'output' holds an integer"),
    "number_in_a_list": ('{"instruction": "a", "output": "b", "n": [1, %s]}' % ("7" * 5000), r"field 'n' holds"),
}
REASON = {"too_deep": "too_deep", "too_deep_row": "too_deep", "number_too_large": "number_too_large",
          "number_in_a_field": "number_too_large", "number_in_a_list": "number_too_large"}


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_nesting_bomb_or_huge_integer_is_one_bad_row_with_its_line(tmp_path, fmt, case):
    bad, message = CASES[case]
    lines = [json.dumps(GOOD), bad, json.dumps(GOOD)]
    path = jsonl(tmp_path, lines) if fmt == "jsonl" else array(tmp_path, lines)
    rows = list(read_rows(path, fmt))
    assert [r.problem for r in rows] == ["", REASON[case], ""]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{rows[1].line}: {message}"):
        build(rows, CharTok(), TINY.template, STRICT)
    parts, rep = build(rows, CharTok(), TINY.template, LENIENT)
    assert rep.to_json()["dropped_by_reason"] == {REASON[case]: 1} and rep.rows_in == 3
    assert sum(len(v) for v in parts.values()) == 2


def test_a_nesting_bomb_that_never_closes_refuses_the_file_with_its_line(tmp_path):
    path = tmp_path / "open.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + "[" * DEPTH + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: malformed JSON: a value nested deeper"):
        list(read_rows(path, "json"))


class CountingTok(CharTok):
    """CharTok that remembers the longest text it was asked to encode."""

    longest = 0

    def encode(self, text: str) -> list[int]:
        self.longest = max(self.longest, len(text))
        return super().encode(text)


def test_a_huge_row_is_dropped_without_being_tokenized(tmp_path):
    huge = {"instruction": "Summarise", "input": "", "output": "x" * (20 << 20)}  # 20 MB, made here
    path = jsonl(tmp_path, [json.dumps(GOOD), json.dumps(huge)])
    tok = CountingTok()
    pp = LENIENT.model_copy(update={"overlength": "drop"})
    parts, rep = build(list(read_rows(path, "jsonl")), tok, TINY.template, pp)
    assert rep.to_json()["dropped_by_reason"] == {"overlength": 1}
    assert tok.longest < 200  # only the good row was tokenized


def test_a_huge_row_is_cut_before_tokenizing_and_gives_the_same_example(tmp_path):
    pp = LENIENT.model_copy(update={"overlength": "truncate"})
    long = {"instruction": "Summarise", "input": "", "output": "abc " * 100_000}
    path = jsonl(tmp_path, [json.dumps(long)])
    tok = CountingTok()
    parts, rep = build(list(read_rows(path, "jsonl")), tok, TINY.template, pp)
    assert tok.longest <= char_bound(tok, pp) < 400_000
    [ex] = parts["train"] + parts["val"]
    from qlora_kit.text.examples import length_policy, tokenize_example
    from qlora_kit.text.templates import render

    rend = render(TINY.template, long, bos="<s>", eos="</s>")
    ids, labels, _ = tokenize_example(rend.prompt, rend.completion, CharTok(), TINY.template, pp)
    ids, labels, action = length_policy(ids, labels, pp)
    assert action == "truncate" and ex.input_ids == ids and ex.labels == labels and rep.truncated == 1


def test_a_symlinked_data_file_is_refused_and_nothing_is_copied(tmp_path, monkeypatch, capsys):
    root = kit_root(tmp_path / "kit")
    monkeypatch.setenv("QLORA_KIT_ROOT", str(root))
    link = tmp_path / "data.json"
    os.symlink("/etc/passwd", link)
    code = cli.main(["fetch", "--recipe", "tiny", "--set", "data.source=local", "--set", f"data.path={link}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is a symlink (to /etc/passwd)" in err, err
    assert not (root / "data").exists() or not any(p.is_file() for p in (root / "data").rglob("*"))
    assert not (root / "models").exists() or not any(p.is_file() for p in (root / "models").rglob("*"))


@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> Path:
    """A kit root with the tiny base and, as its raw data, the nesting bomb and the huge integer."""
    import subprocess

    from support.repo import BIN, kit_env

    tmp = tmp_path_factory.mktemp("hostile-data")
    data = jsonl(tmp, [json.dumps(GOOD), CASES["too_deep"][0], CASES["number_too_large"][0], json.dumps(GOOD)])
    root = kit_root(tmp / "kit")
    out = subprocess.run([str(BIN / "qlora-kit"), "fetch", "--recipe", "tiny", "--set", "data.source=local",
                          "--set", f"data.path={data}", "--set", "data.format=jsonl"], cwd=root, env=kit_env(root),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return root


@pytest.mark.parametrize("mode", ["error", "drop"])
def test_cli_preprocess_of_a_nesting_bomb_exits_2_or_counts_it(fetched, mode):
    import subprocess

    from support.repo import BIN, kit_env

    out = subprocess.run([str(BIN / "qlora-kit"), "preprocess", "--recipe", "tiny", "--set",
                          f"preprocess.on_bad_row={mode}"], cwd=fetched, env=kit_env(fetched),
                         capture_output=True, text=True, timeout=600)
    report = fetched / "reports" / "tiny" / "data_report.json"
    if mode == "error":
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert re.search(r"qlora-kit preprocess: error: .*rows.jsonl:2: the row is nested deeper", out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and not report.exists()
        assert not (fetched / "data" / "tiny" / "processed").exists()
    else:
        assert out.returncode == 0, out.stderr
        rep = json.loads(report.read_text())
        assert rep["dropped_by_reason"] == {"number_too_large": 1, "too_deep": 1} and rep["kept"] == 2
