"""Merge stage: fold the LoRA adapter into the base; write a complete Hugging Face model folder.

    qlora-kit merge --recipe tiny          (dvc: merge@tiny)

Reads `models/NAME/base`, `models/NAME/adapter` and the validation rows in `data/NAME/processed`;
writes `models/NAME/merged` and `reports/NAME/merge_parity.json`. The merged folder is a complete
model: the base's safetensors shards and index (same sharding, same tensor names), config.json
(dtype = `merge.dtype`), the tokenizer with a chat template that renders the recipe's inference
prompt (BOS included when the recipe adds one), generation_config.json with the recipe's BOS/EOS/pad
ids, a model card README.md and manifest.json.

Base choice (`merge.base`): `original` merges into the 16/32-bit base weights; `nf4-roundtrip`
merges into the weights the adapter was trained against: every weight bitsandbytes quantized during
training goes through the same NF4/FP4 quantize -> dequantize first (`bitsandbytes.functional`).

Method (`merge.method`):
- `shardwise` (default): one safetensors shard after the other, and inside a shard one tensor
  after the other: read it, add W += (alpha / r) * B @ A where the adapter has a LoRA for it (in
  fp32, cast once to `merge.dtype`), write it, free it. Peak memory is the adapter plus a few
  copies of the largest tensor, less than one shard, so a 13B base (26 GB in fp16, 10 GB shards)
  merges on a 24 GB machine (bench/merge_memory.py measures it against `peft`). Written here
  because peft has no shard-wise merge.
- `peft`: load the whole model, peft's `merge_and_unload()`, written in the base's sharding. For
  cross-checking; needs about 2 bytes x params of RAM.

Parity: the merged model's logits vs base + adapter (unmerged, peft, fp32) on `merge.parity_rows`
held-out rows; the stage fails above `merge.max_rel_error`. The reference needs the whole model in
fp32 in RAM; where it does not fit, the logit check is skipped and says why in merge_parity.json.
Either way the LoRA delta of the first module of every shard is recomputed by peft's own layer
code and compared with ours (`modules` in merge_parity.json).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qlora_kit.config import Recipe
from qlora_kit.errors import MergeError
from qlora_kit.weights.lora_merge import load_base_for_merge, merge_peft, merge_shardwise, read_adapter
from qlora_kit.scoring.logprobs import fits_in_memory, logits_on, parity
from qlora_kit.weights.model_card import model_card
from qlora_kit.text.examples import parity_rows
from qlora_kit.weights.safetensors_io import tensor_shapes
from qlora_kit.weights.hf_folder import write_config, write_generation_config, write_tokenizer


class MergeParityError(MergeError):
    """The merged model does not reproduce base+adapter within the recipe's threshold."""


# --- the adapter ---------------------------------------------------------------------------------


# --- the base ------------------------------------------------------------------------------------


# --- shard-wise merge ----------------------------------------------------------------------------


# --- peft merge (for checking) -------------------------------------------------------------------


# --- the rest of the folder ----------------------------------------------------------------------


# --- parity --------------------------------------------------------------------------------------


def logit_parity(recipe: Recipe, base: Path, adapter: Path, merged: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Merged (fp32) vs base + adapter unmerged (peft, fp32), one model in memory at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    n_params = sum(math.prod(s) for s, _ in tensor_shapes(base).values())
    ok, mem = fits_in_memory(n_params)
    if not ok:
        return {"checked": False, "skipped": f"the fp32 model needs ~{mem['need_bytes'] / 2**30:.1f} GiB, "
                f"{mem['available_bytes'] / 2**30:.1f} GiB available", **mem}
    merged_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32,
                                                        trust_remote_code=recipe.model.trust_remote_code).eval()
    after = logits_on(merged_model, rows)
    del merged_model
    ref = PeftModel.from_pretrained(load_base_for_merge(recipe, base, torch.float32), str(adapter)).eval()
    before = logits_on(ref, rows)
    del ref
    return {"checked": True, **parity(before, after), "reference": "base + adapter (peft, unmerged, fp32)", **mem}


def peak_rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def parity_report(recipe: Recipe, paths, merged: Path, rows: list, split: str, checks: list) -> dict[str, Any]:
    """Logit parity (merged vs base + adapter) and per-module parity against peft; written to
    reports/NAME/merge_parity.json; raises MergeParityError when either is over its threshold."""
    from qlora_kit.artifacts import write_json

    mg = recipe.merge
    worst = max((c["max_abs_diff"] / max(c["max_abs_delta"], 1e-12) for c in checks), default=0.0)
    par: dict[str, Any] = {
        "method": mg.method, "base": mg.base, "dtype": mg.dtype, "threshold": mg.max_rel_error,
        "logits": logit_parity(recipe, paths.base, paths.adapter, merged, rows),
        "modules": {"checked": len(checks), "against": "peft LoRA layer get_delta_weight",
                    "max_rel_diff": worst, "detail": checks},
    }
    lg = par["logits"]
    # top-level numbers as evaluate's report reads them
    par.update({k: lg.get(k) for k in ("max_rel_error", "mean_rel_error", "top1_agreement")},
               rows=lg.get("rows", 0), split=split)
    par["passed"] = (not lg["checked"] or lg["max_rel_error"] <= mg.max_rel_error) and worst <= 1e-5
    write_json(paths.reports / "merge_parity.json", par)
    if not par["passed"]:
        why = (f"max relative logit error {lg['max_rel_error']:.3g} > merge.max_rel_error {mg.max_rel_error}"
               if lg["checked"] and lg["max_rel_error"] > mg.max_rel_error else
               f"our LoRA update differs from peft's by {worst:.3g} (relative)")
        raise MergeParityError(f"merge parity failed: {why} (see {paths.reports / 'merge_parity.json'})")
    return par


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from qlora_kit import layout
    from qlora_kit.sources import model_safety
    from qlora_kit.artifacts import StageRun, atomic_dir, verify_recorded, write_json
    from qlora_kit.errors import DataError

    paths = layout.paths(recipe.name)
    mg = recipe.merge
    st = StageRun("merge", recipe, overrides)
    st.use_threads()
    model_safety.check(paths.base, recipe.model)  # shardwise reads the base without from_pretrained
    if not (paths.adapter / "adapter_config.json").is_file():
        raise DataError(f"{paths.adapter}: no adapter; run `qlora-kit train --recipe {recipe.name}` first")
    if not (paths.processed / "train.jsonl").is_file():
        raise DataError(f"{paths.processed}: no processed data; run `qlora-kit preprocess --recipe "
                        f"{recipe.name}` first")
    if mg.base == "nf4-roundtrip" and recipe.qlora.bits != 4:
        raise MergeError(f"merge.base nf4-roundtrip needs qlora.bits 4 (got {recipe.qlora.bits})")
    train_facts = _json_or_empty(paths.adapter / "manifest.json").get("facts", {})
    verify_recorded(paths.adapter, train_facts.get("files", {}), "train", recipe.name)  # before reading it
    st.add_input("adapter", paths.adapter)
    st.add_input("base", paths.base)
    rows, split = parity_rows(paths.processed, mg.parity_rows)
    adapter = read_adapter(paths.adapter)
    base_facts = _json_or_empty(paths.base / "fetch_manifest.json").get("facts", {}).get("model", {})
    torch.manual_seed(0)
    st.lap("read")

    with atomic_dir(paths.merged) as tmp:
        if mg.method == "shardwise":
            weights = merge_shardwise(recipe, paths.base, adapter, tmp)
        else:
            weights = merge_peft(recipe, paths.base, paths.adapter, tmp)
        st.volatile["peak_rss_mib_after_weights"] = peak_rss_mib()
        st.lap("merge_weights")
        write_config(recipe, paths.base, tmp)
        ids = write_tokenizer(recipe, paths.base, tmp)
        gen = write_generation_config(tmp, ids)
        st.lap("folder")

        par = parity_report(recipe, paths, tmp, rows, split, weights.get("module_checks", []))
        st.lap("parity")
        (tmp / "README.md").write_text(model_card(recipe, ids, par, adapter, base_facts, train_facts),
                                       encoding="utf-8")
        # free memory when the parity check ran is a fact of the machine, not of the inputs
        st.volatile["available_bytes"] = par["logits"].get("available_bytes")
        logits = {k: v for k, v in par["logits"].items() if k != "available_bytes"}
        st.facts.update(merge={"method": mg.method, "base": mg.base, "dtype": mg.dtype, "adapter": adapter.summary(),
                               **{k: v for k, v in weights.items() if k != "module_checks"}},
                        parity={k: v for k, v in par.items() if k != "modules"} | {"logits": logits} | {
                            "modules": {k: v for k, v in par["modules"].items() if k != "detail"}},
                        special_ids=ids, generation_config=gen)
        write_json(tmp / "manifest.json", st.manifest())
    st.lap("save")
    st.volatile["peak_rss_mib"] = peak_rss_mib()
    st.write_run_report(paths.reports)
    return st.facts


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
