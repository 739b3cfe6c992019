"""The model cards follow Hugging Face's conventions: the adapter's README is the kit's card, not
peft's template (base_model as the recipe names it, library_name peft, the training and quirks,
a loading snippet that works), and the merged card carries `language` and `license`.

Uses the shared small tiny-recipe run (support/pipeline.py)."""
from __future__ import annotations

import yaml

from support.pipeline import pipeline_root


def _front(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_adapter_card_is_the_kits_and_its_snippet_loads(tmp_path_factory):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = pipeline_root(tmp_path_factory)
    adapter = root / "models/tiny/adapter"
    text = (adapter / "README.md").read_text(encoding="utf-8")
    assert "More Information Needed" not in text and str(root) not in text
    meta = _front(text)
    assert meta["base_model"] == "tiny-llama" and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation" and "base_model:adapter:tiny-llama" in meta["tags"]
    for line in ("# tiny (QLoRA adapter)", "- Quantization during training: 4-bit nf4", "optimizer steps",
                 "## Quirks in force", "PeftModel.from_pretrained(base, \"models/tiny/adapter\")"):
        assert line in text, line
    # the card's snippet, with the base the recipe names built here instead of downloaded
    base = AutoModelForCausalLM.from_pretrained(str(root / "models/tiny/base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    assert model.peft_config["default"].r == 16


def test_merged_card_has_language_and_license(tmp_path_factory):
    root = pipeline_root(tmp_path_factory)
    meta = _front((root / "models/tiny/merged/README.md").read_text(encoding="utf-8"))
    assert meta["language"] == ["ko", "en"] and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and meta["base_model"] == "tiny-llama"
