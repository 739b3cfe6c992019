"""README.md stays true: the quirks table matches recipes/QUIRKS.md, every recipe is in the
recipe table, and every path in the annotated tree exists."""
from __future__ import annotations

import re

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def _table_rows(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("| ") and "`quirks." in ln]


def test_quirks_table_is_the_ledger():
    ledger = _table_rows((REPO / "recipes" / "QUIRKS.md").read_text(encoding="utf-8"))
    assert ledger and _table_rows(README) == ledger


def test_every_recipe_is_in_the_recipe_table():
    for p in (REPO / "recipes").glob("*.yaml"):
        assert f"| `{p.stem}` |" in README, p.stem


def test_annotated_tree_paths_exist():
    tree = README.split("## Layout", 1)[1].split("```", 2)[1]
    parent = ""
    for line in tree.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m:
            continue
        name = m.group(2)
        if m.group(1) == "" and name.endswith("/"):
            parent = name if name == "src/qlora_kit/" else ""
            path = REPO / name
        elif m.group(1) and parent:
            path = REPO / parent / name
        else:
            path = REPO / name
        assert path.exists(), f"README tree names {path.relative_to(REPO)}, which does not exist"


def test_setup_commands_are_documented():
    assert "make reproduce" in README and "make test" in README
