"""Ollama Modelfile for a GGUF: the recipe's prompt as a Go template, its stop strings and sampling."""
from __future__ import annotations

from typing import Any
from qlora_kit.config import Recipe
from qlora_kit.gguf.checks import QuantizeError


def go_template(recipe: Recipe, bos: str, eos: str) -> tuple[str, str | None, list[str]]:
    """(TEMPLATE, SYSTEM or None, what the template cannot express) for Ollama.

    Ollama renders TEMPLATE with the user's message as `.Prompt` and the Modelfile's SYSTEM as
    `.System`, then tokenizes it adding BOS when the GGUF says add_bos_token; so BOS is not in
    the template. Literal text is copied (a `{{` in it is escaped as a Go string).
    """
    from qlora_kit.text.templates import PLACEHOLDER

    tpl = recipe.template
    plain = tpl.inference_prompt if tpl.inference_prompt is not None else tpl.prompt
    with_input = tpl.inference_prompt_with_input if tpl.inference_prompt is not None else tpl.prompt_with_input
    out, pos, uses_system = [], 0, False

    def literal(text: str) -> None:
        out.append(text.replace("{{", '{{ "{{" }}'))

    for m in PLACEHOLDER.finditer(plain):
        literal(plain[pos:m.start()])
        name = m.group(1)
        if name == "instruction":
            out.append("{{ .Prompt }}")
        elif name == "system":
            out.append("{{ .System }}")
            uses_system = True
        elif name in ("bos", "eos"):
            literal(bos if name == "bos" else eos)
        # input and output are empty in the no-input inference form
        pos = m.end()
    literal(plain[pos:])
    body = "".join(out)
    notes = []
    if tpl.strip.get("instruction"):
        notes.append(f"the recipe strips the instruction ({tpl.strip['instruction']}); Go templates cannot, "
                     "so send it without surrounding whitespace")
    if with_input is not None:
        notes.append("the Alpaca `input` has no slot in Ollama's prompt: this is the no-input form (the HF "
                     "chat template and the GGUF's embedded template take it as a second user message)")
    system = tpl.system if uses_system else None
    for what, text in (("TEMPLATE", body), ("SYSTEM", system or "")):
        if '"""' in text:
            raise QuantizeError(f"the recipe's {what} contains \"\"\", which a Modelfile cannot quote")
    return body, system, notes


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return f'"""{value}"""' if ('"' in value or "\n" in value) else f'"{value}"'
    return str(value)


def modelfile(recipe: Recipe, gguf_name: str, add_bos: bool, bos: str, eos: str) -> str:
    """The Ollama Modelfile for one GGUF of this recipe."""
    body, system, notes = go_template(recipe, bos, eos)
    e = recipe.eval
    stops = list(dict.fromkeys([eos, *recipe.quantize.stop]))
    if any('"""' in s for s in stops):
        raise QuantizeError(f"quantize.stop {stops}: a stop string with \"\"\" cannot be written in a Modelfile")
    params: list[tuple[str, Any]] = [("stop", s) for s in stops]
    if e.do_sample:
        params += [("temperature", e.temperature), ("top_p", e.top_p), ("top_k", e.top_k)]
    else:
        params.append(("temperature", 0))  # the source decoded greedily
    # always written: Ollama's own defaults (repeat_penalty 1.1, top_k 40, ...) differ from HF's
    params += [("repeat_penalty", e.repetition_penalty), ("num_predict", e.max_new_tokens)]
    L = [f"# Ollama Modelfile for {gguf_name}, written by `qlora-kit quantize --recipe {recipe.name}`.",
         f"#   ollama create {recipe.name}-{gguf_name.removeprefix('model-').removesuffix('.gguf')} -f "
         f"{gguf_name.removesuffix('.gguf')}.Modelfile",
         "# TEMPLATE renders the recipe's inference prompt (`qlora-kit render` shows it); "
         + (f"BOS {bos} is not in it: llama.cpp adds it (tokenizer.ggml.add_bos_token = true)."
            if add_bos else "the model takes no BOS (tokenizer.ggml.add_bos_token = false)."),
         "# Generation settings are the recipe's (eval section).",
         *[f"# Note: {n}." for n in notes],
         f"FROM ./{gguf_name}"]
    if system is not None:
        L.append(f'SYSTEM """{system}"""')
    L.append(f'TEMPLATE """{body}"""')
    L += [f"PARAMETER {k} {_param(v)}" for k, v in params]
    return "\n".join(L) + "\n"
