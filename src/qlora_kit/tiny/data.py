"""Generate the sample instruction data set that ships with the `tiny` recipe.

The `tiny` recipe trains a tiny, randomly initialised Llama-shaped model (its shape is in
recipes/tiny.yaml; the sentencepiece tokenizer is trained on this very text) with LoRA in a few
minutes on a CPU. Its report has to show that the model visibly learned, so the data is built for that:

- templated, regular tasks (single-digit arithmetic, lookup tables we wrote ourselves, copying,
  reversing and counting letters), so the answer *format* is learnable within a few hundred steps;
- short answers (1-8 words, at most 40 characters), so the model reaches EOS within a few tokens;
- each fact asked in several phrasings, so a held-out row usually shares its fact and its answer
  pattern with training rows and validation loss falls clearly;
- about half Korean and half English, as the recipes reproduced by this kit are Korean tuning runs.

Every string here was written for this project; nothing is copied from another data set.
The output is deterministic for a given seed: only `random.Random(seed)` decides which facts are
sampled, which phrasing each row gets and the row order.

Run:
    python -m qlora_kit.tiny.data                  # rewrite the shipped JSON (seed 0)
    python -m qlora_kit.tiny.data --check          # exit 1 if the shipped JSON differs
    python -m qlora_kit.tiny.data --stats          # print the per-task count table (README)
    python -m qlora_kit.tiny.data --out x.json --seed 3
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from qlora_kit.artifacts import write_atomic
from qlora_kit.tiny.tables import (
    ANIMAL_SOUNDS,
    CAPITALS,
    COLOURS,
    EXTRA_WORDS_EN,
    EXTRA_WORDS_KO,
    MONTHS_EN,
    MONTHS_KO,
    OPPOSITES_EN,
    OPPOSITES_KO,
    WEEKDAYS_EN,
    WEEKDAYS_KO,
    WORDS,
    and_,
    cap,
    obj,
    topic,
)

SHIPPED_PATH = Path(__file__).resolve().parent / "assets" / "tiny_alpaca.json"
MAX_OUTPUT_CHARS = 40


class Tagged(NamedTuple):
    """One row plus the task and language it was generated for (used for counts and tests)."""

    task: str
    lang: str  # "en" or "ko": the language of the instruction
    row: dict


# ---------------------------------------------------------------------------------------------
# Task builders. Each returns (instruction, input, output) triples for one language; the counts
# are fixed here so the data set's shape does not depend on the seed, only its sampling does.
# ---------------------------------------------------------------------------------------------

Triple = tuple[str, str, str]


def _numeric(rng: random.Random, lang: str, pairs: list[tuple[int, int]], answer: Callable[[int, int], int],
             en: Callable[[int, int], list[str]], ko: Callable[[int, int], list[str]]) -> list[Triple]:
    """One question per pair, phrased by the language's template list; the answer is a number."""
    ask, end = (en, ".") if lang == "en" else (ko, "입니다.")
    return [(rng.choice(ask(a, b)), "", f"{answer(a, b)}{end}") for a, b in pairs]


def _addition(rng: random.Random, lang: str) -> list[Triple]:
    pairs = rng.sample([(a, b) for a in range(10) for b in range(10)], 40)
    return _numeric(rng, lang, pairs, lambda a, b: a + b,
                    lambda a, b: [f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Compute {a} + {b}.",
                                  f"What do you get when you add {b} to {a}?",
                                  f"What is the sum of {a} and {b}?"],
                    lambda a, b: [f"{a} 더하기 {topic(str(b))} 얼마인가요?",
                                  f"{a}에 {obj(str(b))} 더하면 얼마인가요?",
                                  f"{a} + {b}의 값은 무엇인가요?",
                                  f"{and_(str(a))} {b}의 합은 얼마인가요?",
                                  f"{a} 더하기 {obj(str(b))} 계산하세요."])


def _subtraction(rng: random.Random, lang: str) -> list[Triple]:
    pairs = rng.sample([(a, b) for a in range(10) for b in range(a + 1)], 30)
    return _numeric(rng, lang, pairs, lambda a, b: a - b,
                    lambda a, b: [f"What is {a} minus {b}?", f"Subtract {b} from {a}.",
                                  f"Compute {a} - {b}.", f"What do you get when you take {b} from {a}?",
                                  f"What is {a} take away {b}?"],
                    lambda a, b: [f"{a} 빼기 {topic(str(b))} 얼마인가요?",
                                  f"{a}에서 {obj(str(b))} 빼면 얼마인가요?",
                                  f"{a} - {b}의 값은 무엇인가요?",
                                  f"{and_(str(a))} {b}의 차는 얼마인가요?"])


def _larger(rng: random.Random, lang: str) -> list[Triple]:
    pairs = rng.sample([(a, b) for a in range(10) for b in range(10) if a != b], 25)
    return _numeric(rng, lang, pairs, max,
                    lambda a, b: [f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?",
                                  f"Pick the larger number: {a} or {b}."],
                    lambda a, b: [f"{and_(str(a))} {b} 중에서 더 큰 수는 무엇인가요?",
                                  f"{and_(str(a))} {b} 중 어느 수가 더 큰가요?",
                                  f"더 큰 수를 고르세요: {a}, {b}"])


def _next_number(rng: random.Random, lang: str) -> list[Triple]:
    return _numeric(rng, lang, [(n, 1) for n in range(20)], lambda n, one: n + one,
                    lambda n, _: [f"What number comes after {n}?", f"What is the next number after {n}?",
                                  f"Which number follows {n}?"],
                    lambda n, _: [f"{n} 다음 숫자는 무엇인가요?", f"{n} 다음에 오는 수는 무엇인가요?",
                                  f"{n}보다 1 큰 수는 무엇인가요?"])


def _capitals(rng: random.Random, lang: str) -> list[Triple]:
    out = []
    # Every country is asked forward once; half of them are also asked in reverse.
    reverse = set(rng.sample(range(len(CAPITALS)), len(CAPITALS) // 2))
    for i, (c_en, c_ko, cap_en, cap_ko) in enumerate(CAPITALS):
        if lang == "en":
            q = rng.choice([f"What is the capital of {c_en}?",
                            f"Which city is the capital of {c_en}?",
                            f"Name the capital city of {c_en}.",
                            f"Tell me the capital of {c_en}."])
            out.append((q, "", f"{cap_en}."))
            if i in reverse:
                q = rng.choice([f"{cap_en} is the capital of which country?",
                                f"Which country has {cap_en} as its capital?"])
                out.append((q, "", f"{cap(c_en)}."))
        else:
            q = rng.choice([f"{c_ko}의 수도는 어디인가요?", f"{c_ko}의 수도는 어느 도시인가요?",
                            f"{c_ko}의 수도를 알려 주세요.", f"{c_ko}의 수도 이름은 무엇인가요?"])
            out.append((q, "", f"{cap_ko}입니다."))
            if i in reverse:
                q = rng.choice([f"{topic(cap_ko)} 어느 나라의 수도인가요?",
                                f"{obj(cap_ko)} 수도로 하는 나라는 어디인가요?"])
                out.append((q, "", f"{c_ko}입니다."))
    return out


Phrasings = Callable[[str], list[str]]


def _cycle(lang: str, names: list[str], pick: Callable[[list[str]], list[str]],
           after: tuple[Phrasings, Phrasings], before: tuple[Phrasings, Phrasings]) -> list[Triple]:
    """Next and previous item of a cycle (weekdays, months); `pick` chooses the phrasings asked."""
    k = 0 if lang == "en" else 1
    end = "." if lang == "en" else "입니다."
    out = []
    for i, d in enumerate(names):
        nxt, prv = names[(i + 1) % len(names)], names[(i - 1) % len(names)]
        out += [(q, "", f"{nxt}{end}") for q in pick(after[k](d))]
        out += [(q, "", f"{prv}{end}") for q in pick(before[k](d))]
    return out


def _weekdays(rng: random.Random, lang: str) -> list[Triple]:
    # Two phrasings per fact: there are only 14 facts, and the week is a cycle worth seeing.
    return _cycle(lang, WEEKDAYS_EN if lang == "en" else WEEKDAYS_KO, lambda qs: rng.sample(qs, 2),
                  (lambda d: [f"What day comes after {d}?", f"Which day of the week follows {d}?",
                              f"What is the day after {d}?"],
                   lambda d: [f"{d} 다음은 무슨 요일인가요?", f"{d} 다음 날은 무슨 요일인가요?",
                              f"{d} 다음에 오는 요일은 무엇인가요?"]),
                  (lambda d: [f"What day comes before {d}?", f"Which day of the week comes right before {d}?",
                              f"What is the day before {d}?"],
                   lambda d: [f"{d} 전날은 무슨 요일인가요?", f"{d} 바로 전 요일은 무엇인가요?",
                              f"{d} 앞에 오는 요일은 무엇인가요?"]))


def _months(rng: random.Random, lang: str) -> list[Triple]:
    return _cycle(lang, MONTHS_EN if lang == "en" else MONTHS_KO, lambda qs: [rng.choice(qs)],
                  (lambda m: [f"What month comes after {m}?", f"Which month follows {m}?",
                              f"What is the month after {m}?"],
                   lambda m: [f"{m} 다음 달은 몇 월인가요?", f"{m} 다음에 오는 달은 무엇인가요?"]),
                  (lambda m: [f"What month comes before {m}?", f"Which month comes right before {m}?",
                              f"What is the month before {m}?"],
                   lambda m: [f"{m} 이전 달은 몇 월인가요?", f"{m} 바로 앞의 달은 무엇인가요?"]))


def _opposites(rng: random.Random, lang: str) -> list[Triple]:
    table = OPPOSITES_EN if lang == "en" else OPPOSITES_KO
    out = []
    for a, b in table:
        for w, o in ((a, b), (b, a)):
            if lang == "en":
                q = rng.choice([(f"What is the opposite of '{w}'?", ""),
                                (f"Give the opposite of the word '{w}'.", ""),
                                (f"Name the antonym of '{w}'.", ""),
                                ("Write the opposite of this word.", w)])
                out.append((q[0], q[1], f"{cap(o)}."))
            else:
                q = rng.choice([(f"'{w}'의 반대말은 무엇인가요?", ""),
                                (f"{and_(w, quote=True)} 뜻이 반대인 말은 무엇인가요?", ""),
                                (f"'{w}'의 반의어를 알려 주세요.", ""),
                                ("다음 단어의 반대말을 쓰세요.", w)])
                out.append((q[0], q[1], f"'{o}'입니다."))
    return out


def _once_or_twice(rng: random.Random, table: list, ask: Callable[..., tuple[list[str], str]]) -> list[Triple]:
    """Every item asked once; a random half of them a second time in another phrasing."""
    twice = set(rng.sample(range(len(table)), len(table) // 2))
    out = []
    for i, item in enumerate(table):
        phrasings, answer = ask(*item)
        out += [(q, "", answer) for q in rng.sample(phrasings, 2 if i in twice else 1)]
    return out


def _colours(rng: random.Random, lang: str) -> list[Triple]:
    en = lang == "en"
    return _once_or_twice(rng, COLOURS, lambda x_en, x_ko, c_en, c_ko: (
        [f"What colour is {x_en}?", f"What color is {x_en}?", f"Name the usual colour of {x_en}.",
         f"What is the colour of {x_en}?"] if en else
        [f"{topic(x_ko)} 무슨 색인가요?", f"{x_ko}의 색깔은 무엇인가요?", f"{topic(x_ko)} 보통 어떤 색인가요?",
         f"{x_ko}의 색을 알려 주세요."], f"{cap(c_en)}." if en else f"{c_ko}입니다."))


def _translation(rng: random.Random, lang: str) -> list[Triple]:
    """English instructions translate English -> Korean; Korean ones Korean -> English."""
    to_ko = lang == "en"
    out = []
    no_input = set(rng.sample(range(len(WORDS)), len(WORDS) // 2))
    for i, (en, ko) in enumerate(WORDS):
        src, tgt = (en, ko) if to_ko else (ko, en)
        out.append((rng.choice(["Translate this word into Korean.", "Give the Korean word for this.",
                                "What is this word in Korean?"] if to_ko else
                               ["다음 단어를 영어로 번역하세요.", "다음 단어는 영어로 무엇인가요?",
                                "이 단어를 영어로 바꾸어 주세요."]), src, tgt))
        if i in no_input:
            out.append((rng.choice([f"What is the Korean word for '{en}'?", f"How do you say '{en}' in Korean?",
                                    f"Translate '{en}' into Korean."] if to_ko else
                                   [f"{obj(ko, quote=True)} 영어로 하면 무엇인가요?", f"'{ko}'의 영어 단어는 무엇인가요?",
                                    f"{topic(ko, quote=True)} 영어로 무엇인가요?"]), "", tgt))
    return out


def _animal_sounds(rng: random.Random, lang: str) -> list[Triple]:
    en = lang == "en"
    return _once_or_twice(rng, ANIMAL_SOUNDS, lambda a_en, s_en, a_ko, s_ko: (
        [f"What sound does {a_en} make?", f"What does {a_en} say?", f"How does {a_en} sound?"] if en else
        [f"{topic(a_ko)} 어떻게 우나요?", f"{topic(a_ko)} 어떤 소리를 내나요?", f"{a_ko}의 울음소리는 무엇인가요?"],
        f"{cap(s_en)}." if en else f"{s_ko}."))


def _word_pool(lang: str) -> list[str]:
    if lang == "en":
        return [en for en, _ in WORDS] + EXTRA_WORDS_EN
    return [ko for _, ko in WORDS] + EXTRA_WORDS_KO


def _repeat(rng: random.Random, lang: str) -> list[Triple]:
    out = []
    for w in rng.sample(_word_pool(lang), 20):
        if lang == "en":
            q = rng.choice([("Repeat the word exactly.", w), ("Copy the following word.", w),
                            ("Write this word again.", w), (f"Repeat the word: {w}", "")])
        else:
            q = rng.choice([("다음 단어를 그대로 쓰세요.", w), ("아래 단어를 똑같이 따라 쓰세요.", w),
                            ("다음 단어를 한 번 더 쓰세요.", w), (f"다음 단어를 따라 쓰세요: {w}", "")])
        out.append((q[0], q[1], w))
    return out


def _reverse(rng: random.Random, lang: str) -> list[Triple]:
    # At least two characters and not a palindrome, so the answer differs from the input.
    pool = [w for w in _word_pool(lang) if len(w) >= 2 and w != w[::-1]]
    if lang == "en":
        pool = [w for w in pool if len(w) <= 6]  # short: reversed words tokenise into many pieces
    out = []
    for w in rng.sample(pool, 15):
        if lang == "en":
            q = rng.choice(["Spell the word backwards.", "Reverse the letters of this word.",
                            "Write this word in reverse order."])
        else:
            q = rng.choice(["다음 단어를 거꾸로 쓰세요.", "다음 단어의 글자 순서를 뒤집으세요."])
        out.append((q, w, w[::-1]))
    return out


def _count_letters(rng: random.Random, lang: str) -> list[Triple]:
    out = []
    for w in rng.sample(_word_pool(lang), 20):
        n = len(w)  # Korean: syllable blocks, which is what 글자 counts
        if lang == "en":
            q = rng.choice([(f"How many letters are in the word '{w}'?", ""),
                            (f"How many letters does '{w}' have?", ""),
                            ("Count the letters in this word.", w),
                            ("How many letters does this word have?", w)])
            out.append((q[0], q[1], f"{n}."))
        else:
            q = rng.choice([(f"{topic(w, quote=True)} 몇 글자인가요?", ""),
                            (f"'{w}'의 글자 수는 몇 개인가요?", ""),
                            ("다음 단어는 몇 글자인가요?", w),
                            ("다음 단어의 글자 수를 세어 보세요.", w)])
            out.append((q[0], q[1], f"{n}글자입니다."))
    return out


TASKS: dict[str, Callable[[random.Random, str], list[Triple]]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "larger_number": _larger,
    "next_number": _next_number,
    "capital_city": _capitals,
    "weekday": _weekdays,
    "month": _months,
    "opposite": _opposites,
    "colour": _colours,
    "translation": _translation,
    "animal_sound": _animal_sounds,
    "repeat_word": _repeat,
    "reverse_word": _reverse,
    "count_letters": _count_letters,
}
LANGS = ("en", "ko")


def generate_tagged(seed: int = 0) -> list[Tagged]:
    """All rows with their task and language, in final (shuffled) order."""
    rng = random.Random(seed)
    tagged: list[Tagged] = []
    seen: dict[tuple[str, str], str] = {}
    for task, build in TASKS.items():
        for lang in LANGS:
            for instruction, inp, output in build(rng, lang):
                key = (instruction, inp)
                if key in seen:
                    # A generator bug, not bad luck: every task asks each fact in distinct words.
                    raise ValueError(f"{task}/{lang}: duplicate prompt {key!r} "
                                     f"(outputs {seen[key]!r} and {output!r})")
                if len(output) > MAX_OUTPUT_CHARS:
                    raise ValueError(f"{task}/{lang}: output too long: {output!r}")
                seen[key] = output
                tagged.append(Tagged(task, lang,
                                     {"instruction": instruction, "input": inp, "output": output}))
    rng.shuffle(tagged)
    return tagged


def generate(seed: int = 0) -> list[dict]:
    """Alpaca-form rows {"instruction", "input", "output"} for the given seed."""
    return [t.row for t in generate_tagged(seed)]


def dumps(rows: list[dict]) -> str:
    """The exact text of the shipped file."""
    return json.dumps(rows, ensure_ascii=False, indent=1) + "\n"


def counts_markdown(tagged: list[Tagged]) -> str:
    """Markdown table of rows per task and language (the README states it; a test checks it)."""
    by = Counter((t.task, t.lang) for t in tagged)
    with_input = Counter(t.task for t in tagged if t.row["input"])
    lines = ["| task | English | Korean | total | with `input` |",
             "|---|---:|---:|---:|---:|"]
    for task in TASKS:
        en, ko = by[(task, "en")], by[(task, "ko")]
        lines.append(f"| {task} | {en} | {ko} | {en + ko} | {with_input[task]} |")
    en = sum(v for (_, lang), v in by.items() if lang == "en")
    ko = sum(v for (_, lang), v in by.items() if lang == "ko")
    lines.append(f"| **all** | {en} | {ko} | {en + ko} | {sum(with_input.values())} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_kit.tiny.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHIPPED_PATH,
                        help="JSON file to write or check (default: the shipped asset)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and order seed (default 0)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if --out differs from what the generator makes")
    parser.add_argument("--stats", action="store_true",
                        help="print the per-task count table instead of writing")
    args = parser.parse_args(argv)

    tagged = generate_tagged(args.seed)
    if args.stats:
        sys.stdout.write(counts_markdown(tagged))
        return 0
    text = dumps([t.row for t in tagged])
    if args.check:
        try:
            current = args.out.read_text(encoding="utf-8")
        except FileNotFoundError:
            print(f"{args.out}: missing; run `python -m qlora_kit.tiny.data --out {args.out}`",
                  file=sys.stderr)
            return 1
        if current != text:
            print(f"{args.out}: differs from generate(seed={args.seed}); regenerate with "
                  f"`python -m qlora_kit.tiny.data --out {args.out} --seed {args.seed}`",
                  file=sys.stderr)
            return 1
        print(f"{args.out}: up to date ({len(tagged)} rows)")
        return 0
    write_atomic(args.out, text)
    print(f"wrote {args.out} ({len(tagged)} rows, {len(text.encode('utf-8'))} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
