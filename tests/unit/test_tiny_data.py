"""Tests for the shipped `tiny` sample data set and its generator (qlora_kit.tiny.data).

Run: python -m pytest -q tests/test_tiny_data.py
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter

import pytest

from qlora_kit.tiny import data as tiny_data
from qlora_kit.tiny import tables

HANGUL = re.compile(r"[\uac00-\ud7a3]")
README = tiny_data.SHIPPED_PATH.parent / "README.md"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return tiny_data.generate(0)


def test_shipped_file_is_exactly_the_generator_output(rows):
    # Byte for byte, so the shipped data cannot drift from its generator (or vice versa).
    shipped = tiny_data.SHIPPED_PATH.read_bytes()
    assert shipped == tiny_data.dumps(rows).encode("utf-8")
    assert shipped.endswith(b"\n") and not shipped.endswith(b"\n\n")
    assert json.loads(shipped.decode("utf-8")) == rows
    assert len(shipped) < 150_000


def test_check_mode_detects_drift(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    assert tiny_data.main(["--out", str(out), "--check"]) == 1  # missing file
    assert tiny_data.main(["--out", str(out)]) == 0
    assert tiny_data.main(["--out", str(out), "--check"]) == 0
    out.write_text(out.read_text(encoding="utf-8").replace("7입니다.", "8입니다.", 1),
                   encoding="utf-8")
    assert tiny_data.main(["--out", str(out), "--check"]) == 1
    assert "differs" in capsys.readouterr().err


def test_rows_have_exactly_three_string_fields(rows):
    assert 600 <= len(rows) <= 900
    for i, row in enumerate(rows):
        assert list(row) == ["instruction", "input", "output"], i
        assert all(isinstance(v, str) for v in row.values()), i
        assert row["instruction"].strip() and row["output"].strip(), i
        assert all(v == v.strip() for v in row.values()), i
        # Clean text: no template placeholders, control characters or doubled spaces.
        for v in row.values():
            assert not re.search(r"[{}\x00-\x1f]|  ", v), (i, v)


def test_no_prompt_has_two_answers(rows):
    answers: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        answers.setdefault((row["instruction"], row["input"]), set()).add(row["output"])
    conflicting = {k: v for k, v in answers.items() if len(v) > 1}
    assert not conflicting


def test_both_languages_in_meaningful_share(rows):
    with_hangul = sum(bool(HANGUL.search(" ".join(r.values()))) for r in rows)
    korean_instruction = sum(bool(HANGUL.search(r["instruction"])) for r in rows)
    assert with_hangul / len(rows) >= 0.30
    # Roughly half the instructions in each language.
    assert 0.40 <= korean_instruction / len(rows) <= 0.60


def test_some_rows_use_input_most_do_not(rows):
    with_input = sum(bool(r["input"]) for r in rows)
    assert 0.10 * len(rows) <= with_input <= 0.40 * len(rows)


def test_answers_are_short(rows):
    for row in rows:
        assert len(row["output"]) <= tiny_data.MAX_OUTPUT_CHARS, row
        assert len(row["output"].split()) <= 8, row


def test_instructions_vary_within_a_task():
    # Several phrasings per task and language, so the model cannot key on one fixed string.
    tagged = tiny_data.generate_tagged(0)
    for task in tiny_data.TASKS:
        for lang in tiny_data.LANGS:
            texts = [t.row["instruction"] for t in tagged if (t.task, t.lang) == (task, lang)]
            # Strip what the table fills in, leaving the phrasing skeleton.
            skeletons = {re.sub(r"'[^']*'|\d+|[A-Z][a-z]+|[\uac00-\ud7a3]+(?=의)", "_", s)
                         for s in texts}
            assert len(texts) >= 15, (task, lang)
            assert len(skeletons) >= 2, (task, lang, skeletons)


def test_answers_are_correct_for_arithmetic_and_lookups():
    # Spot-check the content, not only the shape: recompute the answer from the question.
    checked = Counter()
    for t in tiny_data.generate_tagged(0):
        q, inp, out = t.row["instruction"], t.row["input"], t.row["output"]
        nums = [int(n) for n in re.findall(r"\d+", q)]
        if t.task == "addition":
            assert int(re.match(r"\d+", out).group()) == sum(nums), t
        elif t.task == "subtraction":
            # "Subtract 2 from 6" names the numbers in reverse; answers are never negative.
            assert int(re.match(r"\d+", out).group()) == max(nums) - min(nums), t
        elif t.task == "larger_number":
            assert int(re.match(r"\d+", out).group()) == max(nums), t
        elif t.task == "reverse_word":
            assert out == inp[::-1] and out != inp, t
        elif t.task == "repeat_word":
            assert out == (inp or q.rsplit(" ", 1)[-1]), t
        elif t.task == "count_letters":
            word = inp or re.search(r"'([^']*)'", q).group(1)
            assert int(re.match(r"\d+", out).group()) == len(word), t
        else:
            continue
        checked[t.task] += 1
    assert len(checked) == 6


def test_korean_particles_follow_the_final_consonant():
    assert tables.topic("사과") == "사과는" and tables.topic("책") == "책은"
    assert tables.obj("3") == "3을" and tables.obj("2") == "2를"
    assert tables.and_("10") == "10과" and tables.and_("9") == "9와"
    assert tables.topic("빵", quote=True) == "'빵'은"
    with pytest.raises(ValueError):
        tables.topic("apple")


def test_deterministic_and_seed_dependent():
    a, b = tiny_data.generate(0), tiny_data.generate(0)
    assert a == b
    c = tiny_data.generate(1)
    assert c != a
    assert len(c) == len(a)  # the seed changes sampling and order, not the shape


def test_readme_states_the_computed_counts():
    table = tiny_data.counts_markdown(tiny_data.generate_tagged(0))
    assert table in README.read_text(encoding="utf-8")


def test_sentencepiece_bpe_of_1000_pieces_trains_on_it(rows):
    # The tiny recipe trains its ~1000-piece tokenizer on this text; the data must support it.
    spm = pytest.importorskip("sentencepiece")
    lines = [v for r in rows for v in r.values() if v]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                   vocab_size=1000, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    assert sp.get_piece_size() == 1000
    # Short answers stay short in tokens, so a tiny model reaches EOS quickly.
    lengths = [len(sp.encode(r["output"])) for r in rows]
    assert max(lengths) <= 16 and sum(lengths) / len(lengths) <= 6
