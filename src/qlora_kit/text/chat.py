"""The chat convention: standard OpenAI messages (only `role` and `content`) to one Alpaca row.

    messages = [{"role": "system", ...}]?   only where the recipe's inference prompt has {system}
               {"role": "user", "content": INSTRUCTION}
               {"role": "user", "content": INPUT}?   the Alpaca `input`, when the row has one

The recipes are single-turn Alpaca prompts, so that is all a request can say: a second user
message carries the input (an empty one means no input), a system message replaces the recipe's
`template.system` where the prompt shows it. Anything else (assistant turns, a third user turn,
a system message the prompt has no place for, non-text content) is refused with one sentence,
never silently dropped: a dropped part would change the prompt without telling the caller.
Pure code, like templates.py; `qlora-kit serve` uses it, docs/use-the-outputs.md documents it.
"""
from __future__ import annotations

from typing import Any

from qlora_kit.config import Template
from qlora_kit.text.templates import inference_forms


class ChatError(ValueError):
    """A request the convention cannot express; the message names the field."""


def has_system(tpl: Template) -> bool:
    """Whether the recipe's inference prompt shows the system text ({system})."""
    return any(f is not None and "{system}" in f for f in inference_forms(tpl))


def _text(i: int, m: Any) -> tuple[str, str]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ChatError(f"messages[{i}]: an object with a `role` and a `content` is required")
    if "input" in m:
        raise ChatError(f"messages[{i}].input: not part of the chat convention; send the Alpaca input "
                        "as a second user message")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ChatError(f"messages[{i}].content: only text parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ChatError(f"messages[{i}].content: a string is required")
    return m["role"], content


def chat_row(messages: Any, tpl: Template) -> tuple[dict[str, str], Template]:
    """(row {"instruction", "input"}, template with the request's system text) for `messages`."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages: a non-empty list of messages is required")
    turns = [_text(i, m) for i, m in enumerate(messages)]
    if turns[0][0] in ("system", "developer"):
        if not has_system(tpl):
            raise ChatError(f"messages[0]: this model's prompt has no system text, so a {turns[0][0]} message "
                            "cannot take effect; leave it out")
        tpl = tpl.model_copy(update={"system": turns[0][1]})
        turns = turns[1:]
    roles = [r for r, _ in turns]
    if roles not in (["user"], ["user", "user"]):
        got = " ".join(m["role"] for m in messages)
        raise ChatError(f"messages: roles [{got}] do not fit this single-turn model: send [system?] user "
                        "[user]: the instruction, then optionally the Alpaca input")
    return {"instruction": turns[0][1], "input": turns[1][1] if len(turns) > 1 else ""}, tpl

