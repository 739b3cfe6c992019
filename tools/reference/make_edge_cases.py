"""Write tests/fixtures/golden/edge_cases.jsonl: hand-written edge cases plus length-boundary rows.

    ~/.cache/qlora-kit/reference-venvs/l2k/bin/python tools/reference/make_edge_cases.py \
        --tokenizer HUB_DIR [--out tests/fixtures/golden/edge_cases.jsonl] [--check]

Every row is {"case", "instruction", "input", "output"}; `case` names what the row probes (the
kit and the reference scripts read only the three fields). The long rows are generated here,
deterministically: a fixed filler text, then " x" pieces (one token each) until the row's length
as llama2-koalpaca counts it (its whole text + the extra BOS of `tokenizer(text)`,
train_qlora.py:L86-87) is exactly 1022, 1023, 1024 or 1025; and rows far past komt's 2048 and
alpagasus2's 256 limits. HUB_DIR is the 2023 hub-layout tokenizer (the counting needs
transformers 4.31's fast tokenizer, hence the l2k venv). `--check` regenerates and compares with
the committed file instead of writing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "golden" / "edge_cases.jsonl"


def row(case: str, instruction: str, output: str, input: str = "") -> dict[str, str]:
    return {"case": case, "instruction": instruction, "input": input, "output": output}


CASES = [
    # literal special-token text inside the data (parsed as special ids by the fast tokenizer)
    row("bos_literal_in_instruction", "What does <s> mean in a Llama prompt?", "It marks the start of a text."),
    row("eos_literal_mid_output", "Split this.", "First part</s>second part"),
    row("eos_literal_end_output_spaces", "End with a stop token.", "Done.</s>   "),
    row("eos_literal_spaces_both_sides", "Spaces around the stop.", "Before   </s>   after"),
    row("unk_literal", "Is <unk> a word?", "No, <unk> is the unknown token."),
    row("text_right_after_specials", "<s>hello and </s>world", "<unk>x then </s>y"),
    row("special_literals_korean", "질문 <s>안녕</s>하세요", "답변</s>입니다 <unk>끝"),
    # whitespace at the prompt/answer boundary and at the very start of the text
    row("leading_spaces_instruction", "   Leading spaces before the instruction.", "Fine."),
    row("leading_newline_instruction", "\nStarts with a newline.", "Fine."),
    row("trailing_space_newline_instruction", "Question ends with space and newlines?  \n\n", "Answer."),
    row("leading_spaces_output", "Answer with leading spaces.", "   three spaces first"),
    row("leading_newline_output", "Answer after a newline.", "\nsecond line"),
    row("trailing_newlines_output", "Answer ending in newlines.", "the end\n\n"),
    row("trailing_spaces_output", "Answer ending in spaces.", "the end   "),
    row("korean_leading_space", " 한국어 지시문이 공백으로 시작합니다.", " 답변도 공백으로 시작합니다. "),
    # runs of spaces: sentencepiece and transformers 5 split these differently
    row("code_indentation", "Write a function.",
        "def f(x):\n    if x:\n        return x\n    return None\n\n\tfor i in range(3):\n\t\tprint(i)"),
    row("return_after_indent", "Show the return.", "\n    return"),
    row("double_space_after_stop", "Two sentences.", "First sentence.  Second sentence.  Third one."),
    row("korean_double_space", "두 문장.", "첫 문장입니다.  두 번째 문장입니다."),
    row("space_runs", "a    b", "x     y      z"),
    # characters outside plain text
    row("emoji", "이모지로 답해 주세요 🙂", "좋아요 👍🏽 🎉 👨‍👩‍👧 끝"),
    row("byte_fallback_rare_cjk", "Rare characters: 𠀀 𪚥", "Answer: 𠀀𪚥 ok"),
    row("unicode_spaces", "no\u00a0break\u3000ideographic\u200bzero-width", "a\u00a0b\u3000c"),
    row("crlf_and_tabs", "Line one\r\nLine two\tTabbed", "Out\r\nput\t."),
    row("c0_controls", "Bell \x07 and escape \x1b[0m in the instruction", "vertical\x0btab form\x0cfeed \x01"),
    row("nul_character", "Before\x00after", "Out\x00put"),
    # rows the kit's cleaning would drop but the sources trained on
    row("empty_output", "Reply with nothing.", ""),
    row("whitespace_only_output", "Reply with spaces.", "   \n  "),
    row("empty_instruction", "", "An answer without a question."),
    # template look-alikes and placeholders inside the data
    row("template_markers_in_output", "Quote the markers.", "### Response:\n[INST] <<SYS>> {output} [/INST]"),
    row("placeholder_braces", "Fill {instruction} and {{x}}", "{eos} stays {output}"),
    # alpagasus2's with-input form; the other recipes ignore input
    row("with_input", "Summarize the input.", "A summary.", input="  The input text, with spaces.  \n"),
    row("with_input_korean", "입력을 요약하세요.", "요약입니다.", input="입력 문장입니다.\n\n둘째 줄"),
]

FILLER = ("한국어 문장을 길게 이어 씁니다. The quick brown fox jumps over the lazy dog. "
          "숫자 12345와 기호 (괄호), 그리고 쉼표, 마침표. ")


def l2k_counted_len(tok, instruction: str, output: str) -> int:
    """The length llama2-koalpaca compared with 1024 (see llama2_koalpaca.py for the copied code).

    Imported here, not at the top: the tests import CASES without the era libraries."""
    from llama2_koalpaca import map_data_to_lambda_text

    text = tok.bos_token + map_data_to_lambda_text({"instruction": instruction, "output": output}) + tok.eos_token
    return len(tok(text)["input_ids"])


def boundary_row(tok, target: int, instruction: str = "", case: str = "") -> dict[str, str]:
    instruction = instruction or f"긴 답변을 써 주세요 ({target})."
    base = (FILLER * 9).rstrip()
    n0 = l2k_counted_len(tok, instruction, base)
    assert n0 < target, (n0, target)
    out = base + " x" * (target - n0)
    n = l2k_counted_len(tok, instruction, out)
    assert n == target, (n, target)
    return row(case or f"l2k_counted_{target}", instruction, out)


def long_rows(tok) -> list[dict[str, str]]:
    rows = [boundary_row(tok, t) for t in (1022, 1023, 1024, 1025)]
    # komt: 2048 (model_max_length) - one row truncated inside the answer, one whose prompt
    # alone fills the limit (no answer token left after truncation)
    rows.append(row("komt_answer_past_2048", "아주 긴 답변을 써 주세요.", FILLER * 27))
    rows.append(row("komt_prompt_past_2048", "다음 글을 읽고 답하세요. " + FILLER * 27, "짧은 답."))
    # alpagasus2: 256 (cutoff_len) - inside the answer, and inside the prompt (input)
    rows.append(row("ag2_answer_past_256", "Write at length.", FILLER * 4))
    rows.append(row("ag2_prompt_past_256", "Answer after the input.", "Short.", input=FILLER * 4))
    # at the boundary with literal special tokens in the text: the fast tokenizer puts a "▁"
    # after each, so a tokenizer that does not counts fewer tokens and can keep a dropped row
    for t in (1023, 1024):
        rows.append(boundary_row(tok, t, f"<s>문서</s>를 요약하세요 <unk> ({t}).", f"l2k_counted_{t}_special_literals"))
    return rows


def render(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, type=Path)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.tokenizer))
    text = render(CASES + long_rows(tok))
    if args.check:
        same = args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from a fresh run'}")
        sys.exit(0 if same else 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {text.count(chr(10))} rows")


if __name__ == "__main__":
    main()
