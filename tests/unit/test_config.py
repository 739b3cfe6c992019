"""The strict recipe loader: unknown keys, wrong types and impossible combinations fail with
exit code 2, a message naming file, line and key, and nothing written (issue 2, done means 5)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from support.repo import REPO, copy_repo, kit_env
from qlora_kit.config import STAGE_SECTIONS, RecipeError, load_recipe, parse_overrides


def _recipe(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text, encoding="utf-8")
    return p


TINY = (REPO / "recipes" / "tiny.yaml").read_text(encoding="utf-8")


def test_every_recipe_loads():
    for p in sorted((REPO / "recipes").glob("*.yaml")):
        r = load_recipe(str(p))
        assert r.name == p.stem


def test_unknown_key_names_file_line_and_key(tmp_path):
    text = TINY.replace("  learning_rate:", "  learning_rat: 1e-3\n  learning_rate:")
    p = _recipe(tmp_path, text)
    line = text.splitlines().index("  learning_rat: 1e-3") + 1
    with pytest.raises(RecipeError) as e:
        load_recipe(str(p))
    assert f"{p}:{line}: train.learning_rat: unknown key" in str(e.value)


def test_wrong_type(tmp_path):
    p = _recipe(tmp_path, TINY.replace("  per_device_batch: 16", "  per_device_batch: sixteen"))
    with pytest.raises(RecipeError) as e:
        load_recipe(str(p))
    assert "train.per_device_batch" in str(e.value) and str(p) in str(e.value)


def test_impossible_combination(tmp_path):
    p = _recipe(tmp_path, TINY.replace("  bits: 4", "  bits: 16"))  # double_quant stays true
    with pytest.raises(RecipeError, match="double_quant: true needs bits: 4"):
        load_recipe(str(p))


def test_set_overrides_and_their_errors():
    r = load_recipe("tiny", parse_overrides(["train.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]"]))
    assert r.train.learning_rate == 1e-4 and r.lora.target_modules == ("q_proj", "v_proj")
    with pytest.raises(RecipeError, match=r"\(--set\) train.nope: unknown key"):
        load_recipe("tiny", parse_overrides(["train.nope=1"]))
    with pytest.raises(RecipeError, match="key must be dotted"):
        parse_overrides(["learning_rate=1"])


def test_quirk_switch_applies_corrected_values(tmp_path):
    text = TINY.split("\nquirks:")[0] + ("\nquirks:\n  short_answers:\n    description: test\n    cite: here\n    fix: true\n"
                   "    when_fixed: {eval.max_new_tokens: 7}\n")
    assert load_recipe(str(_recipe(tmp_path, text))).eval.max_new_tokens == 7
    bad = text.replace("eval.max_new_tokens", "eval.max_new_tokenz")
    with pytest.raises(RecipeError, match="eval.max_new_tokenz: unknown key"):
        load_recipe(str(_recipe(tmp_path, bad)))


def test_a_stage_records_the_values_it_reads_and_only_those():
    base = load_recipe("tiny")
    changed = load_recipe("tiny", parse_overrides(["train.learning_rate=0.5", "eval.max_new_tokens=7"]))
    assert changed.sections_for("train")["train"]["learning_rate"] == 0.5
    assert base.sections_for("train")["train"]["learning_rate"] == base.train.learning_rate != 0.5
    # evaluate reads eval but not train: its recorded config moves with eval only
    assert changed.sections_for("evaluate")["eval"]["max_new_tokens"] == 7
    assert "train" not in changed.sections_for("evaluate")
    assert "eval" not in changed.sections_for("train")
    assert changed.sections_for("preprocess") == base.sections_for("preprocess")


@pytest.mark.parametrize("stage", list(STAGE_SECTIONS))
def test_cli_exit_2_and_nothing_written(tmp_path, stage):
    root = copy_repo(tmp_path / "repo")
    (root / "recipes" / "broken.yaml").write_text(TINY.replace("  r: 16", "  r: 16\n  rank: 8"))
    before = sorted(p.relative_to(root) for p in root.rglob("*") if ".git" not in p.parts)
    res = subprocess.run(["qlora-kit", stage, "--recipe", "broken"], cwd=root, env=kit_env(root),
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert "broken.yaml" in res.stderr and "lora.rank: unknown key" in res.stderr
    after = sorted(p.relative_to(root) for p in root.rglob("*") if ".git" not in p.parts)
    assert before == after


def test_old_quant_section_names_the_rename(tmp_path):
    text = (REPO / "recipes" / "tiny.yaml").read_text(encoding="utf-8").replace("\nqlora:", "\nquant:")
    path = tmp_path / "old.yaml"
    path.write_text(text, encoding="utf-8")
    line = text.splitlines().index("quant:") + 1
    with pytest.raises(RecipeError, match=rf"old.yaml:{line}: quant: this section is now called qlora:"):
        load_recipe(str(path))


def test_generation_batch_size_default_and_range():
    assert load_recipe("tiny").eval.generation_batch_size == 8
    assert load_recipe("tiny", parse_overrides(["eval.generation_batch_size=1"])).eval.generation_batch_size == 1
    for bad in ("0", "-2", "257", "eight"):
        with pytest.raises(RecipeError, match="eval.generation_batch_size"):
            load_recipe("tiny", parse_overrides([f"eval.generation_batch_size={bad}"]))
