"""dvc.yaml agrees with the code, and the tiny recipe runs through all six stages under DVC.

Issue 2, done means 1, 2 and 4: `dvc repro evaluate@tiny` in a temporary copy of the repo writes
the report; afterwards `dvc status` has nothing to do; changing `train.learning_rate` reruns
exactly train, merge, quantize and evaluate of `tiny`.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from support.repo import REPO, copy_repo, kit_env
from qlora_kit import layout
from qlora_kit.config import STAGE_SECTIONS

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_stage_params_are_exactly_the_sections_the_code_reads():
    assert list(DVC["stages"]) == list(STAGE_SECTIONS)
    for stage, spec in DVC["stages"].items():
        (params,) = spec["do"]["params"]
        assert params == {"recipes/${item}.yaml": list(STAGE_SECTIONS[stage])}, stage
        assert spec["do"]["cmd"] == f"qlora-kit {stage} --recipe '${{item}}'"


def test_outputs_follow_the_layout():
    p = layout.paths("${item}")
    rel = {k: str(Path(v).relative_to(layout.root())) for k, v in vars(p).items()}
    outs = {s: [next(iter(o)) if isinstance(o, dict) else o for o in spec["do"]["outs"]]
            for s, spec in DVC["stages"].items()}
    assert outs["fetch"] == [rel["raw"], rel["base"]]
    assert outs["preprocess"] == [rel["processed"]]
    assert outs["train"] == [rel["adapter"], rel["checkpoints"]]
    assert outs["merge"] == [rel["merged"]]
    assert outs["quantize"] == [rel["gguf"]]
    assert f"{rel['reports']}/report.md" in outs["evaluate"]


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(["dvc", *args], cwd=root, env=kit_env(root), capture_output=True, text=True)
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    root = copy_repo(tmp_path_factory.mktemp("repo"))
    res = _dvc(root, "repro", "evaluate@tiny")
    assert _ran(res.stdout) == [f"{s}@tiny" for s in STAGE_SECTIONS]
    return root


@pytest.mark.slow
def test_report_shows_learning_and_eos_rates(tiny_repo):
    m = json.loads((tiny_repo / "reports/tiny/metrics.json").read_text())
    assert m["val_loss_after"] < 0.75 * m["val_loss_before"], m
    assert m["hf"]["eos_rate"] > 0.5, m["hf"]  # the trained model learned to stop (untrained: ~0)
    assert set(m["gguf"]) == {"f16", "q8_0", "q4_k_m"}
    for q in m["gguf"].values():
        assert "eos_rate" in q and q["val_loss"] < m["val_loss_before"]
    report = (tiny_repo / "reports/tiny/report.md").read_text()
    assert "EOS before max_new_tokens" in report and "data:image/png;base64," in report


@pytest.mark.slow
def test_status_clean_then_lr_change_reruns_exactly_the_train_chain(tiny_repo):
    status = _dvc(tiny_repo, "status")
    assert "up to date" in status.stdout, status.stdout
    recipe = tiny_repo / "recipes/tiny.yaml"
    text = recipe.read_text()
    new = re.sub(r"(?m)^  learning_rate: .*$", "  learning_rate: 2.0e-3", text, count=1)
    assert new != text
    recipe.write_text(new)
    res = _dvc(tiny_repo, "repro")
    assert _ran(res.stdout) == ["train@tiny", "merge@tiny", "quantize@tiny", "evaluate@tiny"]
    assert "up to date" in _dvc(tiny_repo, "status").stdout


def test_every_recipe_has_every_section_dvc_tracks():
    """DVC refuses to run a stage whose params name a section missing from the recipe file."""
    tracked = {s for secs in STAGE_SECTIONS.values() for s in secs}
    for p in sorted((REPO / "recipes").glob("*.yaml")):
        missing = tracked - set(yaml.safe_load(p.read_text()))
        assert not missing, f"{p.name} lacks {sorted(missing)}"
