"""Where each recipe's outputs live (design.md "Outputs"); the one place that spells the paths.

Paths are relative to the checkout (the folder holding dvc.yaml, else the package's repo);
dvc.yaml spells the same layout, and tests/test_dvc_pipeline.py checks the two agree.
`QLORA_KIT_ROOT` points the kit at another checkout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def root() -> Path:
    return Path(os.environ.get("QLORA_KIT_ROOT", Path.cwd() if (Path.cwd() / "dvc.yaml").exists() else REPO_ROOT))


@dataclass(frozen=True)
class Paths:
    raw: Path
    processed: Path
    base: Path
    adapter: Path
    checkpoints: Path
    merged: Path
    gguf: Path
    reports: Path


def paths(name: str) -> Paths:
    r = root()
    return Paths(
        raw=r / "data" / name / "raw",
        processed=r / "data" / name / "processed",
        base=r / "models" / name / "base",
        adapter=r / "models" / name / "adapter",
        checkpoints=r / "models" / name / "checkpoints",
        merged=r / "models" / name / "merged",
        gguf=r / "models" / name / "gguf",
        reports=r / "reports" / name,
    )
