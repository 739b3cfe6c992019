"""The model cards (README.md with Hugging Face metadata): the merged model's (merge stage) and
the adapter's (train stage). Each is built only from what its stage reads, so DVC reruns the
stage whenever a value on its card changes: the adapter's card from the model, qlora, lora,
train and quirks sections and the run's own facts; the merged card adds the source, the data,
`merge.license` and `merge.language`."""
from __future__ import annotations

import json
from typing import Any
from qlora_kit.config import Recipe
from qlora_kit.weights.lora_merge import Adapter


def _yaml_scalar(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def _front_matter(recipe: Recipe) -> list[str]:
    """Hub metadata: base model, data sets, licence, tags."""
    m, d = recipe.model, recipe.data
    datasets = [d.hub_dataset] if d.source == "hub" and d.hub_dataset else []
    tags = ["qlora-kit", "qlora", "lora", "merged", m.arch.replace("_", "-"), recipe.name]
    front = ["---", f"base_model: {_yaml_scalar(m.name)}", "datasets:" + ("" if datasets else " []")]
    front += [f"- {_yaml_scalar(x)}" for x in datasets]
    if recipe.merge.language:
        front += ["language:"] + [f"- {_yaml_scalar(x)}" for x in recipe.merge.language]
    front += [f"license: {_yaml_scalar(recipe.merge.license or 'other')}", "library_name: transformers",
              "pipeline_tag: text-generation", "tags:"] + [f"- {_yaml_scalar(t)}" for t in tags] + ["---", ""]
    return front


def _training_lines(recipe: Recipe, lora: dict[str, Any], train_facts: dict[str, Any]) -> list[str]:
    """Quantization during training, the LoRA config (adapter_config.json) and the run's steps."""
    q, t = recipe.qlora, lora.get("target_modules") or []
    # peft stores `all-linear` expanded to full module paths: name the module kinds
    targets = ", ".join(sorted({x.rsplit(".", 1)[-1] for x in t})) if isinstance(t, list) else str(t)
    L = [f"- Quantization during training: {q.bits}-bit"
         + (f" {q.quant_type}, double quant {q.double_quant}, compute {q.compute_dtype}" if q.bits == 4 else ""),
         f"- LoRA: r={lora['r']}, alpha={lora['lora_alpha']}, dropout {lora.get('lora_dropout')}, bias "
         f"{lora.get('bias', 'none')}, on {targets}"]
    derived, final = train_facts.get("derived") or {}, train_facts.get("final") or {}
    if derived:
        loss = final.get("train_loss")
        L.append(f"- Training: {final.get('global_step', derived.get('total_steps'))} optimizer steps, effective "
                 f"batch {derived.get('effective_batch')}, mean train loss {loss if loss is None else round(loss, 4)}")
    return L


def _provenance(recipe: Recipe, parity: dict[str, Any], adapter: Adapter, base_facts: dict[str, Any],
                train_facts: dict[str, Any]) -> list[str]:
    """Where the weights came from: source, base, data, training, merge and its parity check."""
    m, d, src = recipe.model, recipe.data, recipe.source
    model_rev = base_facts.get("resolved_commit") or m.revision or ("built from seed "
                                                                    f"{m.tiny.seed}" if m.source == "tiny" else "")
    if d.source == "url":
        data_line = f"`{d.url}` (sha256 `{d.sha256 or 'not pinned'}`)"
    elif d.source == "hub":
        data_line = f"Hub dataset `{d.hub_dataset}` @ `{d.hub_revision or 'main'}`, file `{d.path}`"
    else:
        data_line = {"tiny-sample": "the kit's shipped tiny sample (src/qlora_kit/tiny/assets)"}.get(d.source, d.path)
    L = [f"# {recipe.name} (merged QLoRA fine-tune)", "", recipe.description, "",
         "Built by qlora-kit from `recipes/" + recipe.name + ".yaml`: the LoRA adapter "
         "trained by the recipe, merged into the base weights. Every number below was measured when this "
         "folder was written.", "", "## Provenance", "",
         f"- Source reproduced: " + (f"`{src.repo}@{src.commit}`" if src.repo else "none (kit smoke recipe)"),
         *([f"- Source files: {', '.join('`' + f + '`' for f in src.files)}"] if src.files else []),
         f"- Base model: `{m.name}` ({model_rev or 'revision not pinned'})",
         f"- Data: {data_line}",
         *_training_lines(recipe, adapter.config, train_facts)]
    logits = parity.get("logits") or {}
    L += [f"- Merge: `{recipe.merge.method}` into the `{recipe.merge.base}` base weights, saved as "
          f"{recipe.merge.dtype}",
          "- Parity, merged vs base + adapter: " + (
              f"max relative logit error {logits['max_rel_error']:.2e}, mean {logits['mean_rel_error']:.2e}, "
              f"top-1 agreement {logits['top1_agreement']:.1%} on {logits['rows']} "
              f"{'held-out' if parity.get('split') == 'val' else 'training'} rows "
              f"(threshold {recipe.merge.max_rel_error})" if logits.get("checked") else
              f"logits not compared ({logits.get('skipped', 'n/a')})"), ""]

    return L


def _prompt_format(recipe: Recipe, ids: dict[str, Any]) -> list[str]:
    """The inference prompt the chat template renders, and the special tokens."""
    from qlora_kit.text.templates import render_inference

    tpl = recipe.template
    example = {"instruction": "<instruction>", "input": "", "output": ""}
    prompt = render_inference(tpl, example, bos=ids["bos"], eos=ids["eos"])
    return ["## Prompt format", "",
          "The tokenizer's chat template renders exactly the recipe's inference prompt (the one the source "
          "prompted with; `qlora-kit render --recipe " + recipe.name + "` shows it per row). The first user message "
          "is the instruction, an optional second user message the Alpaca input (only `role` and `content`, as "
          "every OpenAI client sends them):", "",
          "```python",
          'tok.apply_chat_template([{"role": "user", "content": "..."}], tokenize=False)',
          "```", "", "renders (BOS " + (f"`{ids['bos']}` first, as text" if ids["add_bos"] else "none") + "):", "",
          "```", (ids["bos"] if ids["add_bos"] else "") + prompt, "```", "",
          f"EOS: `{ids['eos']}` (id {ids['eos_id']}); pad id {ids['pad_id']}"
          + (f"; BOS `{ids['bos']}` (id {ids['bos_id']})" if ids["add_bos"] else "; no BOS") + ".", ""]


def _quirks_section(recipe: Recipe) -> list[str]:
    """The recipe's quirks and whether each is reproduced or fixed."""
    L = ["## Quirks in force", ""]
    if recipe.quirks:
        L += ["Where the source's code did something its README did not say, the recipe reproduces the code "
              "and names the difference; `fix: true` switches to the corrected behaviour.", "",
              "| quirk | state | what | source |", "|---|---|---|---|"]
        for name, q in recipe.quirks.items():
            cell = lambda s: " ".join(str(s).split()).replace("|", "\\|")  # noqa: E731
            L.append(f"| `{name}` | {'fixed' if q.fix else 'reproduced (as the source did)'} | "
                     f"{cell(q.description)} | {cell(q.cite)} |")
    else:
        L.append("None: this recipe reproduces no source.")
    L.append("")
    return L


def model_card(recipe: Recipe, ids: dict[str, Any], parity: dict[str, Any], adapter: Adapter,
               base_facts: dict[str, Any], train_facts: dict[str, Any]) -> str:
    """README.md: Hub metadata (front matter) and what a user needs to reproduce and prompt it."""
    L = _provenance(recipe, parity, adapter, base_facts, train_facts)
    L += _prompt_format(recipe, ids) + _quirks_section(recipe)
    return "\n".join(_front_matter(recipe) + L)


def adapter_card(recipe: Recipe, lora: dict[str, Any], train_facts: dict[str, Any]) -> str:
    """models/NAME/adapter/README.md, in place of peft's template: Hub metadata for a peft adapter
    (base_model as the recipe names it, library_name peft), what was trained, the quirks in force,
    and how to load it. `lora` is the adapter_config.json the stage wrote."""
    m = recipe.model
    tags = ["qlora-kit", "qlora", "lora", m.arch.replace("_", "-"), recipe.name, f"base_model:adapter:{m.name}"]
    front = ["---", f"base_model: {_yaml_scalar(m.name)}", "library_name: peft", "pipeline_tag: text-generation",
             "tags:"] + [f"- {_yaml_scalar(t)}" for t in tags] + ["---", ""]
    rev = m.revision or ("built from seed " f"{m.tiny.seed}" if m.source == "tiny" else "revision not pinned")
    L = [f"# {recipe.name} (QLoRA adapter)", "",
         f"The LoRA adapter qlora-kit's train stage wrote for the recipe `{recipe.name}` (`recipes/{recipe.name}.yaml`). "
         f"The merged model, with the full card (source reproduced, data, licence, prompt format, parity), is "
         f"`models/{recipe.name}/merged`; the GGUFs are in `models/{recipe.name}/gguf`.", "",
         "## Training", "",
         f"- Base model: `{m.name}` ({rev})",
         *_training_lines(recipe, lora, train_facts), "",
         "## Use", "",
         "```python",
         "from peft import PeftModel",
         "from transformers import AutoModelForCausalLM",
         "",
         f'base = AutoModelForCausalLM.from_pretrained("{m.name}")  # the base this adapter was trained on',
         f'model = PeftModel.from_pretrained(base, "models/{recipe.name}/adapter")',
         "```", ""]
    return "\n".join(front + L + _quirks_section(recipe))
