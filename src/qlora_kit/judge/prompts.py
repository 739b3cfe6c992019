"""Judge prompts: AlpaGasus's (the source's, byte for byte) and komt's (ours: the source never published it)."""
from __future__ import annotations

import re
from typing import Any, Mapping


DEFAULT_API_KEY_ENV = "QLORA_KIT_JUDGE_API_KEY"


# AlpaGasus2 judge, copied byte for byte from AG2@3f70e96:evaluation/AlpaGasus-Evaluation/
# evaluation.py:L69-77 (gen_prompt: sys_prompt, prompt_template, criteria). The same text is in
# GPT4LIFE:evaluation/eval.py:L68-76 (the original AlpaGasus judge).
ALPAGASUS_SYSTEM_PROMPT = (
    "You are a helpful and precise assistant for checking the quality of the answer."
)


ALPAGASUS_USER_TEMPLATE = (
    "[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{answer_1}\n\n"
    "[The End of Assistant 1's Answer]\n\n[The Start of Assistant 2's Answer]\n{answer_2}\n\n"
    "[The End of Assistant 2's Answer]\n\n[System]\n{criteria}\n\n"
)


ALPAGASUS_CRITERIA = (
    "We would like to request your feedback on the performance of two AI assistants in response "
    "to the user question displayed above.\nPlease rate the helpfulness, relevance, accuracy, "
    "level of details of their responses. Each assistant receives an overall score on a scale of "
    "1 to 10, where a higher score indicates better overall performance.\nPlease first output a "
    "single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space. In the subsequent line, please "
    "provide a comprehensive explanation of your evaluation, avoiding any potential bias and "
    "ensuring that the order in which the responses were presented does not affect your judgment."
)


# evaluation.py:L127-135: temperature 0.0, max_tokens 256, top_p 1.0.
ALPAGASUS_GENERATION = {"temperature": 0.0, "max_tokens": 256, "top_p": 1.0}


# OURS, NOT THE SOURCE'S: komt never published the prompt it gave ChatGPT (README.md:L348 only
# says answers were scored 0-5). This prompt asks for the format the recorded judge outputs show
# ("4" or "Score: 4" alone on the first line, then an explanation), in English and Korean so a
# Korean-capable judge reads it either way. Placeholders: {question} and {answer}; any other
# braces in a caller's prompt are left alone (see komt_messages).
DEFAULT_KOMT_JUDGE_PROMPT = """\
You are a strict and fair grader. Below is a question, usually written in Korean, and a \
candidate answer to it. Judge the answer's helpfulness, relevance, accuracy and level of detail. \
An answer in a language other than the question's is less helpful.

[Question]
{question}

[Candidate Answer]
{answer}

Give the answer one integer score from 0 to 5:
5 = excellent: correct, complete and clearly written
4 = good: correct with minor omissions or flaws
3 = acceptable: useful but with clear gaps or small errors
2 = poor: partly relevant, or with significant errors
1 = very poor: mostly wrong, irrelevant or unhelpful
0 = no answer, a refusal, or nonsense

Output format: on the first line write only the score, a single integer from 0 to 5, and \
nothing else. From the second line on, briefly explain your score.

위 답변을 0점부터 5점까지 정수 하나로 평가하세요. 첫 줄에는 점수(0~5 사이의 정수)만 쓰고, \
둘째 줄부터 평가 이유를 간단히 설명하세요."""


# Ours as well (the source's settings are unknown): deterministic, enough room for a short reason.
KOMT_GENERATION = {"temperature": 0.0, "max_tokens": 256, "top_p": 1.0}


_KOMT_PLACEHOLDER = re.compile(r"\{(question|answer)\}")


def komt_messages(
    question: str, answer: str, prompt: str = DEFAULT_KOMT_JUDGE_PROMPT
) -> list[dict[str, str]]:
    """Chat messages for one komt-style judgement: a single user message.

    A single user turn (no system turn) because some chat templates served by local judges
    reject or mangle a system role. Placeholders are filled in one pass, so a question that
    itself contains the text "{answer}" is not filled twice.
    """
    found = set(_KOMT_PLACEHOLDER.findall(prompt))
    missing = {"question", "answer"} - found
    if missing:
        raise ValueError(
            "komt judge prompt lacks the placeholder(s) "
            + ", ".join("{" + m + "}" for m in sorted(missing))
        )
    values = {"question": question, "answer": answer}
    content = _KOMT_PLACEHOLDER.sub(lambda m: values[m.group(1)], prompt)
    return [{"role": "user", "content": content}]


def alpagasus_messages(question: str, answer_1: str, answer_2: str) -> list[dict[str, str]]:
    """Chat messages for one AlpaGasus pairwise judgement (evaluation.py gen_prompt + L117-123)."""
    prompt = ALPAGASUS_USER_TEMPLATE.format(
        question=question, answer_1=answer_1, answer_2=answer_2, criteria=ALPAGASUS_CRITERIA
    )
    return [
        {"role": "system", "content": ALPAGASUS_SYSTEM_PROMPT},
        {"role": "user", "content": prompt},
    ]


def alpagasus_question(row: Mapping[str, Any], test_set: str) -> str:
    """The question text the judge sees for one row of a koala / sinstruct / vicuna file.

    evaluation.py:L91-107: koala uses `prompt`, vicuna `text`, sinstruct `instruction`, and for
    Self-Instruct "{instruction} Input: {input}" when the single instance has a non-empty input
    (the generation step dropped that input, but the judge sees it).
    """
    if test_set == "koala":
        return row["prompt"]
    if test_set == "vicuna":
        return row["text"]
    if test_set == "sinstruct":
        instances = row["instances"]
        if len(instances) != 1:  # evaluation.py asserts the same
            raise ValueError(f"sinstruct row {row.get('id')!r}: expected 1 instance")
        if instances[0]["input"]:
            return "{instruction} Input: {input}".format(
                instruction=row["instruction"], input=instances[0]["input"]
            )
        return row["instruction"]
    raise ValueError(f"unknown AlpaGasus test set {test_set!r} (koala, sinstruct, vicuna)")


def alpagasus_judge_question(instruction: str, input: str = "") -> str:
    """evaluation.py:L101-107: "{instruction} Input: {input}" when there is an input."""
    return f"{instruction} Input: {input}" if input else instruction
