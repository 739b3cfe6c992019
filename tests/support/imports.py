"""Static import graph of the qlora_kit package: which modules each module imports (lazy imports
inside functions included), and the closure a stage runs."""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from support.repo import REPO

PKG = REPO / "src" / "qlora_kit"
STAGES = ("fetch", "preprocess", "train", "merge", "quantize", "evaluate")


def module_file(module: str) -> Path | None:
    """src/qlora_kit/a/b.py or src/qlora_kit/a/b/__init__.py for `qlora_kit.a.b`, else None."""
    base = PKG.parent.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def all_modules() -> list[str]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


@cache
def imports_of(module: str) -> frozenset[str]:
    """qlora_kit modules `module` imports anywhere in its body (`from X import name` counts X, and
    X.name when that is a module)."""
    tree = ast.parse(module_file(module).read_text(encoding="utf-8"))
    pkg = module if module_file(module).name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("qlora_kit"):
                continue
            out.add(base)
            out.update(f"{base}.{a.name}" for a in n.names if module_file(f"{base}.{a.name}"))
        elif isinstance(n, ast.Import):
            out.update(a.name for a in n.names if a.name.startswith("qlora_kit"))
    return frozenset(m for m in out if module_file(m))


def closure(module: str) -> set[str]:
    """Every qlora_kit module that running `module` can execute (its imports, transitively, and
    the packages whose __init__ runs on the way)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += list(imports_of(m))
    return seen


def room(module: str) -> str:
    """The top-level part of qlora_kit a module lives in: a stage, a spine module, or a helper folder."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "qlora_kit"


def stage_code(stage: str) -> set[str]:
    """The files `qlora-kit STAGE` runs, relative to the checkout: the import closure of the
    command (cli) and of the stage module."""
    mods = closure("qlora_kit.cli") | closure(f"qlora_kit.{stage}")
    return {module_file(m).relative_to(REPO).as_posix() for m in mods}


DATA_DEPS = {"fetch": ["src/qlora_kit/tiny/assets"]}  # files a stage reads that are not Python
