"""docs/guarantees.md stays true: every test it cites exists under the name it gives."""
from __future__ import annotations

import ast
import re

from support.repo import REPO


def test_every_cited_test_exists():
    text = (REPO / "docs" / "guarantees.md").read_text(encoding="utf-8")
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(cited) > 10
    for path, name in cited:
        tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert name in names, f"docs/guarantees.md cites {path}::{name}, which does not exist"
