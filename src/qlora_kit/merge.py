"""Merge stage: fold the LoRA adapter into the base; write a complete Hugging Face model folder.

    qlora-kit merge --recipe tiny          (dvc: merge@tiny)

Reads `models/NAME/base` and `models/NAME/adapter`; writes `models/NAME/merged` (safetensors,
config, tokenizer with a chat template that renders the recipe's inference prompt,
generation_config with the recipe's EOS/pad ids, manifest) and `reports/NAME/merge_parity.json`.

Base choice (`merge.base`): `original` merges into the 16/32-bit base weights; `nf4-roundtrip`
merges into the dequantized 4-bit weights the adapter was trained against. Parity = merged model
vs base+adapter (unmerged) on held-out rows; the stage fails above `merge.max_rel_error`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Recipe


class MergeParityError(RuntimeError):
    """The merged model does not reproduce base+adapter within the recipe's threshold."""


def load_base_for_merge(recipe: Recipe, path: Path):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, recipe.merge.dtype)
    common = dict(trust_remote_code=recipe.model.trust_remote_code,
                  use_safetensors=not recipe.model.allow_pickle or None)
    if recipe.merge.base == "original":
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **common)
    q = recipe.quant
    if q.bits != 4:
        raise ValueError(f"merge.base nf4-roundtrip needs quant.bits 4 (got {q.bits})")
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                            bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=qc, device_map={"": "cpu"},
                                                 dtype=torch.float32, **common)
    model = model.dequantize()  # the exact weights the adapter saw during training, in full precision
    return model.to(dtype)


def logits_on(model, rows: list[dict[str, Any]]):
    import torch

    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            out.append(model(input_ids=ids).logits.float()[0])
    return out


def parity(a: list, b: list) -> dict[str, float]:
    """max and mean relative logit error of b against a (relative to a's largest |logit|)."""
    import torch

    max_rel, mean_rel, top1 = 0.0, 0.0, 0.0
    for x, y in zip(a, b):
        scale = x.abs().max().clamp_min(1e-6)
        d = (x - y).abs()
        max_rel = max(max_rel, float(d.max() / scale))
        mean_rel += float(d.mean() / scale)
        top1 += float((x.argmax(-1) == y.argmax(-1)).float().mean())
    n = max(len(a), 1)
    return {"max_rel_error": max_rel, "mean_rel_error": mean_rel / n, "top1_agreement": top1 / n, "rows": len(a)}


def write_tokenizer(recipe: Recipe, base: Path, out: Path) -> dict[str, Any]:
    from .templates import chat_template
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(base, recipe.template, trust_remote_code=recipe.model.trust_remote_code)
    tok.hf.chat_template = chat_template(recipe.template, bos=tok.bos if recipe.template.add_bos else "",
                                         eos=tok.eos)
    tok.hf.save_pretrained(str(out))
    for extra in ("tokenizer.model",):  # llama.cpp's converter reads the sentencepiece model
        if (base / extra).exists() and not (out / extra).exists():
            (out / extra).write_bytes((base / extra).read_bytes())
    return {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch
    from peft import PeftModel

    from . import layout
    from .artifacts import StageRun, atomic_dir, write_json
    from .preprocess import read_split

    paths = layout.paths(recipe.name)
    st = StageRun("merge", recipe, overrides)
    st.add_input("adapter", paths.adapter)
    rows = read_split(paths.processed, "val")[: recipe.merge.parity_rows]
    torch.manual_seed(0)

    model = load_base_for_merge(recipe, paths.base)
    peft_model = PeftModel.from_pretrained(model, str(paths.adapter))
    peft_model.eval()
    before = logits_on(peft_model, rows)
    merged = peft_model.merge_and_unload()
    after = logits_on(merged, rows)
    par = parity(before, after)
    par.update(base=recipe.merge.base, dtype=recipe.merge.dtype, threshold=recipe.merge.max_rel_error)
    st.lap("merge")
    par["passed"] = par["max_rel_error"] <= recipe.merge.max_rel_error
    write_json(paths.reports / "merge_parity.json", par)
    if not par["passed"]:
        raise MergeParityError(f"merge parity failed: max relative logit error {par['max_rel_error']:.3g} > "
                           f"merge.max_rel_error {recipe.merge.max_rel_error} (see {paths.reports}/merge_parity.json)")
    with atomic_dir(paths.merged) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        ids = write_tokenizer(recipe, paths.base, tmp)
        gen = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        st.facts.update(parity=par, special_ids=ids)
        write_json(tmp / "manifest.json", st.manifest())
    st.lap("save")
    return st.facts
