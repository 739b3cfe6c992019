"""Prompt templates: render one Alpaca-form row into (prompt, completion) strings.

Pure code: no torch, no transformers. Placeholders ({system} {instruction} {input} {output}
{bos} {eos}) are substituted in a single left-to-right pass, so text in the data that looks
like a placeholder (`{input}`) comes out literally — never `str.format` on user text.

    qlora-kit render --recipe komt --limit 3      # the CLI view of this module
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from qlora_kit.config import Template

PLACEHOLDER = re.compile(r"\{(system|instruction|input|output|bos|eos)\}")


@dataclass(frozen=True)
class Rendered:
    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def substitute(template: str, values: dict[str, str]) -> str:
    """Replace known placeholders once; everything else (incl. braces in values) stays as is."""
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _strip(value: str, how: str | None) -> str:
    if how == "both":
        return value.strip()
    if how == "left":
        return value.lstrip()
    if how in ("right", "right_joined"):
        return value.rstrip()
    return value


def _fill(tpl: Template, template: str, vals: dict[str, str]) -> str:
    """`substitute`, plus `strip: right_joined`: the text before such a placeholder and its value
    are right-stripped as one string (so an empty value also loses the whitespace before it)."""
    for key, how in tpl.strip.items():
        token = "{" + key + "}"
        if how == "right_joined" and token in template:
            head, rest = template.split(token, 1)
            return (substitute(head, vals) + vals[key]).rstrip() + substitute(rest, vals)
    return substitute(template, vals)


def _values(tpl: Template, row: dict[str, str], bos: str, eos: str) -> dict[str, str]:
    vals = {k: _strip(row.get(k, "") or "", tpl.strip.get(k)) for k in ("instruction", "input", "output")}
    vals.update(system=tpl.system, bos=bos, eos=eos)
    return vals


def render(tpl: Template, row: dict[str, str], *, bos: str = "", eos: str = "") -> Rendered:
    """The training form of a row. `bos`/`eos` are the tokenizer's token strings."""
    vals = _values(tpl, row, bos, eos)
    has_input = bool(vals["input"])
    prompt_t = tpl.prompt_with_input if (has_input and tpl.prompt_with_input is not None) else tpl.prompt
    return Rendered(_fill(tpl, prompt_t, vals), _fill(tpl, tpl.completion, vals))


def inference_forms(tpl: Template) -> tuple[str, str | None]:
    """(prompt without input, prompt with input or None) of the inference form.

    A recipe that sets `inference_prompt` but no `inference_prompt_with_input` drops the input
    at inference, as AlpaGasus2's generate.py did; with neither set, the training prompts apply.
    """
    if tpl.inference_prompt is not None:
        return tpl.inference_prompt, tpl.inference_prompt_with_input
    return tpl.prompt, tpl.prompt_with_input


def render_inference(tpl: Template, row: dict[str, str], *, bos: str = "", eos: str = "") -> str:
    """The prompt the source used at inference time."""
    vals = _values(tpl, row, bos, eos)
    plain, with_input = inference_forms(tpl)
    return _fill(tpl, with_input if (vals["input"] and with_input is not None) else plain, vals)


def chat_messages(row: dict[str, str]) -> list[dict[str, str]]:
    """The standard chat messages for one row (the convention of text/chat.py, which reads them
    back): what the merge and quantize stages render through their chat templates and check."""
    msgs = [{"role": "user", "content": row["instruction"]}]
    return msgs + [{"role": "user", "content": row["input"]}] if row.get("input") else msgs


def chat_template(tpl: Template, *, bos: str, eos: str) -> str:
    """A Jinja chat template that renders the recipe's inference prompt for one user turn.

    The chat convention of text/chat.py: the first user message carries the instruction, an
    optional second user message the Alpaca input; a leading system message replaces
    `template.system` where the prompt has {system} and is refused (raise_exception) elsewhere.
    Used in tokenizer_config.json and the GGUF metadata.
    """
    def jinja_literal(s: str) -> str:
        return s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")

    def piece(t: str) -> str:
        out, pos = [], 0
        for m in PLACEHOLDER.finditer(t):
            if m.start() > pos:
                out.append("{{ '" + jinja_literal(t[pos:m.start()]) + "' }}")
            name = m.group(1)
            expr = {"instruction": "instruction", "input": "input", "system": "system",
                    "bos": "'" + jinja_literal(bos) + "'", "eos": "'" + jinja_literal(eos) + "'",
                    "output": "''"}[name]
            out.append("{{ " + expr + " }}")
            pos = m.end()
        if pos < len(t):
            out.append("{{ '" + jinja_literal(t[pos:]) + "' }}")
        return "".join(out)

    def joined(t: str) -> str:
        """strip: right_joined. An empty value renders the head with its trailing literal whitespace
        cut: the same as rstrip of the rendered head wherever literal text follows the head's last
        placeholder (llama2-koalpaca: "...{system}\n<</SYS>>\n\n"), a system message included."""
        for key, how in tpl.strip.items():
            token = "{" + key + "}"
            if how == "right_joined" and token in t:
                head, rest = t.split(token, 1)
                return ("{% if " + key + " %}" + piece(t) + "{% else %}" + piece(head.rstrip()) + piece(rest)
                        + "{% endif %}")
        return piece(t)

    method = {"both": ".strip()", "left": ".lstrip()", "right": ".rstrip()", "right_joined": ".rstrip()"}
    plain, with_input = inference_forms(tpl)
    # the chat convention (text/chat.py): [system] user [user] = [system text] instruction [input]
    body = "{% set first = 1 if messages[0]['role'] == 'system' else 0 %}"
    if any(f is not None and "{system}" in f for f in (plain, with_input)):
        body += ("{% set system = messages[0]['content'] if first else '" + jinja_literal(tpl.system) + "' %}")
    else:
        body += ("{% if first %}{{ raise_exception('this model has no system prompt; leave the system "
                 "message out') }}{% endif %}")
    body += ("{% set instruction = messages[first]['content']" + method.get(tpl.strip.get("instruction", ""), "")
             + " %}{% set input = (messages[first + 1]['content'] if messages|length > first + 1 else '')"
             + method.get(tpl.strip.get("input", ""), "") + " %}")
    if with_input is not None:
        body += "{% if input %}" + joined(with_input) + "{% else %}" + joined(plain) + "{% endif %}"
    else:
        body += joined(plain)
    return body
