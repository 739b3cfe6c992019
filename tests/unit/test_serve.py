"""The chat convention (text/chat.py), the chat templates that follow it, `qlora-kit serve`'s
generation loop and its refusals before anything is loaded. The server itself, with real
clients, is tests/e2e/test_serve_openai.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qlora_kit import cli, serve
from qlora_kit.config import load_recipe
from qlora_kit.text.chat import ChatError, chat_row
from qlora_kit.text.templates import chat_messages, chat_template, render_inference
from support.repo import REPO, kit_root

ROWS = ({"instruction": "3 더하기 4는?", "input": ""}, {"instruction": "Translate", "input": "안녕"})


def test_chat_row_reads_instruction_input_and_system_where_the_prompt_has_one():
    tiny = load_recipe("tiny").template
    for row in ROWS:
        got, tpl = chat_row(chat_messages(row), tiny)
        assert got == row and tpl == tiny
    assert chat_row([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                    tiny)[0] == {"instruction": "ab", "input": ""}
    l2k = load_recipe(str(REPO / "recipes/llama2-koalpaca.yaml")).template
    row, tpl = chat_row([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], l2k)
    assert tpl.system == "Be brief." and "Be brief." in render_inference(tpl, row)


@pytest.mark.parametrize("messages, says", [
    ([{"role": "system", "content": "x"}, {"role": "user", "content": "q"}],
     "messages[0]: this model's prompt has no system"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "roles [user assistant]"),
    ([{"role": "user", "content": "q"}] * 3, "roles [user user user]"),
    ([{"role": "user", "content": "q", "input": "x"}], "messages[0].input: not part of the chat convention"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
    ([{"role": "user", "content": None}], "messages[0].content: a string is required"),
    ([{"content": "q"}], "messages[0]: an object with a `role`"),
    ("hi", "messages: a non-empty list"),
])
def test_chat_row_refuses_what_the_convention_cannot_say(messages, says):
    with pytest.raises(ChatError, match=re.escape(says)):
        chat_row(messages, load_recipe("tiny").template)


@pytest.mark.parametrize("name", ["tiny", "llama2-koalpaca", "komt", "alpagasus2", "polyglot-koalpaca"])
def test_the_chat_template_follows_the_same_convention(name):
    jinja2 = pytest.importorskip("jinja2")
    recipe = load_recipe(name if name == "tiny" else str(REPO / f"recipes/{name}.yaml"))
    tpl = recipe.template

    def raise_exception(msg):
        raise ValueError(msg)

    t = jinja2.Environment().from_string(chat_template(tpl, bos="<s>", eos="</s>"))
    for row in ROWS:
        assert t.render(messages=chat_messages(row), raise_exception=raise_exception) == \
            render_inference(tpl, row, bos="<s>", eos="</s>"), (name, row)
    system = [{"role": "system", "content": "S!"}] + chat_messages(ROWS[1])
    if any(f and "{system}" in f for f in (tpl.prompt, tpl.prompt_with_input, tpl.inference_prompt,
                                           tpl.inference_prompt_with_input)):
        want = render_inference(tpl.model_copy(update={"system": "S!"}), ROWS[1], bos="<s>", eos="</s>")
        assert t.render(messages=system, raise_exception=raise_exception) == want
    else:
        with pytest.raises(ValueError, match="no system prompt"):
            t.render(messages=system, raise_exception=raise_exception)


class FakeModel(serve.Model):
    """Token ids are characters: 1 -> "a", 2 -> "b", ...; 99 is EOS."""

    def __init__(self, out: list[int]):
        self.out, self.eos_ids = out, {99}

    def tokens(self, ids, s):
        yield from self.out

    def detokenize(self, ids):
        return "".join(chr(ord("a") + i - 1) for i in ids)


def _run(out, stops=(), max_tokens=10):
    parts = list(serve.generate(FakeModel(out), [0], {"max_tokens": max_tokens}, list(stops)))
    return "".join(p[0] for p in parts), parts[-1][1], parts[-1][2]


def test_generation_ends_at_eos_at_a_stop_string_or_at_max_tokens():
    assert _run([1, 2, 99, 3]) == ("ab", "stop", 2)  # EOS: not in the text, nothing after it
    assert _run([1, 2, 3, 4, 5], max_tokens=3) == ("abc", "length", 3)
    assert _run([1, 2, 3, 4, 5], stops=["cd"]) == ("ab", "stop", 4)
    assert _run([1, 2, 3], stops=["zz"]) == ("abc", "length", 3)


def _serve(root: Path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setenv("QLORA_KIT_ROOT", str(root))
    rc = cli.main(["serve", "--recipe", "tiny", *args])
    return rc, capsys.readouterr().err.strip()


def test_serve_before_the_stages_or_on_a_damaged_gguf_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    root = kit_root(tmp_path / "root")
    rc, err = _serve(root, monkeypatch, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "no merged model yet; run `make merge RECIPE=tiny`" in err
    merged, gguf = root / "models/tiny/merged", root / "models/tiny/gguf"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")
    rc, err = _serve(root, monkeypatch, capsys)
    assert rc == 2 and "no GGUF recorded yet; run `make quantize RECIPE=tiny`" in err
    gguf.mkdir(parents=True)
    (gguf / "model-f16.gguf").write_bytes(b"GGUF damaged")
    files = {"f16": {"file": "model-f16.gguf", "sha256": "0" * 64}}
    (gguf / "manifest.json").write_text(json.dumps({"facts": {"files": files}}))
    rc, err = _serve(root, monkeypatch, capsys, "--gguf", "q4_k_m")
    assert rc == 2 and err.endswith("--gguf q4_k_m: not among this recipe's GGUFs (f16)")
    rc, err = _serve(root, monkeypatch, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "model-f16.gguf is damaged" in err and "qlora-kit quantize" in err
    rc, err = _serve(root, monkeypatch, capsys, "--merged", "--gguf", "f16")
    assert rc == 2 and "exclude each other" in err
