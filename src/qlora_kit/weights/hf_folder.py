"""The non-weight files of a merged Hugging Face folder: tokenizer with chat template, configs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any
from qlora_kit.config import Recipe
from qlora_kit.errors import MergeError


def hf_chat_template(recipe: Recipe, tok: Any) -> str:
    """templates.chat_template plus the BOS the recipe adds as an id: as text at the start, the way
    Llama-2's own chat template starts with `bos_token`, so apply_chat_template(tokenize=True),
    llama-cpp-python (which tokenizes a rendered template without adding BOS) and llama.cpp's
    server (which strips a leading BOS text when it adds one itself) all get exactly one BOS."""
    from qlora_kit.text.templates import chat_template

    lead = ""
    if recipe.template.add_bos:
        lead = "{{ '" + tok.bos.replace("\\", "\\\\").replace("'", "\\'") + "' }}"
    return lead + chat_template(recipe.template, bos=tok.bos, eos=tok.eos)


def write_tokenizer(recipe: Recipe, base: Path, out: Path) -> dict[str, Any]:
    """Save the recipe's tokenizer (special-token policy applied) with its chat template and an
    explicit add_bos_token / add_eos_token, which llama.cpp's converter copies into the GGUF; then
    check, on the saved folder, that the chat template renders exactly the training prompt text.

    Sentencepiece (Metaspace) tokenizers are saved with `legacy: true`: transformers 5's default
    (`legacy: false`, Metaspace prepend_scheme "first") gives text right after a special token no
    "▁" prefix, so the chat template's leading BOS text would turn "<s>Below" into [<s>, "Below"]
    where training had [<s>, "▁Below"] (BOS id + the prompt tokenized on its own; sentencepiece,
    the 2023 sources and llama.cpp all put the "▁" there). Text with no special token inside, which
    is all the kit ever tokenizes for training, comes out the same either way.
    """
    from qlora_kit.text.templates import chat_messages, render_inference
    from qlora_kit.text.tokenizer import SOURCE_PREFIX, load_tokenizer, source_file

    trust = recipe.model.trust_remote_code
    tok = load_tokenizer(base, recipe.template, trust_remote_code=trust)
    tok.hf.chat_template = hf_chat_template(recipe, tok)
    for attr, value in (("add_bos_token", recipe.template.add_bos), ("add_eos_token", False)):
        if hasattr(tok.hf, attr):
            try:
                setattr(tok.hf, attr, value)  # Llama: also rewrites the post-processor
            except (AttributeError, ValueError):
                pass
    tok.hf.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(add_bos_token=recipe.template.add_bos, add_eos_token=False)
    pre = getattr(getattr(tok.hf, "backend_tokenizer", None), "pre_tokenizer", None)
    if type(pre).__name__ == "Metaspace":
        cfg["legacy"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for extra in ("tokenizer.model",):  # llama.cpp's converter reads the sentencepiece model
        if (base / extra).exists() and not (out / extra).exists():
            shutil.copyfile(base / extra, out / extra)
    if recipe.template.tokenizer != "auto":  # the source's own files, for the kit's loaders (tokenizer.py)
        for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
            if source_file(base, name).is_file():
                shutil.copyfile(source_file(base, name), out / (SOURCE_PREFIX + name))

    saved = load_tokenizer(out, recipe.template, trust_remote_code=trust)
    for row in ({"instruction": "Below is 3 + 4?", "input": ""}, {"instruction": "번역하세요", "input": "Good morning"}):
        msg = chat_messages(row)
        # the text, not transformers' ids: the kit's own loader (template.tokenizer) makes the ids,
        # and quantize checks llama.cpp's ids for this template against it
        got = saved.hf.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        want = (tok.bos if recipe.template.add_bos else "") + render_inference(recipe.template, row, bos=tok.bos,
                                                                               eos=tok.eos)
        if got != want:
            raise MergeError(f"{out}: the chat template renders {got[:120]!r}, training would give {want[:120]!r} "
                             f"(row {row})")
    return {"bos_id": tok.bos_id if recipe.template.add_bos else None, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "bos": tok.bos if recipe.template.add_bos else "", "eos": tok.eos, "add_bos": recipe.template.add_bos}


def write_config(recipe: Recipe, base: Path, out: Path) -> None:
    """The base's config with dtype = merge.dtype (and remote code files, if the recipe trusts them)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(base), trust_remote_code=recipe.model.trust_remote_code)
    cfg.dtype = recipe.merge.dtype
    cfg.save_pretrained(str(out))
    if recipe.model.trust_remote_code:
        for py in base.glob("*.py"):
            shutil.copyfile(py, out / py.name)


def write_generation_config(out: Path, ids: dict[str, Any]) -> dict[str, Any]:
    """Only the token ids: sampling stays the recipe's (eval section, Modelfile), and HF's generate
    must not inherit a base model's sampling defaults (Llama-2-chat ships do_sample with T=0.6)."""
    gen = {k: v for k, v in (("bos_token_id", ids["bos_id"]), ("eos_token_id", ids["eos_id"]),
                             ("pad_token_id", ids["pad_id"])) if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    return gen
