"""The sources' own preprocessing, run as they ran it, for bench/preprocess_throughput.py.

Each function takes the data file (a JSON array of instruction/input/output objects), the number
of leading rows to leave out, a tokenizer folder and the recipe, reads the file as the source did
and returns the number of rows it tokenized. The code the sources wrote is imported
from tools/reference/ (copied verbatim there from each repository, file:line cited); only the
driving lines here are new. Library versions are today's (the lock), not the sources' pins: the
comparison is the way of working on the same libraries and the same tokenizer.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).resolve().parent.parent / "tools" / "reference"


def _reference(module: str):
    if str(REFERENCE) not in sys.path:
        sys.path.insert(0, str(REFERENCE))
    import importlib

    return importlib.import_module(module)


def _rows(path: Path, skip: int) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
                for r in json.load(f)[skip:]]


def alpagasus2(path: Path, skip: int, tok_dir: Path, recipe) -> int:
    """gauss5930/AlpaGasus2-QLoRA: training/utils.py:1-23 (load_dataset json + map of the
    formatting function), then trl's SFTTrainer tokenization (trl 0.5.0
    sft_trainer.py:280-315: one batched map, 1000 rows a batch, truncation at max_seq_length)."""
    import datasets
    from transformers import AutoTokenizer

    ref = _reference("alpagasus2")  # its loading_dataset is the source's verbatim
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    tokenizer.pad_token = tokenizer.eos_token
    cutoff = recipe.preprocess.max_length
    if skip:
        raise ValueError("alpagasus2's pipeline reads the whole file (skip must be 0)")
    with tempfile.TemporaryDirectory(prefix="ag2-bench-") as tmp:  # a fresh datasets cache
        datasets.config.HF_DATASETS_CACHE = Path(tmp) / "cache"  # read at call time, not the env
        datasets.disable_progress_bars()
        dataset = ref.loading_dataset(str(path), "json", 0)

        def tokenize(element):  # trl 0.5.0 SFTTrainer._prepare_non_packed_dataloader
            outputs = tokenizer(element["text"], truncation=True, padding=False, max_length=cutoff,
                                return_overflowing_tokens=False, return_length=False)
            return {"input_ids": outputs["input_ids"], "attention_mask": outputs["attention_mask"]}

        out = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, batch_size=1000)
        return len(out)


def llama2_koalpaca(path: Path, skip: int, tok_dir: Path, recipe) -> int:
    """id4thomas/llama2-koalpaca train_qlora.py:L78-96: the text of each row (a map of
    utils/input_utils.py's lambda), token lengths row by row (utils/data_utils.py:9-14), rows
    under the threshold selected, then one batched map of tokenizer(text, add_special_tokens=False)."""
    import datasets
    from transformers import AutoTokenizer

    ref = _reference("llama2_koalpaca")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    tokenizer.pad_token = tokenizer.eos_token
    datasets.disable_progress_bars()
    data = datasets.Dataset.from_list([{"instruction": r["instruction"], "output": r["output"]}
                                       for r in _rows(path, skip)])
    data = data.map(lambda x: {"text": tokenizer.bos_token + ref.map_data_to_lambda_text(x) + tokenizer.eos_token})
    lens = ref.get_token_lens(tokenizer, data["text"])
    data = data.select(ref.get_below_threshold_idxs(lens, recipe.preprocess.max_length))
    data = data.map(lambda samples: tokenizer(samples["text"], add_special_tokens=False), batched=True)
    return len(data)


def stanford_alpaca(path: Path, skip: int, tok_dir: Path, recipe) -> int:
    """Stanford Alpaca's `preprocess` / `_tokenize_fn` (davidkim205/komt finetune_with_lora.py:77-113;
    polyglot-koalpaca's TRAIN cells 60-62 run the same code): every text tokenized alone, the
    full texts and then the prompts, each to a tensor."""
    from transformers import AutoTokenizer

    from qlora_kit.text.templates import render

    ref = _reference("komt")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), model_max_length=recipe.preprocess.max_length,
                                              padding_side="right")
    tokenizer.pad_token = tokenizer.eos_token
    rendered = [render(recipe.template, r, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token)
                for r in _rows(path, skip)]
    out = ref.preprocess([x.prompt for x in rendered], [x.completion for x in rendered], tokenizer)
    return len(out["input_ids"])


PIPELINES: dict[str, Any] = {"alpagasus2": alpagasus2, "llama2-koalpaca": llama2_koalpaca,
                             "polyglot-koalpaca": stanford_alpaca}
DESCRIBE = {"alpagasus2": "datasets `load_dataset` + `map` + trl's batched tokenize",
            "llama2-koalpaca": "datasets `map` + per-row length + batched tokenize",
            "polyglot-koalpaca": "Stanford Alpaca `_tokenize_fn`, row by row"}
