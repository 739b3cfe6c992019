"""Preprocess core: label masks, length policy, split, counting, strict vs lenient rows."""
from __future__ import annotations

import json

import pytest

from support.chartok import CharTok
from qlora_kit.config import Preprocess, Template
from qlora_kit.text.examples import IGNORE, build, tokenize_example
from qlora_kit.errors import DataError
from qlora_kit.text.rows import read_rows
from qlora_kit.text.templates import render, substitute
from qlora_kit.text.tokenizer import apply_policy




TPL = Template(prompt="Q: {instruction}\nA: ", prompt_with_input="Q: {instruction}\nIn: {input}\nA: ",
               completion="{output}{eos}")


def _rows(tmp_path, rows, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    return list(read_rows(p, "json"))


def test_placeholders_in_data_come_out_literally():
    assert substitute("<{instruction}>", {"instruction": "{input} {output}"}) == "<{input} {output}>"
    r = render(TPL, {"instruction": "say {input}", "input": "", "output": "{eos}"}, eos="</s>")
    assert r.prompt == "Q: say {input}\nA: " and r.completion == "{eos}</s>"


def test_completion_mask_boundary_and_eos():
    ids, labels, n = tokenize_example("Q: hi\nA: ", "yo</s>", CharTok(), TPL, Preprocess())
    assert ids[0] == 1 and n == 1 + len("Q: hi\nA: ")
    assert labels[:n] == [IGNORE] * n and labels[n:] == ids[n:] and ids[-1] == 2


def test_pad_equal_eos_masks_the_eos_label():
    tok = CharTok()
    tok.pad_id = 2
    _, labels, _ = tokenize_example("Q\n", "yo</s>", tok, TPL, Preprocess(loss="full", mask_pad_in_labels=True))
    assert labels[-1] == IGNORE and labels[0] == 1  # full-text loss, but EOS masked (llama2-koalpaca)


def test_counts_split_and_length_policy(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": "x" * (i % 7 + 1)} for i in range(100)]
    rows[5]["output"] = ""
    rows.append({"instruction": "long", "input": "", "output": "y" * 500})
    src = _rows(tmp_path, rows)
    pp = Preprocess(max_length=64, overlength="drop", val_ratio=0.1, split_seed=3, on_bad_row="drop")
    parts, rep = build(src, CharTok(), TPL, pp)
    j = rep.to_json()
    assert j["rows_in"] == 101 and j["dropped_by_reason"] == {"empty_output": 1, "overlength": 1}
    assert j["kept"] == 99 and j["kept_by_split"] == {"train": 89, "val": 10}
    again, _ = build(src, CharTok(), TPL, pp)
    assert [e.row for e in again["val"]] == [e.row for e in parts["val"]]
    trunc, rep2 = build(src, CharTok(), TPL, Preprocess(max_length=64, on_bad_row="drop"))
    assert rep2.truncated == 1 and max(len(e.input_ids) for e in trunc["train"] + trunc["val"]) == 64


def test_strict_mode_names_file_line_and_field(tmp_path):
    src = _rows(tmp_path, [{"instruction": "a", "input": "", "output": "b"},
                           {"instruction": "c", "input": None, "output": "d"}])
    with pytest.raises(DataError, match=r"d\.json:7: field 'input' is null"):
        build(src, CharTok(), TPL, Preprocess(on_bad_row="error"))


def test_truncated_json_file_is_an_error_with_line(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('[\n {"instruction": "a", "input": "", "output": "b"},\n {"instruction": "c", "inp')
    with pytest.raises(DataError, match=r"t\.json:3: malformed JSON"):
        list(read_rows(p, "json"))


def test_real_tokenizer_policy_is_explicit_about_bos(tiny_llama):
    from transformers import AutoTokenizer

    tok = apply_policy(AutoTokenizer.from_pretrained(str(tiny_llama)), TPL)
    ids, labels, n = tokenize_example("Q: 3 더하기 4는?\nA: ", "7입니다.</s>", tok, TPL, Preprocess())
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2 and ids.count(1) == 1
    assert labels[n - 1] == IGNORE and labels[n] == ids[n]
    no_bos = Template(**{**TPL.model_dump(), "add_bos": False})
    ids2, _, _ = tokenize_example("Q: x\nA: ", "y</s>", tok, no_bos, Preprocess())
    assert ids2[0] != 1
