"""One small run of the tiny recipe, shared by the evaluate / judge-server / lm-eval tests.

`pipeline_root(tmp_path_factory)` copies the checkout into a temporary git repository
(conftest.copy_repo, so `dvc metrics` works there) and runs fetch -> preprocess -> train -> merge ->
quantize in-process with `FAST` (64 sample rows, 3 steps, f16 GGUF only): about a minute on 2
CPU cores. The run happens once per test session (memoised here, because a session fixture
defined in a helper module would be re-created for every test module that imports it).
`clone_outputs` copies those outputs into another kit root for a test that must not disturb them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from support.repo import copy_repo

# A few steps on 64 rows: enough to exercise every code path, nothing to learn from.
FAST: dict[str, Any] = {
    "data.limit": 64, "train.max_steps": 3, "train.eval_steps": 0, "train.save_steps": 0,
    "train.logging_steps": 1, "eval.num_prompts": 2, "eval.max_new_tokens": 8,
    "quantize.types": ["f16"], "quantize.parity_rows": 2,
}

_ROOT: list[Path] = []


def run_stages(root: Path, stages: tuple[str, ...], overrides: dict[str, Any], recipe_name: str = "tiny") -> None:
    """Run a recipe's stages in-process with QLORA_KIT_ROOT pointing at `root` (restored afterwards)."""
    import importlib

    from qlora_kit.config import load_recipe

    old = os.environ.get("QLORA_KIT_ROOT")
    os.environ["QLORA_KIT_ROOT"] = str(root)
    try:
        recipe = load_recipe(recipe_name, overrides)
        for stage in stages:
            importlib.import_module(f"qlora_kit.{stage}").run(recipe, overrides)
    finally:
        if old is None:
            os.environ.pop("QLORA_KIT_ROOT", None)
        else:
            os.environ["QLORA_KIT_ROOT"] = old


def fetched_tiny_root(dest: Path) -> Path:
    """A bare kit root (recipes only) in which the tiny recipe has been fetched by `fetch.run`."""
    from support.repo import kit_root

    root = kit_root(dest)
    run_stages(root, ("fetch",), {})
    return root


def pipeline_root(tmp_path_factory) -> Path:
    if not _ROOT:
        root = copy_repo(tmp_path_factory.mktemp("tiny-pipeline"))
        run_stages(root, ("fetch", "preprocess", "train", "merge", "quantize"), FAST)
        _ROOT.append(root)
    return _ROOT[0]


def clone_outputs(src: Path, dst: Path) -> Path:
    """A kit root holding the recipes and the tiny recipe's stage outputs (not evaluate's)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "recipes", dst / "recipes")
    for part in ("data/tiny", "models/tiny"):
        shutil.copytree(src / part, dst / part)
    (dst / "reports/tiny").mkdir(parents=True)
    for f in (src / "reports/tiny").iterdir():
        if f.is_file() and f.name not in ("metrics.json", "details.json", "report.md", "judge_cache.jsonl"):
            shutil.copy2(f, dst / "reports/tiny" / f.name)
    return dst
