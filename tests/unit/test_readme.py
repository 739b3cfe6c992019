"""README.md stays true: it links the quirks ledger (recipes/QUIRKS.md) and every page it sends
the reader to exists, every recipe is in the recipe table, and every path in the annotated tree
exists."""
from __future__ import annotations

import re

from support.repo import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def _table_rows(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("| ") and "`quirks." in ln]


def test_quirks_ledger_is_linked_not_copied():
    ledger = _table_rows((REPO / "recipes" / "QUIRKS.md").read_text(encoding="utf-8"))
    assert ledger and "](recipes/QUIRKS.md)" in README
    assert not _table_rows(README)  # one copy of the ledger: a second one drifts


def test_every_linked_page_exists():
    links = re.findall(r"\]\(([^)#:]+)\)", README)
    assert "docs/running.md" in links and "docs/use-the-outputs.md" in links
    for rel in links:
        assert (REPO / rel).exists(), f"README links {rel}, which does not exist"


def test_every_recipe_is_in_the_recipe_table():
    for p in (REPO / "recipes").glob("*.yaml"):
        assert f"| `{p.stem}` |" in README, p.stem


def _tree_paths() -> list[str]:
    """Paths the annotated tree names: two spaces of indent per folder level."""
    tree = README.split("## Layout", 1)[1].split("```", 2)[1]
    stack: list[str] = []
    out = []
    for line in tree.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth]
        path = "".join(stack) + m.group(2)
        out.append(path)
        if m.group(2).endswith("/"):
            stack.append(m.group(2))
    return out


def test_annotated_tree_paths_exist():
    for path in _tree_paths():
        assert (REPO / path).exists(), f"README tree names {path}, which does not exist"


def test_annotated_tree_lists_every_module():
    listed = set(_tree_paths())
    for p in sorted((REPO / "src" / "qlora_kit").rglob("*.py")):
        rel = p.relative_to(REPO).as_posix()
        if p.name in ("__init__.py", "__main__.py"):
            rel = rel.rsplit("/", 1)[0] + "/"  # a package is listed as its folder
        assert rel in listed, f"{rel} is missing from README.md's annotated tree"


def test_setup_commands_are_documented():
    assert "make reproduce" in README and "make test" in README
