"""sources/preflight.py: a recipe that this machine cannot run stops before its base model moves, with
what to do: no CUDA for a large base (unless train.device: cpu), too little disk for every
stage's outputs. The Hub path is tested in test_download.py (fake Hub on 127.0.0.1)."""
from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from qlora_kit.sources import preflight
from qlora_kit.config import load_recipe, parse_overrides
from qlora_kit.sources.preflight import PreflightError, check, disk_need, require
from support.repo import REPO

GiB = 1 << 30
Usage = namedtuple("Usage", "total used free")


def _recipe(*sets: str):
    return load_recipe("tiny", parse_overrides(list(sets)))


@pytest.fixture
def free(monkeypatch):
    """Set the free space preflight sees (bytes)."""
    box = {"free": 10**15}
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(0, 0, box["free"]))
    return box


def test_small_model_on_a_cpu_passes(tmp_path, free):
    assert check(_recipe(), 50 << 20, tmp_path, cuda=False) == []


def test_large_model_without_cuda_stops_unless_the_recipe_opts_in(tmp_path, free):
    [p] = check(_recipe(), 13 * GiB, tmp_path, cuda=False)
    assert p.startswith("device: no CUDA device is visible and its base model is 13.0 GiB")
    assert "--set train.device=cpu" in p and "docker/README.md" in p
    assert check(_recipe(), 13 * GiB, tmp_path, cuda=True) == []
    assert check(_recipe("train.device=cpu"), 13 * GiB, tmp_path, cuda=False) == []  # the explicit opt-in
    [p] = check(_recipe("train.device=cuda"), 1 << 20, tmp_path, cuda=False)  # asked for CUDA: any size
    assert "train.device is cuda" in p


def test_disk_need_counts_every_stage_output():
    r = _recipe("quantize.types=[f16,q8_0,q4_k_m]")
    b = 10 * GiB
    # download + merged + f16 + q8_0 + q4_k_m + margin
    want = b + b + b + b * 8.5 / 16 + b * 4.9 / 16 + GiB
    assert disk_need(r, b, base_present=False) == int(want)
    assert disk_need(r, b, base_present=True) == int(want - b)


def test_too_little_disk_names_the_folder_sizes_and_the_fix(tmp_path, free):
    r = _recipe("quantize.types=[f16,q4_k_m]")
    free["free"] = 20 * GiB
    [p] = check(r, 13 * GiB, tmp_path / "not" / "yet", cuda=True)  # a folder not created yet: its parent's disk
    assert p.startswith(f"disk: {tmp_path} has 20.0 GiB free; the recipe needs about 44.0 GiB")
    assert "GGUFs f16, q4_k_m" in p and "QLORA_KIT_ROOT" in p
    assert check(r, 13 * GiB, tmp_path, base_present=True, cuda=True)  # 31 GiB: still too much
    free["free"] = 32 * GiB
    assert check(r, 13 * GiB, tmp_path, base_present=True, cuda=True) == []


def test_require_reports_every_problem_in_one_line(tmp_path, free):
    free["free"] = GiB
    with pytest.raises(PreflightError) as e:
        require(_recipe(), 13 * GiB, tmp_path, cuda=False)
    msg = str(e.value)
    assert msg.startswith("preflight for recipe tiny: device: ") and " | disk: " in msg and "\n" not in msg


def test_fetch_of_a_large_local_base_stops_before_copying(tmp_path, monkeypatch, tiny_llama):
    from qlora_kit import fetch, layout

    src = tmp_path / "base"
    shutil.copytree(tiny_llama, src)
    with open(src / "extra-weights.safetensors.part", "wb") as f:  # 2 GiB, sparse: no real disk
        f.truncate(2 * GiB)
    root = tmp_path / "kit"
    shutil.copytree(REPO / "recipes", root / "recipes")
    monkeypatch.setenv("QLORA_KIT_ROOT", str(root))
    recipe = _recipe("model.source=local", f"model.name={src}")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    with pytest.raises(PreflightError, match="device: no CUDA device is visible and its base model is 2.0 GiB"):
        fetch.run(recipe)
    assert not layout.paths("tiny").base.exists() and not layout.paths("tiny").raw.exists()
