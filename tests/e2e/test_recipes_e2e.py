"""Every source recipe runs all six stages on the tiny model of its architecture (issue 3, done
means 1): the recipe's own template, special tokens, masking and length policy; the overrides in
tests/recipe_overrides.py swap only the model, the data size and the step counts."""
from __future__ import annotations

import json

import pytest

from support.repo import kit_root
from qlora_kit import evaluate, fetch, layout, merge, preprocess, quantize, train
from qlora_kit.config import load_recipe
from support.overrides import TINY_OVERRIDES


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY_OVERRIDES))
def test_recipe_runs_end_to_end_on_tiny(name, tmp_path, monkeypatch):
    root = kit_root(tmp_path / "root")
    monkeypatch.setenv("QLORA_KIT_ROOT", str(root))
    over = dict(TINY_OVERRIDES[name])
    over["eval.num_prompts"] = 3  # a step count, like max_steps: how many held-out prompts to generate
    r = load_recipe(name, over)
    real = load_recipe(name)
    assert r.template == real.template and r.preprocess.loss == real.preprocess.loss
    for stage in (fetch, preprocess, train, merge, quantize, evaluate):
        stage.run(r)
    p = layout.paths(name)
    m = json.loads((p.reports / "details.json").read_text())
    assert set(m["gguf"]) == set(r.quantize.types)
    man = json.loads((p.adapter / "manifest.json").read_text())
    assert man["config"]["lora"] == json.loads(real.lora.model_dump_json())  # the source's LoRA, unchanged
    assert man["facts"]["final"]["global_step"] == r.train.max_steps
