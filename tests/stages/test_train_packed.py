"""Train stage with `train.packing: true`: the attention kernel used lands in the manifest."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_train_stage_records_the_kernel(tmp_path, monkeypatch):
    """The tiny recipe (4-bit Llama + LoRA) trained packed: auto picks per_example on the CPU and
    the manifest says so next to the passed packed-vs-separate check."""
    from support.pipeline import fetched_tiny_root, run_stages

    from qlora_kit import layout

    root = fetched_tiny_root(tmp_path / "root")
    over = {"data.limit": 48, "train.max_steps": 2, "train.save_steps": 0, "train.eval_steps": 0,
            "train.logging_steps": 1, "train.warmup_steps": 0, "train.packing": True}
    run_stages(root, ("preprocess", "train"), over)
    monkeypatch.setenv("QLORA_KIT_ROOT", str(root))
    man = json.loads((layout.paths("tiny").adapter / "manifest.json").read_text())
    derived = man["facts"]["derived"]
    assert derived["packed_attention"] == "per_example"
    assert derived["padding_free_check_rel_diff"] < 0.05
    assert man["config"]["train"]["packed_attention"] == "auto"
    assert man["facts"]["final"]["global_step"] == 2
