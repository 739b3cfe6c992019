"""Golden tests: every recipe's templates, byte for byte, against its source's own code.

Each `source_*` function below transcribes the source's string-building code (cited by
repo@commit:path:line as in ../shared/reference/source-facts.md) and is applied to the same rows
as the recipe; the two must agree exactly, for every variant: with and without input, system
prompt, EOS placement, BOS handling, stripping, braces in the data, and the inference forms.
One fully spelled-out literal per recipe pins the strings independently of both.

The last tests render the same rows through the tokenizer path (tiny models, session fixtures)
and check where the label mask starts and which special tokens carry loss.

    .venv/bin/python -m pytest -q tests/test_templates_golden.py -p no:cacheprovider
"""
from __future__ import annotations


import pytest

from qlora_kit.config import load_recipe
from qlora_kit.text.examples import IGNORE, tokenize_example
from qlora_kit.text.render import render_row, special_strings
from qlora_kit.text.rows import SourceRow
from qlora_kit.text.templates import render, render_inference
from support.repo import REPO

RECIPES = REPO / "recipes"

ROWS = {
    "plain": {"instruction": "세 가지 기본 색은 무엇인가요?", "input": "", "output": "기본 색은 빨강, 파랑, 노랑입니다."},
    "with_input": {"instruction": "다음 단어를 영어로 번역하세요.", "input": "사과", "output": "apple"},
    # whitespace at both ends of every field: pins each source's stripping (or lack of it)
    "padded": {"instruction": "  Why is the sky blue? \n", "input": "", "output": " \nRayleigh scattering.\n\n"},
    "padded_input": {"instruction": " Add the numbers.", "input": " 2 3 ", "output": "5 "},
    # placeholders inside the data must come out literally
    "braces": {"instruction": "Explain {input} and {eos}.", "input": "", "output": "{output} stays {bos}"},
}


def recipe(name: str, **fixed: bool):
    return load_recipe(str(RECIPES / f"{name}.yaml"), {f"quirks.{q}.fix": v for q, v in fixed.items()})


def kit_forms(name: str, row: dict[str, str], **fixed: bool) -> tuple[str, str]:
    """(training text incl. the BOS string when the recipe adds BOS, inference prompt)."""
    r = recipe(name, **fixed)
    bos, eos = special_strings(r)
    rend = render(r.template, row, bos=bos, eos=eos)
    return (bos if r.template.add_bos else "") + rend.text, render_inference(r.template, row, bos=bos, eos=eos)


# --- llama2-koalpaca ---------------------------------------------------------------------------
# L2K = id4thomas/llama2-koalpaca@059f34b8

L2K_SYSTEM = ("당신은 도움이 되며, 예의바르고, 솔직한 조수입니다. 항상 안전하면서도 가능한 한 도움이 되는 "
              "답변을 해주세요. 아래는 작업을 설명하는 지시사항입니다. 요청을 적절히 완료하는 응답을 "
              "작성해주세요. 조수는 사용자의 질문에 도움이 되고, 상세하며, 정중한 답변을 합니다.")  # utils/input_utils.py:L12


def source_l2k(row: dict[str, str], *, meta_eos: bool = False) -> tuple[str, str]:
    B_INST, E_INST = "[INST]", "[/INST]"  # utils/input_utils.py:L1
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"  # utils/input_utils.py:L2
    user = B_SYS + L2K_SYSTEM + E_SYS + row["instruction"]  # llama_dialog_preprocess, L15-22
    body = f"{B_INST} {user.strip()} {E_INST} {row['output'].strip()}"  # L40-41
    if meta_eos:  # Meta's chat_completion: f"... {answer} " + EOS (quirk eos_without_space)
        body += " "
    text = "<s>" + body + "</s>"  # train_qlora.py:L78-80 (bos_token + text + eos_token)
    inference = f"{B_INST} {user.strip()} {E_INST}"  # inference_example.py:L78-91 (after bos_token)
    return text, inference


@pytest.mark.parametrize("name", ["llama2-koalpaca", "llama2-koalpaca-7b"])
@pytest.mark.parametrize("row", list(ROWS))
def test_llama2_koalpaca_matches_source(name, row):
    assert kit_forms(name, ROWS[row]) == source_l2k(ROWS[row])


@pytest.mark.parametrize("row", list(ROWS))
def test_llama2_koalpaca_eos_with_space_when_fixed(row):
    assert kit_forms("llama2-koalpaca", ROWS[row], eos_without_space=True) == source_l2k(ROWS[row], meta_eos=True)


def test_llama2_koalpaca_literal():
    text, inference = kit_forms("llama2-koalpaca", ROWS["padded"])
    assert text == ("<s>[INST] <<SYS>>\n" + L2K_SYSTEM + "\n<</SYS>>\n\n  Why is the sky blue? [/INST] "
                    "Rayleigh scattering.</s>")
    assert inference == "[INST] <<SYS>>\n" + L2K_SYSTEM + "\n<</SYS>>\n\n  Why is the sky blue? [/INST]"


# --- komt --------------------------------------------------------------------------------------
# KOMT = davidkim205/komt@0c9622e1


def source_komt(row: dict[str, str], *, bos: str = "</s>") -> tuple[str, str]:
    source = "{instruction}\n\n### Response:".format_map(row)  # finetune_with_lora.py:L126
    target = f"{row['output']}</s>"  # L130: f"{example['output']}{tokenizer.eos_token}"
    # the slow tokenizer prepends its BOS, which add_special_tokens made "</s>" (L266-280)
    text = bos + source + target
    # README.md:L117; usage_komt_with_lora.py:L32
    inference = f"### instruction: {row['instruction']}\n\n### Response: "
    return text, inference


@pytest.mark.parametrize("row", list(ROWS))
def test_komt_matches_source(row):
    assert kit_forms("komt", ROWS[row]) == source_komt(ROWS[row])


def test_komt_literal_and_fixed_forms():
    row = ROWS["plain"]
    text, inference = kit_forms("komt", row)
    assert text == "</s>세 가지 기본 색은 무엇인가요?\n\n### Response:기본 색은 빨강, 파랑, 노랑입니다.</s>"
    assert inference == "### instruction: 세 가지 기본 색은 무엇인가요?\n\n### Response: "
    # bos_is_eos fixed: the Llama tokenizer's own <s>
    assert kit_forms("komt", row, bos_is_eos=True)[0] == source_komt(row, bos="<s>")[0]
    # train_infer_prompt_mismatch fixed: inference prompt == training prompt
    assert kit_forms("komt", row, train_infer_prompt_mismatch=True)[1] == "세 가지 기본 색은 무엇인가요?\n\n### Response:"


# --- alpagasus2 ---------------------------------------------------------------------------------
# AG2 = gauss5930/AlpaGasus2-QLoRA@3f70e96f

AG2_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.")
AG2_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.")


def source_alpagasus2(row: dict[str, str]) -> tuple[str, str]:
    if row["input"]:  # training/utils.py:L10-15
        text = (f"{AG2_WITH_INPUT}\n\n### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}"
                f"\n\n### Response:\n{row['output']}")
    else:
        text = f"{AG2_NO_INPUT}\n\n### Instruction:\n{row['instruction']}\n\n### Response:\n{row['output']}"
    # generate.py:L46-47: `if col[i]:` is always true -> no-input form, input dropped
    inference = f"{AG2_NO_INPUT}\n\n### Instruction:\n{row['instruction']}\n\n### Response:\n"
    return "<s>" + text, inference  # SFTTrainer: the tokenizer adds BOS, no EOS (finetune.py:L155-165)


@pytest.mark.parametrize("name", ["alpagasus2", "alpagasus2-13b"])
@pytest.mark.parametrize("row", list(ROWS))
def test_alpagasus2_matches_source(name, row):
    assert kit_forms(name, ROWS[row]) == source_alpagasus2(ROWS[row])


def test_alpagasus2_literal_and_fixed_forms():
    row = ROWS["with_input"]
    text, inference = kit_forms("alpagasus2", row)
    assert text == ("<s>Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                    "다음 단어를 영어로 번역하세요.\n\n### Input:\n사과\n\n### Response:\napple")
    assert "사과" not in inference  # generation drops the input (quirk generation_drops_input)
    # no_eos_in_training_text fixed: EOS right after the output
    assert kit_forms("alpagasus2", row, no_eos_in_training_text=True)[0] == text + "</s>"
    # generation_drops_input fixed: the with-input training prompt at inference
    assert kit_forms("alpagasus2", row, generation_drops_input=True)[1] == text[len("<s>"):-len("apple")]


# --- polyglot-koalpaca --------------------------------------------------------------------------
# POLY = shchoice/LLM-Lab@fa3ab8b9; TRAIN cell 26, transcribed line for line: the triple-quoted
# strings mix "\n" escapes with real line breaks, which is where the triple newlines come from.
POLY_PROMPT_TEMPLATE = {
    "prompt_input": """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n
아래는 작업을 설명하는 명령어와 추가적 맥락을 제공하는 입력이 짝을 이루는 예제입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n
### Instruction(명령어):\n{instruction}\n\n
### Input(입력):\n{input}\n\n
### Response(응답):\n""",

    "prompt_no_input": """Below is an instruction that describes a task. Write a response that appropriately completes the request.\n
아래는 작업을 설명하는 명령어입니다. 명령어에 따른 요청을 적절히 완료하는 응답을 작성하세요.\n\n
### Instruction(명령어):\n{instruction}\n\n
### Response(응답):\n""",
}
# EVAL cell 17, %-formatted
POLY_EVAL_PROMPT_DICT = {
    "prompt_input": (
        "아래는 작업을 설명하는 명령어와 추가적 맥락을 제공하는 입력이 짝을 이루는 예제입니다.\n"
        "명령어와 입력을 깊게 이해하고 꼼꼼하고 차분하게 응답을 작성하세요.\n\n"
        "### Instruction(명령어):%s\n"
        "### Input(입력):%s\n"
        "### Response(응답):"
    ),
    "prompt_no_input": (
        "아래는 작업을 설명하는 명령어입니다.\n"
        "명령어를 깊게 이해하고 꼼꼼하고 차분하게 응답을 작성하세요.\n"
        "### Instruction(명령어):%s\n"
        "### Response(응답):"
    ),
}


def source_polyglot(row: dict[str, str], *, fixed_eval: bool = False) -> tuple[str, str]:
    has_input = row.get("input", "") != ""  # TRAIN cell 60
    t = POLY_PROMPT_TEMPLATE["prompt_input" if has_input else "prompt_no_input"]
    source = t.format_map(row)
    target = f"{row['output']}<|endoftext|>"  # TRAIN cell 62; no BOS in this tokenizer
    if fixed_eval:
        return source + target, source
    if has_input:
        inference = POLY_EVAL_PROMPT_DICT["prompt_input"] % (row["instruction"], row["input"])
    else:
        inference = POLY_EVAL_PROMPT_DICT["prompt_no_input"] % (row["instruction"],)
    return source + target, inference


@pytest.mark.parametrize("row", list(ROWS))
def test_polyglot_matches_source(row):
    assert kit_forms("polyglot-koalpaca", ROWS[row]) == source_polyglot(ROWS[row])


@pytest.mark.parametrize("row", list(ROWS))
def test_polyglot_eval_prompt_fixed_is_training_prompt(row):
    got = kit_forms("polyglot-koalpaca", ROWS[row], eval_prompt_differs=True)
    assert got == source_polyglot(ROWS[row], fixed_eval=True)


def test_polyglot_literal_triple_newlines():
    text, inference = kit_forms("polyglot-koalpaca", ROWS["plain"])
    assert text == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n아래는 작업을 설명하는 명령어입니다. 명령어에 따른 요청을 적절히 완료하는 응답을 "
                    "작성하세요.\n\n\n### Instruction(명령어):\n세 가지 기본 색은 무엇인가요?\n\n\n### Response(응답):\n"
                    "기본 색은 빨강, 파랑, 노랑입니다.<|endoftext|>")
    assert inference == ("아래는 작업을 설명하는 명령어입니다.\n명령어를 깊게 이해하고 꼼꼼하고 차분하게 응답을 "
                         "작성하세요.\n### Instruction(명령어):세 가지 기본 색은 무엇인가요?\n### Response(응답):")


def test_size_variants_render_like_their_base():
    for variant, base in (("llama2-koalpaca-7b", "llama2-koalpaca"), ("alpagasus2-13b", "alpagasus2")):
        v, b = recipe(variant), recipe(base)
        for section in ("template", "preprocess", "qlora", "lora", "merge", "quirks"):
            assert getattr(v, section) == getattr(b, section), (variant, section)
        assert v.model.name != b.model.name


# --- the same rows through the tokenizer path ---------------------------------------------------

TOKENIZER_CASES = {
    # name: (tiny arch, loss on the prompt?, first id is BOS <s>?, first id is </s>?, EOS last and in loss?)
    "llama2-koalpaca": ("llama", True, True, False, "masked"),
    "komt": ("llama", False, False, True, "learned"),
    "alpagasus2": ("llama", True, True, False, "absent"),
    "polyglot-koalpaca": ("gpt_neox", False, False, False, "learned"),
}


@pytest.fixture(scope="module")
def toks(tiny_llama, tiny_neox):
    return {"llama": tiny_llama, "gpt_neox": tiny_neox}


@pytest.mark.parametrize("name", list(TOKENIZER_CASES))
@pytest.mark.parametrize("row", list(ROWS))
def test_tokenizer_path_mask_boundary(name, row, toks):
    from qlora_kit.text.tokenizer import load_tokenizer

    arch, prompt_loss, starts_bos, starts_eos, eos = TOKENIZER_CASES[name]
    r = recipe(name)
    tok = load_tokenizer(toks[arch], r.template)
    rend = render(r.template, ROWS[row], bos=tok.bos, eos=tok.eos)
    ids, labels, n_prompt = tokenize_example(rend.prompt, rend.completion, tok, r.template, r.preprocess)
    bos = [tok.bos_id] if r.template.add_bos else []
    if prompt_loss:  # joint + full loss: one encode of the whole text, no prompt count recorded
        assert n_prompt is None
        n_prompt = len(bos + tok.encode(rend.prompt))
    # the boundary: the first n_prompt ids are exactly the prompt's own tokens (joint
    # tokenization did not merge across it), and the rest are the completion's
    assert ids[:n_prompt] == bos + tok.encode(rend.prompt)
    assert ids == bos + tok.encode(rend.prompt + rend.completion)
    if prompt_loss:
        assert all(lab != IGNORE for lab in labels[:n_prompt])
    else:
        assert labels[:n_prompt] == [IGNORE] * n_prompt
    if starts_bos:
        assert ids[0] == tok.bos_id == tok.hf.convert_tokens_to_ids("<s>")
    if starts_eos:  # komt: BOS forced to </s>
        assert ids[0] == tok.eos_id == tok.bos_id
    if arch == "gpt_neox":
        assert tok.bos_id is None
    body = ids[1:] if r.template.add_bos else ids
    if eos == "absent":
        assert tok.eos_id not in body and labels == ids
    else:
        assert ids[-1] == tok.eos_id and tok.eos_id not in body[:-1]
        assert labels[n_prompt:-1] == ids[n_prompt:-1]
        assert labels[-1] == (IGNORE if eos == "masked" else tok.eos_id)

    # render --show-loss reports the same boundary
    shown = render_row(r, SourceRow("golden.json", 1, ROWS[row]), tok.bos, tok.eos, tok)
    flags = [f for _, f in shown["tokens"]]
    assert flags == [lab != IGNORE for lab in labels]
    assert shown["counts"] == {"tokens": len(ids), "prompt_tokens": n_prompt,
                               "loss_tokens": sum(lab != IGNORE for lab in labels)}
    assert shown["text"] == (tok.bos if r.template.add_bos else "") + rend.text


def test_render_row_without_tokenizer_uses_arch_specials():
    r = recipe("polyglot-koalpaca")
    shown = render_row(r, SourceRow("golden.json", 7, ROWS["plain"]), *special_strings(r))
    assert shown["origin"] == "golden.json:7" and not shown["has_input"]
    assert shown["completion"].endswith("<|endoftext|>") and "tokens" not in shown
