"""All six stages of each Llama recipe with the real Llama-2 tokenizer (tiny weights), on real rows.

The model folder is the tokenizer layout the recipe's source loaded (tokenizers/llama-2/README.md:
the 2023 hub layout for llama2-koalpaca and alpagasus2, komt's layout for komt) plus Meta's
`tokenizer.model`, beside a 1-layer Llama with the full 32000-piece vocabulary and random weights.
The data are real rows of the recipe's own kind (KoAlpaca sample, gpt4life claude_t45, komt's
evaluation pairs), read in place. The recipe's template, tokenizer loader, masking and length
policy are its own; only model, data, step counts and max_length (512 positions) are swapped, as
in test_recipes_e2e.py. quantize's token gate must pass on every processed row; a folder whose
tokenizer.json is another model's fails it with one line naming the file.

Skips without the real tokenizer and data (QLORA_KIT_TEST_DATA).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import pytest

from support.goldens import TOKENIZERS, layout, needs_tokenizer, reference_module, tokenizer_dir
from support.repo import SHARED_DATA, copy_repo

pytestmark = [needs_tokenizer, pytest.mark.slow]

DATA = {"llama2-koalpaca": "koalpaca_sample", "alpagasus2": "claude_t45", "komt": "komt_eval"}
ROWS = 24


def tiny_llama_with_real_vocab(dest: Path, layout_name: str) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tokenizer_dir(dest, layout_name)
    n_vocab = len(AutoTokenizer.from_pretrained(str(folder)))  # komt's layout adds <pad> = 32000
    cfg = LlamaConfig(vocab_size=n_vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(folder))
    return folder


def overrides(recipe: str, model_dir: Path) -> dict:
    files, fmt, fields, skip = reference_module("real_rows").DATASETS[DATA[recipe]]
    return {"model.source": "local", "model.name": str(model_dir), "model.arch": "llama", "model.revision": None,
            "data.source": "local", "data.path": str(SHARED_DATA / files[0]), "data.format": fmt,
            "data.fields": fields, "data.url": "", "data.sha256": "", "data.git_blob": "", "data.extra": [],
            "data.skip_rows": skip, "data.limit": ROWS,
            "preprocess.max_length": 512, "train.max_steps": 2, "train.warmup_steps": 0, "train.eval_steps": 0,
            "train.save_steps": 0, "train.logging_steps": 1, "train.per_device_batch": 2, "train.grad_accum": 1,
            "eval.max_new_tokens": 4, "eval.num_prompts": 2, "eval.prompt_sets": [], "eval.benchmarks": [],
            "expected.metrics": {}, "quantize.types": ["f16"], "quantize.parity_rows": 2}


def run(root: Path, recipe: str, sets: dict, stages: tuple[str, ...]) -> None:
    from qlora_kit.config import load_recipe

    old = os.environ.get("QLORA_KIT_ROOT")
    os.environ["QLORA_KIT_ROOT"] = str(root)
    try:
        r = load_recipe(recipe, sets)
        for stage in stages:
            importlib.import_module(f"qlora_kit.{stage}").run(r, sets)
    finally:
        if old is None:
            os.environ.pop("QLORA_KIT_ROOT", None)
        else:
            os.environ["QLORA_KIT_ROOT"] = old


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not present at {SHARED_DATA}")
@pytest.mark.parametrize("recipe", sorted(DATA))
def test_six_stages_with_the_real_vocabulary(recipe, tmp_path):
    root = copy_repo(tmp_path / "kit")
    model_dir = tiny_llama_with_real_vocab(tmp_path / "model", layout(recipe))
    sets = overrides(recipe, model_dir)
    run(root, recipe, sets, ("fetch", "preprocess", "train", "merge", "quantize", "evaluate"))
    man = json.loads((root / f"models/{recipe}/gguf/manifest.json").read_text(encoding="utf-8"))
    gate = man["facts"]["token_gate"]
    report = json.loads((root / f"reports/{recipe}/data_report.json").read_text(encoding="utf-8"))
    assert gate["rows"] == report["kept"] == gate["rows_agree"] > 0, (gate, report)
    assert gate["fields"] == gate["fields_agree"] > 0
    merged = root / f"models/{recipe}/merged"
    if layout(recipe) == "hub-layout":  # the source's tokenizer.json, byte for byte, for every later stage
        assert (merged / "source_tokenizer.json").read_bytes() == (TOKENIZERS / "hub-layout/tokenizer.json").read_bytes()
    assert (root / f"reports/{recipe}/report.md").is_file()


def test_gguf_gate_fails_on_a_planted_tokenizer_mismatch(tmp_path):
    """The merged folder's source tokenizer.json is swapped for one whose merges differ: the ids
    preprocess writes no longer match what llama.cpp makes of the text, and quantize says where."""
    from qlora_kit.gguf.token_gate import TokenizationMismatch

    recipe = "alpagasus2"
    root = copy_repo(tmp_path / "kit")
    model_dir = tiny_llama_with_real_vocab(tmp_path / "model", layout(recipe))
    tj = model_dir / "tokenizer.json"
    data = json.loads(tj.read_text(encoding="utf-8"))
    data["model"]["merges"] = data["model"]["merges"][: len(data["model"]["merges"]) // 2]  # another BPE
    tj.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    sets = overrides(recipe, model_dir)
    run(root, recipe, sets, ("fetch", "preprocess", "train", "merge"))
    with pytest.raises(TokenizationMismatch, match=r"model-f16\.gguf: llama\.cpp tokenizes \d+ of \d+ training "
                                                   r"texts .* differently .*train\.jsonl:\d+"):
        run(root, recipe, sets, ("quantize",))
    assert not (root / f"models/{recipe}/gguf").exists()
    shutil.rmtree(root / "models", ignore_errors=True)
