"""Rewrite dvc.yaml's code deps from the import graph: each stage depends on exactly the qlora_kit
files `qlora-kit STAGE` imports (the import closure of cli.py and of the stage module).

    python tools/dvc_deps.py          (after adding, removing or re-wiring a module)

tests/unit/test_layout.py derives the same closure and fails when dvc.yaml differs from it.
Only the `- src/...` lines under each stage's `deps:` are replaced; comments and the rest stay.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

from support.imports import DATA_DEPS, STAGES, stage_code  # noqa: E402


def rewrite(text: str) -> str:
    for st in STAGES:
        pat = re.compile(rf"(  {st}:\n    foreach: [^\n]*\n    do:\n      cmd: [^\n]*\n      deps:\n)"
                         r"((?:      - src/[^\n]*\n)+)")
        m = pat.search(text)
        if m is None:
            raise SystemExit(f"dvc.yaml: stage {st} has no `deps:` block of src/ lines to rewrite")
        files = sorted(stage_code(st)) + DATA_DEPS.get(st, [])
        text = text[:m.start(2)] + "".join(f"      - {f}\n" for f in files) + text[m.end(2):]
    return text


if __name__ == "__main__":
    path = ROOT / "dvc.yaml"
    old = path.read_text(encoding="utf-8")
    new = rewrite(old)
    path.write_text(new, encoding="utf-8")
    print("dvc.yaml: code deps " + ("rewritten" if new != old else "already match the import closure"))
