"""The tokenizer each recipe's source ran (template.tokenizer), and what happens when a folder lacks it.

- `hub-fast` reads tokenizer.json through `tokenizers` as the file defines it; `sentencepiece-slow`
  reads tokenizer.model with transformers 4.34's slow-tokenizer rules (text/slow_llama.py). The
  goldens (test_reference_goldens.py, stages/test_real_rows_parity.py) prove the ids; here: the
  rules in isolation on the real Llama-2 tokenizer, and the failures.
- A folder missing the file the recipe names, or whose tokenizer.json and tokenizer.model
  disagree, stops preprocess with exit 2 and one line naming the file; nothing is written.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from support.goldens import needs_tokenizer, tokenizer_dir
from support.pipeline import fetched_tiny_root
from support.repo import BIN, kit_env
from qlora_kit.config import load_recipe
from qlora_kit.errors import DataError
from qlora_kit.text.templates import chat_template, render
from qlora_kit.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> Path:
    """A kit root with the tiny recipe fetched (its model folder has tokenizer.json and .model)."""
    return fetched_tiny_root(tmp_path_factory.mktemp("tok-loaders"))


def preprocess(root: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([str(BIN / "qlora-kit"), "preprocess", "--recipe", "tiny", *args], cwd=root,
                          env=kit_env(root), capture_output=True, text=True, timeout=300)


def copy_root(fetched: Path, dest: Path) -> Path:
    shutil.copytree(fetched, dest, symlinks=True)
    return dest


def assert_refused(out: subprocess.CompletedProcess, root: Path, pattern: str) -> None:
    import re

    assert out.returncode == 2, out.stdout + out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and re.search(pattern, lines[0]), out.stderr
    assert not (root / "data/tiny/processed").exists()
    assert not list((root / "data/tiny").glob("processed.partial-*"))


@pytest.mark.parametrize("kind, missing", [("hub-fast", "tokenizer.json"), ("sentencepiece-slow", "tokenizer.model")])
def test_folder_without_the_named_file_stops_preprocess(fetched, tmp_path, kind, missing):
    root = copy_root(fetched, tmp_path / "kit")
    (root / "models/tiny/base" / missing).unlink()
    out = preprocess(root, f"template.tokenizer={kind}")
    assert_refused(out, root, rf"base/{missing}: missing; template.tokenizer is {kind}")


def test_tokenizer_json_that_disagrees_with_tokenizer_model_stops_preprocess(fetched, tmp_path):
    root = copy_root(fetched, tmp_path / "kit")
    f = root / "models/tiny/base/tokenizer.json"
    data = json.loads(f.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]  # two ordinary pieces swap ids: another model's file
    vocab[a], vocab[b] = vocab[b], vocab[a]
    f.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    out = preprocess(root, "template.tokenizer=hub-fast")
    assert_refused(out, root, r"base/tokenizer\.json: disagrees with .*tokenizer\.model: piece")


def test_each_loader_preprocesses_the_tiny_folder(fetched):
    """Both loaders work on the kit's own tiny folder (the e2e recipes run them on tiny models)."""
    for kind in ("hub-fast", "sentencepiece-slow"):
        tok = load_tokenizer(fetched / "models/tiny/base", load_recipe("tiny", {"template.tokenizer": kind}).template)
        assert tok.kind == kind and tok.encode("Q: hello\nA: ") and tok.encode("") == []


@needs_tokenizer
def test_slow_rules_on_the_real_tokenizer(tmp_path):
    """transformers 4.34's slow tokenizer, as komt loaded it: runs of spaces split as sentencepiece
    does, whitespace around a literal </s> eaten (komt's add_special_tokens strips both sides),
    leading whitespace keeps its "▁"."""
    komt = load_recipe("komt")
    tok = load_tokenizer(tokenizer_dir(tmp_path / "komt", "komt-layout"), komt.template)
    pieces = tok.hf.convert_ids_to_tokens
    assert pieces(tok.encode("a\n    return"))[-2:] == ["▁▁▁", "▁return"]
    assert tok.encode("ok   </s>  next") == tok.encode("ok</s>next")
    assert pieces(tok.encode("  x"))[0].startswith("▁")
    assert tok.bos_id == tok.eos_id == 2  # bos_is_eos


@needs_tokenizer
def test_hub_fast_puts_a_space_piece_after_a_literal_special_token(tmp_path):
    l2k = load_recipe("llama2-koalpaca")
    tok = load_tokenizer(tokenizer_dir(tmp_path / "hub", "hub-layout"), l2k.template)
    ids = tok.encode("a</s>b")
    assert ids[1] == 2 and tok.hf.convert_ids_to_tokens(ids[2:3])[0].startswith("▁")


@needs_tokenizer
def test_komt_layout_has_no_tokenizer_json_for_hub_fast(tmp_path):
    folder = tokenizer_dir(tmp_path / "komt", "komt-layout")
    with pytest.raises(DataError, match=r"tokenizer\.json: missing; template\.tokenizer is hub-fast"):
        load_tokenizer(folder, load_recipe("llama2-koalpaca").template)


def test_right_joined_strips_the_system_block_of_an_empty_instruction():
    """llama2-koalpaca: `(B_SYS + system + E_SYS + instruction).strip()` as one string
    (input_utils.py:L40-41): an empty or blank instruction also loses the "\\n\\n" after <</SYS>>."""
    tpl = load_recipe("llama2-koalpaca").template
    for ins in ("", "   \n"):
        p = render(tpl, {"instruction": ins, "input": "", "output": "x"}, bos="<s>", eos="</s>").prompt
        assert p.endswith("\n<</SYS>> [/INST]"), p
    p = render(tpl, {"instruction": "hi  ", "input": "", "output": "x"}, bos="<s>", eos="</s>").prompt
    assert p.endswith("<</SYS>>\n\nhi [/INST]")


def test_right_joined_chat_template_renders_what_training_rendered():
    from jinja2 import Template

    tpl = load_recipe("llama2-koalpaca").template
    jt = Template(chat_template(tpl, bos="<s>", eos="</s>"))
    for ins in ("", "hi  ", "질문"):
        want = render(tpl, {"instruction": ins, "input": "", "output": ""}, bos="<s>", eos="</s>").prompt
        assert jt.render(messages=[{"role": "user", "content": ins}]) == want
        # a system message takes {system}'s place, in the empty-instruction form too
        mine = tpl.model_copy(update={"system": "Be brief."})
        want = render(mine, {"instruction": ins, "input": "", "output": ""}, bos="<s>", eos="</s>").prompt
        got = jt.render(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": ins}])
        assert got == want, (got, want)


def test_faithful_recipes_keep_the_rows_the_sources_trained_on():
    """clean_rows: false (quirk source_kept_unusable_rows) keeps empty outputs and control
    characters; fixing the quirk drops them again, counted by reason."""
    from support.chartok import CharTok
    from qlora_kit.text.examples import build
    from qlora_kit.text.rows import check_row

    rows = [check_row("f.jsonl", i + 1, r, {}) for i, r in enumerate(
        [{"instruction": "a", "output": ""}, {"instruction": "b", "output": "x\x01y"},
         {"instruction": "c", "output": "ok"}])]
    for name in ("llama2-koalpaca", "komt", "alpagasus2"):
        faithful = load_recipe(name, {"preprocess.val_ratio": 0.0})
        parts, rep = build(rows, CharTok(), faithful.template, faithful.preprocess)
        assert rep.to_json()["kept"] == 3 and not rep.dropped, name
        fixed = load_recipe(name, {"preprocess.val_ratio": 0.0, "quirks.source_kept_unusable_rows.fix": True})
        parts, rep = build(rows, CharTok(), fixed.template, fixed.preprocess)
        assert dict(rep.dropped) == {"empty_output": 1, "control_character": 1}, name
