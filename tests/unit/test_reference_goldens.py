"""The kit against its sources' own code on the edge-case set, with the real Llama-2 tokenizer.

tests/fixtures/golden/<recipe>.edge.jsonl holds, for every row of edge_cases.jsonl (literal
<s>/</s>/<unk>, whitespace at the prompt/answer boundary, indentation and runs of spaces, emoji,
control characters, empty outputs, rows at llama2-koalpaca's 1022-1025-token boundary and past
komt's 2048 and alpagasus2's 256), the input_ids, labels and keep/drop decision that the
source's preprocessing code produced under its era's libraries (tools/reference/, regenerated
by tools/reference/make_goldens.sh). The kit, with the recipe as shipped (faithful mode) and the
tokenizer folder in the layout the source loaded, must produce exactly the same, row by row.

    PYTHONPATH=src .venv/bin/python -m pytest -q tests/unit/test_reference_goldens.py
"""
from __future__ import annotations

import json

import pytest

from support.goldens import (EDGE_CASES, GOLDEN, RECIPES, first_difference, kit_results, layout,
                             needs_tokenizer, read_golden, reference_module, tokenizer_dir)

CASES = [json.loads(x)["case"] for x in EDGE_CASES.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def kit_edge(tmp_path_factory):
    """The kit's per-row results on the edge cases, once per recipe (the tokenizer loads once)."""
    from support.goldens import edge_rows

    runs: dict[str, tuple] = {}

    def get(recipe: str):
        if recipe not in runs:
            tok_dir = tokenizer_dir(tmp_path_factory.mktemp(f"tok-{recipe}"), layout(recipe))
            runs[recipe] = kit_results(recipe, edge_rows(), tok_dir)
        return runs[recipe]

    return get


def test_edge_cases_file_is_what_the_script_writes():
    """The hand-written rows of edge_cases.jsonl are make_edge_cases.CASES; the rest are the long rows."""
    cases = reference_module("make_edge_cases").CASES
    rows = [json.loads(x) for x in EDGE_CASES.read_text(encoding="utf-8").splitlines()]
    assert rows[: len(cases)] == cases
    assert [r["case"] for r in rows[len(cases):]] == [
        "l2k_counted_1022", "l2k_counted_1023", "l2k_counted_1024", "l2k_counted_1025",
        "komt_answer_past_2048", "komt_prompt_past_2048", "ag2_answer_past_256", "ag2_prompt_past_256",
        "l2k_counted_1023_special_literals", "l2k_counted_1024_special_literals"]
    assert len(set(CASES)) == len(CASES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_goldens_cover_every_edge_case(recipe):
    """The committed goldens are for this edge-case file: same rows, same case names, in order."""
    gold = read_golden(GOLDEN / f"{recipe}.edge.jsonl")
    assert [g["case"] for g in gold] == CASES
    assert [g["row"] for g in gold] == list(range(len(CASES)))
    for g in gold:  # a kept row has ids and labels of the same length; a dropped one has neither
        assert (g["input_ids"] is not None) == g["kept"] == (g["labels"] is not None)
        assert g["kept"] or g["reason"]
        if g["kept"]:
            assert len(g["input_ids"]) == len(g["labels"])


def test_edge_goldens_probe_the_length_limits():
    """The boundary rows sit where they should, so the keep/drop checks below mean something."""
    l2k = {g["case"]: g for g in read_golden(GOLDEN / "llama2-koalpaca.edge.jsonl")}
    # source keeps counted length < 1024, counted = ids + the extra BOS of tokenizer(text)
    assert [l2k[f"l2k_counted_{n}"]["kept"] for n in (1022, 1023, 1024, 1025)] == [True, True, False, False]
    assert [len(l2k[f"l2k_counted_{n}"]["input_ids"]) for n in (1022, 1023)] == [1021, 1022]
    assert [l2k[f"l2k_counted_{n}_special_literals"]["kept"] for n in (1023, 1024)] == [True, False]
    komt = {g["case"]: g for g in read_golden(GOLDEN / "komt.edge.jsonl")}
    assert len(komt["komt_answer_past_2048"]["input_ids"]) == 2048
    # the prompt alone fills 2048: komt trained on it with no loss token at all
    assert komt["komt_prompt_past_2048"]["kept"] and set(komt["komt_prompt_past_2048"]["labels"]) == {-100}
    ag2 = {g["case"]: g for g in read_golden(GOLDEN / "alpagasus2.edge.jsonl")}
    assert all(len(ag2[c]["input_ids"]) == 256 for c in ("ag2_answer_past_256", "ag2_prompt_past_256"))
    # every source kept the rows the kit's cleaning drops (empty outputs, control characters)
    for gold in (l2k, komt, ag2):
        assert all(gold[c]["kept"] for c in ("empty_output", "whitespace_only_output", "c0_controls",
                                             "nul_character", "empty_instruction"))


@needs_tokenizer
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("case", CASES)
def test_kit_matches_source_on_edge_case(recipe, case, kit_edge):
    got, tok = kit_edge(recipe)
    want = read_golden(GOLDEN / f"{recipe}.edge.jsonl")[CASES.index(case)]
    mine = got[want["row"]]
    assert mine == {k: want[k] for k in ("row", "kept", "reason", "input_ids", "labels")}, (
        f"{recipe} {case}: {first_difference(want, mine, tok)}")
