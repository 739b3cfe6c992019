"""Stage roots with a base, a random (non-zero) LoRA adapter and processed rows, for merge and quantize tests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
import pytest
from support.repo import kit_root
from qlora_kit.config import load_recipe


SAMPLE_ROWS = 120  # of the shipped sample: enough for 12 validation rows, quick to tokenize


NEOX = {"model.arch": "gpt_neox", "model.name": "tiny-neox", "template.add_bos": False}


def write_processed(root: Path, recipe, base: Path) -> None:
    """data/NAME/processed as the preprocess stage writes it, from the first SAMPLE_ROWS sample rows."""
    from qlora_kit.fetch import sample_path
    from qlora_kit.text.examples import build
    from qlora_kit.text.rows import read_rows
    from qlora_kit.text.tokenizer import load_tokenizer

    tok = load_tokenizer(base, recipe.template)
    parts, _ = build(list(read_rows(sample_path(), "json"))[:SAMPLE_ROWS], tok, recipe.template, recipe.preprocess)
    out = root / "data" / recipe.name / "processed"
    out.mkdir(parents=True, exist_ok=True)
    for split, examples in parts.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for e in examples:
                f.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")


def write_adapter(recipe, base: Path, dest: Path, seed: int = 0, std: float = 0.05) -> None:
    """A LoRA adapter as the train stage configures it (train.lora_config), with random B."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_kit.train import lora_config

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(recipe))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:  # B (zero-initialised), A, and any trained biases / modules_to_save
                p.add_(torch.randn_like(p) * std)
    peft_model.save_pretrained(str(dest))


def stage_root(tmp: Path, name: str, base: Path, overrides: dict | None = None, seed: int = 0):
    """A kit root with models/NAME/{base,adapter} and data/NAME/processed; returns (root, recipe)."""
    root = kit_root(tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_KIT_ROOT", str(root))
        recipe = load_recipe(name, overrides or {})
    shutil.copytree(base, root / "models" / name / "base")
    write_processed(root, recipe, base)
    write_adapter(recipe, base, root / "models" / name / "adapter", seed=seed)
    return root, recipe
