"""Hostile and mistaken recipes (issue 14, and issue 16's config messages): every one is refused at
load with exit 2 and one line naming file, line and key, and nothing is written anywhere.

Cases run through `qlora_kit.cli.main` in process (the recipe is refused before any stage module
is imported) against a throwaway kit root; the shell-injection case runs `dvc repro` for real.
"""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from qlora_kit import cli
from qlora_kit.config import RecipeError, load_recipe
from support.repo import BIN, REPO, copy_repo, kit_env, kit_root

TINY = (REPO / "recipes" / "tiny.yaml").read_text(encoding="utf-8")


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    r = kit_root(tmp_path / "kit")
    (r / "params.yaml").write_text("recipes:\n- tiny\n", encoding="utf-8")
    monkeypatch.setenv("QLORA_KIT_ROOT", str(r))
    monkeypatch.chdir(r)
    return r


def tree(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


def refused(capsys, top: Path, *argv: str) -> str:
    """Run the CLI; assert exit 2, one stderr line, nothing written under `top`; return the line."""
    before = tree(top)
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert tree(top) == before
    return err


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# --- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "t$(touch PWNED)", "a b", "x;rm", "-flag", ".."])
def test_a_recipe_name_that_could_escape_or_reach_a_shell_is_refused(root, tmp_path, capsys, name):
    p = root / "recipes" / "evil.yaml"
    p.write_text(f"name: '{name}'\n" + TINY, encoding="utf-8")
    err = refused(capsys, tmp_path, "fetch", "--recipe", "evil")
    assert f"{p}:{line_of(p.read_text(), 'name:')}: name: recipe name" in err and "not allowed" in err
    assert not (tmp_path / "x").exists() and not (root.parent / "x").exists()


def test_enable_refuses_a_file_name_with_shell_characters_and_dvc_quotes_the_name(root, tmp_path, capsys):
    evil = root / "recipes" / "t$(touch PWNED).yaml"
    evil.write_text(TINY, encoding="utf-8")
    err = refused(capsys, tmp_path, "enable", str(evil))
    assert "not allowed" in err and "PWNED" in err
    assert yaml.safe_load((root / "params.yaml").read_text())["recipes"] == ["tiny"]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert all(s["do"]["cmd"].endswith("--recipe '${item}'") for s in stages.values())


def test_enable_adds_a_good_recipe_and_refuses_one_outside_recipes(root, tmp_path, capsys):
    (root / "recipes" / "mine.yaml").write_text(TINY, encoding="utf-8")
    assert cli.main(["enable", "mine"]) == 0
    assert yaml.safe_load((root / "params.yaml").read_text())["recipes"] == ["tiny", "mine"]
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text(TINY, encoding="utf-8")
    assert "only recipes in" in refused(capsys, tmp_path / "kit" / "recipes", "enable", str(outside))


def test_enable_is_undone_when_its_command_fails(root, capsys):
    """Issue 13: `make reproduce RECIPE=komt` failing offline must not leave komt in params.yaml."""
    import sys

    before = (root / "params.yaml").read_text()
    fail = [sys.executable, "-c", "raise SystemExit(3)"]
    assert cli.main(["enable", "komt", "--", *fail]) == 3
    assert (root / "params.yaml").read_text() == before
    assert "removed komt from params.yaml again" in capsys.readouterr().err
    assert cli.main(["enable", "komt", "--", sys.executable, "-c", "pass"]) == 0
    assert yaml.safe_load((root / "params.yaml").read_text())["recipes"] == ["tiny", "komt"]
    assert cli.main(["enable", "komt", "--", *fail]) == 3  # already enabled before: stays enabled
    assert yaml.safe_load((root / "params.yaml").read_text())["recipes"] == ["tiny", "komt"]


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_a_bad_thread_count_is_one_line_and_exit_2(root, capsys, monkeypatch, value):
    monkeypatch.setenv("QLORA_KIT_THREADS", value)
    err = refused(capsys, root, "merge", "--recipe", "tiny")
    assert "QLORA_KIT_THREADS" in err and "whole number" in err


def test_a_hand_edited_params_list_cannot_run_a_shell_command_through_dvc(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    (repo / "recipes" / "t$(touch PWNED).yaml").write_text(TINY, encoding="utf-8")
    (repo / "params.yaml").write_text("recipes:\n- t$(touch PWNED)\n", encoding="utf-8")
    out = subprocess.run([str(BIN / "dvc"), "repro", "--no-commit", "fetch"], cwd=repo, env=kit_env(repo),
                         capture_output=True, text=True, timeout=600)
    assert not (repo / "PWNED").exists() and not list(repo.rglob("PWNED"))
    assert out.returncode != 0 and "not allowed" in out.stderr + out.stdout


# --- YAML ----------------------------------------------------------------------------------

def test_an_alias_bomb_is_refused_at_once_with_its_line(root, tmp_path, capsys):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9^10 copies
    p = root / "recipes" / "bomb.yaml"
    p.write_text(TINY + "\n".join(lines) + "\n", encoding="utf-8")
    t0 = time.monotonic()
    err = refused(capsys, tmp_path, "preprocess", "--recipe", "bomb")
    assert time.monotonic() - t0 < 5  # refused while parsing, never expanded (a correctness bound, not a speed target)
    assert f"{p}:{line_of(p.read_text(), 'a0: &a0')}: YAML anchor 'a0' is not accepted" in err


def test_a_merge_key_alias_is_refused_too(root, tmp_path, capsys):
    p = root / "recipes" / "merge.yaml"
    p.write_text(TINY.replace("\ntrain:", "\nbase: &b {epochs: 1}\ntrain:\n  <<: *b"), encoding="utf-8")
    assert "is not accepted" in refused(capsys, tmp_path, "train", "--recipe", "merge")


def test_a_duplicate_section_is_refused_with_both_lines(root, tmp_path, capsys):
    p = root / "recipes" / "dup.yaml"
    text = TINY + "train:\n  epochs: 1\n"
    p.write_text(text, encoding="utf-8")
    first = line_of(text, "train:")
    second = len(text.splitlines()) - 1
    err = refused(capsys, tmp_path, "train", "--recipe", "dup")
    assert f"{p}:{second}: train: duplicate key (first at line {first})" in err


def test_a_duplicate_key_inside_a_section_is_refused(root, tmp_path, capsys):
    p = root / "recipes" / "dup2.yaml"
    text = TINY.replace("\ntrain:\n", "\ntrain:\n  learning_rate: 0.5\n")
    p.write_text(text, encoding="utf-8")
    err = refused(capsys, tmp_path, "train", "--recipe", "dup2")
    first = line_of(text, "0.5")
    assert re.search(rf"dup2.yaml:\d+: train.learning_rate: duplicate key \(first at line {first}\)", err)


# --- values --------------------------------------------------------------------------------

BAD_VALUES = [
    ("data.limit", "-1"), ("data.skip_rows", "-5"), ("preprocess.max_length", "-3"), ("train.epochs", "-1"),
    ("lora.r", "0"), ("preprocess.val_ratio", "2"), ("preprocess.val_ratio", "-0.5"), ("preprocess.val_ratio", "1"),
    ("lora.dropout", "1.5"), ("lora.alpha", "-16"), ("eval.max_new_tokens", "-1"), ("train.learning_rate", "0"),
    ("train.learning_rate", "-1e-3"), ("train.warmup_ratio", "1.5"), ("eval.top_p", "0"), ("merge.parity_rows", "0"),
    ("train.per_device_batch", "0"), ("model.tiny.hidden_size", "0"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_an_impossible_value_on_the_command_line_is_refused_naming_the_key(root, tmp_path, capsys, key, value):
    err = refused(capsys, tmp_path, "train", "--recipe", "tiny", "--set", f"{key}={value}")
    assert re.search(rf"tiny.yaml: \(--set\) {re.escape(key)}: Input should be .* \(got '?{re.escape(value)}", err), err


@pytest.mark.parametrize(("line", "key"), [("  epochs: 6", "train.epochs"), ("  r: 16", "lora.r"),
                                         ("  val_ratio: 0.1", "preprocess.val_ratio")])
def test_an_impossible_value_in_the_file_names_its_line(root, tmp_path, capsys, line, key):
    text = TINY.replace(line + "\n", line.split(":")[0] + ": -2  # bad\n")
    p = root / "recipes" / "bad.yaml"
    p.write_text(text, encoding="utf-8")
    err = refused(capsys, tmp_path, "preprocess", "--recipe", "bad")
    assert f"{p}:{line_of(text, '# bad')}: {key}: Input should be" in err


def test_several_problems_still_give_one_line():
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny", cli.parse_overrides(["lora.r=0", "train.epochs=-1", "eval.top_k=-1"]))
    assert len(str(e.value).splitlines()) == 1 and "(and 2 more problem(s))" in str(e.value)


# --- --set and quirks (issue 16) -----------------------------------------------------------

def test_set_with_spaces_around_the_equals_sign_is_accepted():
    assert load_recipe("tiny", cli.parse_overrides(["train.learning_rate = 1e-3"])).train.learning_rate == 1e-3


def test_set_without_a_section_names_the_sections_that_have_the_key(root, tmp_path, capsys):
    err = refused(capsys, tmp_path, "train", "--recipe", "tiny", "--set", "learning_rate=1e-3")
    assert "the key must be dotted" in err and "did you mean train.learning_rate?" in err


def test_set_of_a_misspelt_quirk_names_the_known_quirks(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_KIT_ROOT", str(REPO))
    err = refused(capsys, tmp_path, "train", "--recipe", "komt", "--set", "quirks.max_step_overrides_epochs.fix=true")
    assert "unknown quirk 'max_step_overrides_epochs'" in err and "max_steps_overrides_epochs" in err
    assert "Field required" not in err


# --- security-sensitive settings -----------------------------------------------------------

def with_quirk(root: Path, when_fixed: str) -> Path:
    p = root / "recipes" / "q.yaml"
    p.write_text(TINY.split("\nquirks:")[0] + "\nquirks:\n  sneaky:\n    description: d\n    cite: c\n"
                 f"    fix: true\n    when_fixed: {when_fixed}\n", encoding="utf-8")
    return p


@pytest.mark.parametrize("setting", ["model.trust_remote_code: true", "model.allow_pickle: true",
                                     "model.name: evil/model", "eval.judge_base_url: 'http://evil.example'",
                                     "eval.benchmark_tasks_dir: tasks"])
def test_a_quirk_cannot_switch_on_foreign_code_or_hosts(root, tmp_path, capsys, setting):
    p = with_quirk(root, "{" + setting + "}")
    err = refused(capsys, tmp_path, "preprocess", "--recipe", "q")
    assert f"{p}:" in err and "quirks.sneaky.when_fixed" in err and setting.split(":")[0] in err


def test_a_quirk_cannot_point_a_url_at_a_new_host(root, tmp_path, capsys):
    with_quirk(root, "{data.url: 'https://evil.example/x.json'}")
    err = refused(capsys, tmp_path, "fetch", "--recipe", "q")
    assert "host evil.example is not used by the recipe's own sections" in err


def test_a_quirk_may_repin_a_url_on_the_recipes_own_host():
    # alpagasus2's dataset quirk switches to the other repository's file on the same host
    quirk = load_recipe("alpagasus2").quirks["dataset_is_not_gpt4lifes"]
    r = load_recipe("alpagasus2", cli.parse_overrides(["quirks.dataset_is_not_gpt4lifes.fix=true"]))
    assert r.data.url == quirk.when_fixed["data.url"] != load_recipe("alpagasus2").data.url


def test_the_command_line_wins_over_a_quirk(root):
    with_quirk(root, "{eval.max_new_tokens: 7}")
    assert load_recipe("q").eval.max_new_tokens == 7
    assert load_recipe("q", cli.parse_overrides(["eval.max_new_tokens=9"])).eval.max_new_tokens == 9


def test_turning_on_foreign_code_warns_naming_what_will_run(capsys):
    load_recipe("tiny", cli.parse_overrides(["model.trust_remote_code=true"]))
    err = capsys.readouterr().err
    assert "warning" in err and "model.trust_remote_code is on" in err and "Python files" in err
    load_recipe("tiny")
    assert capsys.readouterr().err == ""


def test_a_model_folder_whose_code_will_run_is_named_in_a_warning(tmp_path, capsys):
    import json

    from qlora_kit.sources import model_safety

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.X"}}))
    (folder / "modeling_x.py").write_text("print('hello')\n")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    model = load_recipe("tiny", cli.parse_overrides(["model.trust_remote_code=true", "model.allow_pickle=true"])).model
    capsys.readouterr()
    model_safety.check(folder, model)
    err = capsys.readouterr().err
    assert f"{folder}: will run modeling_x.py (trust_remote_code) and unpickling pytorch_model.bin " \
           "(allow_pickle)" in err
