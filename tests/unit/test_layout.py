"""The house has rooms: stages on top never import each other, helpers never import a stage,
`text/` never pulls in torch, and dvc.yaml's deps cover the code each stage runs."""
from __future__ import annotations

import subprocess
import sys

import yaml

from support.imports import DATA_DEPS, PKG, STAGES, all_modules, imports_of, module_file, room, stage_code
from support.repo import REPO

SPINE = {"cli", "config", "config_checks", "layout", "artifacts", "errors"}
HELPER_ROOMS = {"text", "sources", "training", "weights", "gguf", "scoring", "judge", "tiny"}
COMMANDS = {"serve"}  # top-level verbs that use the stages' outputs; like a stage, they import no stage


def test_every_module_lives_in_a_known_room():
    rooms = {room(m) for m in all_modules()} - {"qlora_kit", "__main__"}
    known = SPINE | set(STAGES) | HELPER_ROOMS | COMMANDS
    assert rooms <= known, rooms - known


def test_a_stage_never_imports_another_stage_and_helpers_never_import_stages():
    bad = []
    for m in all_modules():
        for dep in imports_of(m):
            if room(dep) in STAGES and room(dep) != room(m):
                bad.append(f"{m} imports {dep}")
    assert not bad, "\n".join(bad)


def test_the_spine_imports_no_stage_and_no_helper_at_module_level():
    # cli.py dispatches to stages by name (importlib), so it names none of them in an import
    for name in SPINE - {"cli"}:
        deps = {room(d) for d in imports_of(f"qlora_kit.{name}")}
        assert deps <= SPINE | {"qlora_kit"}, (name, deps)


def test_text_imports_no_torch():
    mods = [m for m in all_modules() if room(m) == "text"]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "heavy = sorted(x for x in ('torch', 'transformers', 'peft', 'bitsandbytes', 'llama_cpp') if x in sys.modules)\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing text/ loaded {out.stdout.strip()}"


def test_module_files_resolve():
    for m in all_modules():
        assert module_file(m) is not None and module_file(m).is_relative_to(PKG), m


def test_dvc_code_deps_are_exactly_each_stage_import_closure():
    """Issue 13: dvc.yaml deps complete by construction. A file a stage runs that dvc.yaml misses
    would not rerun it when edited; one it lists but does not run would rerun it for nothing."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for st in STAGES:
        listed = {d for d in stages[st]["do"]["deps"] if d.startswith("src/")}
        need = stage_code(st) | set(DATA_DEPS.get(st, []))
        assert listed == need, (f"dvc.yaml stage {st}: missing {sorted(need - listed)}, not run by it "
                                f"{sorted(listed - need)}; `python tools/dvc_deps.py` rewrites the deps")


def test_product_text_never_points_outside_the_repository():
    """src/, recipes/ and README.md stand alone: no path into the folder the kit was developed beside
    (the tests reach source data through QLORA_KIT_TEST_DATA / QLORA_KIT_SHARED_DATA only)."""
    import re

    files = [*(REPO / "src").rglob("*.py"), *(REPO / "src").rglob("*.md"), *(REPO / "recipes").rglob("*"),
             REPO / "README.md"]
    bad = []
    for f in files:
        if f.is_file() and "egg-info" not in str(f):
            for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if re.search(r"\.\./shared|source-facts", line):
                    bad.append(f"{f.relative_to(REPO)}:{n}: {line.strip()[:80]}")
    assert not bad, "\n".join(bad)
