"""Generate the sample instruction data set that ships with the `tiny` recipe.

The `tiny` recipe trains a tiny, randomly initialised Llama-shaped model (2 layers, hidden 256,
a ~1000-piece sentencepiece tokenizer trained on this very text) with LoRA for about a minute
on a CPU. Its report has to show that the model visibly learned, so the data is built for that:

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
import os
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

SHIPPED_PATH = Path(__file__).resolve().parent / "assets" / "tiny_alpaca.json"
MAX_OUTPUT_CHARS = 40


class Tagged(NamedTuple):
    """One row plus the task and language it was generated for (used for counts and tests)."""

    task: str
    lang: str  # "en" or "ko": the language of the instruction
    row: dict


# ---------------------------------------------------------------------------------------------
# Korean particles. The particle after a word depends on whether its last syllable ends in a
# consonant (batchim): 사과는 / 책은, 사과를 / 책을, 사과와 / 책과. We compute it instead of
# writing "은(는)", and refuse words we cannot judge rather than guess.
# ---------------------------------------------------------------------------------------------

# Sino-Korean reading of the last digit: 영 일 이 삼 사 오 육 칠 팔 구; True = ends in a consonant.
_DIGIT_BATCHIM = {0: True, 1: True, 2: False, 3: True, 4: False, 5: False, 6: True, 7: True,
                  8: True, 9: False}


def _has_batchim(word: str) -> bool:
    last = word[-1]
    if "가" <= last <= "힣":
        return (ord(last) - 0xAC00) % 28 != 0
    if word.isdigit():
        n = int(word)
        # 십, 백, 천 all end in a consonant; otherwise the last digit decides (13 = 십삼).
        return True if n % 10 == 0 else _DIGIT_BATCHIM[n % 10]
    raise ValueError(f"cannot choose a Korean particle after {word!r}")


def _particle(word: str, after_consonant: str, after_vowel: str, quote: bool) -> str:
    # The particle goes outside the quotes: '빵'은, not '빵은'.
    shown = f"'{word}'" if quote else word
    return shown + (after_consonant if _has_batchim(word) else after_vowel)


def _topic(word: str, quote: bool = False) -> str:  # 은/는
    return _particle(word, "은", "는", quote)


def _obj(word: str, quote: bool = False) -> str:  # 을/를
    return _particle(word, "을", "를", quote)


def _and(word: str, quote: bool = False) -> str:  # 과/와
    return _particle(word, "과", "와", quote)


# ---------------------------------------------------------------------------------------------
# Lookup tables, written for this project.
# ---------------------------------------------------------------------------------------------

# (English name as used inside a question, Korean name, English capital, Korean capital)
CAPITALS = [
    ("France", "프랑스", "Paris", "파리"),
    ("Japan", "일본", "Tokyo", "도쿄"),
    ("China", "중국", "Beijing", "베이징"),
    ("South Korea", "한국", "Seoul", "서울"),
    ("Germany", "독일", "Berlin", "베를린"),
    ("Italy", "이탈리아", "Rome", "로마"),
    ("Spain", "스페인", "Madrid", "마드리드"),
    ("the United Kingdom", "영국", "London", "런던"),
    ("Russia", "러시아", "Moscow", "모스크바"),
    ("Egypt", "이집트", "Cairo", "카이로"),
    ("Canada", "캐나다", "Ottawa", "오타와"),
    ("Australia", "호주", "Canberra", "캔버라"),
    ("Brazil", "브라질", "Brasilia", "브라질리아"),
    ("India", "인도", "New Delhi", "뉴델리"),
    ("Thailand", "태국", "Bangkok", "방콕"),
    ("Vietnam", "베트남", "Hanoi", "하노이"),
    ("Greece", "그리스", "Athens", "아테네"),
    ("Argentina", "아르헨티나", "Buenos Aires", "부에노스아이레스"),
    ("Kenya", "케냐", "Nairobi", "나이로비"),
    ("Norway", "노르웨이", "Oslo", "오슬로"),
    ("Sweden", "스웨덴", "Stockholm", "스톡홀름"),
    ("Portugal", "포르투갈", "Lisbon", "리스본"),
    ("the Netherlands", "네덜란드", "Amsterdam", "암스테르담"),
    ("Poland", "폴란드", "Warsaw", "바르샤바"),
    ("Peru", "페루", "Lima", "리마"),
    ("Mongolia", "몽골", "Ulaanbaatar", "울란바토르"),
    ("the Philippines", "필리핀", "Manila", "마닐라"),
    ("Ireland", "아일랜드", "Dublin", "더블린"),
    ("Austria", "오스트리아", "Vienna", "빈"),
    ("Cuba", "쿠바", "Havana", "아바나"),
]

WEEKDAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WEEKDAYS_KO = ["월요일", "화요일", "수요일", "목요일", "금요일", "토요일", "일요일"]
MONTHS_EN = ["January", "February", "March", "April", "May", "June", "July", "August",
             "September", "October", "November", "December"]
MONTHS_KO = [f"{m}월" for m in range(1, 13)]

# Each word appears in one pair only, so every question has exactly one answer.
OPPOSITES_EN = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("full", "empty"), ("rich", "poor"), ("early", "late"),
    ("strong", "weak"), ("hard", "soft"), ("wet", "dry"), ("clean", "dirty"), ("up", "down"),
    ("day", "night"), ("push", "pull"), ("win", "lose"), ("loud", "quiet"), ("thick", "thin"),
    ("young", "old"), ("buy", "sell"), ("first", "last"), ("high", "low"), ("near", "far"),
]
OPPOSITES_KO = [
    ("크다", "작다"), ("뜨겁다", "차갑다"), ("빠르다", "느리다"), ("높다", "낮다"),
    ("길다", "짧다"), ("많다", "적다"), ("밝다", "어둡다"), ("무겁다", "가볍다"),
    ("넓다", "좁다"), ("쉽다", "어렵다"), ("깨끗하다", "더럽다"), ("강하다", "약하다"),
    ("가깝다", "멀다"), ("좋다", "나쁘다"), ("두껍다", "얇다"), ("기쁘다", "슬프다"),
    ("열다", "닫다"), ("사다", "팔다"), ("이기다", "지다"), ("위", "아래"), ("앞", "뒤"),
    ("낮", "밤"), ("시작", "끝"), ("입구", "출구"),
]

# (English noun phrase, Korean noun, English colour, Korean colour)
COLOURS = [
    ("the sky", "하늘", "blue", "파란색"),
    ("grass", "풀", "green", "초록색"),
    ("snow", "눈", "white", "흰색"),
    ("a banana", "바나나", "yellow", "노란색"),
    ("coal", "석탄", "black", "검은색"),
    ("blood", "피", "red", "빨간색"),
    ("milk", "우유", "white", "흰색"),
    ("an orange", "오렌지", "orange", "주황색"),
    ("a tomato", "토마토", "red", "빨간색"),
    ("a lemon", "레몬", "yellow", "노란색"),
    ("a strawberry", "딸기", "red", "빨간색"),
    ("a cucumber", "오이", "green", "초록색"),
    ("an eggplant", "가지", "purple", "보라색"),
    ("chocolate", "초콜릿", "brown", "갈색"),
    ("a cloud", "구름", "white", "흰색"),
    ("a crow", "까마귀", "black", "검은색"),
    ("a carrot", "당근", "orange", "주황색"),
    ("a leaf", "나뭇잎", "green", "초록색"),
    ("the sea", "바다", "blue", "파란색"),
    ("salt", "소금", "white", "흰색"),
]

# English <-> Korean, one meaning each (no 눈 "eye"/"snow" style ambiguity).
WORDS = [
    ("apple", "사과"), ("water", "물"), ("book", "책"), ("dog", "개"), ("cat", "고양이"),
    ("house", "집"), ("school", "학교"), ("friend", "친구"), ("mother", "어머니"),
    ("father", "아버지"), ("tree", "나무"), ("flower", "꽃"), ("moon", "달"), ("star", "별"),
    ("rain", "비"), ("river", "강"), ("mountain", "산"), ("bread", "빵"), ("milk", "우유"),
    ("car", "자동차"), ("chair", "의자"), ("door", "문"), ("hand", "손"), ("bird", "새"),
    ("fish", "물고기"), ("egg", "달걀"), ("name", "이름"), ("sea", "바다"), ("train", "기차"),
    ("money", "돈"), ("window", "창문"), ("teacher", "선생님"), ("sun", "태양"), ("cup", "컵"),
    ("shoe", "신발"), ("clock", "시계"), ("doctor", "의사"), ("baby", "아기"), ("ice", "얼음"),
    ("key", "열쇠"), ("hat", "모자"), ("paper", "종이"),
]

# (English animal with article, English sound, Korean animal, Korean sound)
ANIMAL_SOUNDS = [
    ("a dog", "woof", "개", "멍멍"), ("a cat", "meow", "고양이", "야옹"),
    ("a cow", "moo", "소", "음매"), ("a duck", "quack", "오리", "꽥꽥"),
    ("a pig", "oink", "돼지", "꿀꿀"), ("a rooster", "cock-a-doodle-doo", "수탉", "꼬끼오"),
    ("a sheep", "baa", "양", "매애"), ("a frog", "ribbit", "개구리", "개굴개굴"),
    ("an owl", "hoot", "부엉이", "부엉부엉"), ("a bee", "buzz", "벌", "윙윙"),
    ("a lion", "roar", "사자", "어흥"), ("a chick", "peep", "병아리", "삐약삐약"),
    ("a mouse", "squeak", "쥐", "찍찍"), ("a crow", "caw", "까마귀", "까악까악"),
    ("a horse", "neigh", "말", "히힝"),
]

# Extra words for copying, reversing and counting, so those tasks are not only the words above.
EXTRA_WORDS_EN = ["orange", "lemon", "garden", "pencil", "table", "music", "summer", "winter",
                  "rabbit", "tiger", "candle", "kitchen", "bottle", "planet", "silver", "yellow"]
EXTRA_WORDS_KO = ["바나나", "토마토", "딸기", "사자", "호랑이", "연필", "책상", "음악", "여름",
                  "겨울", "토끼", "부엌", "병원", "도서관", "비행기", "자전거"]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------------------------------------
# Task builders. Each returns (instruction, input, output) triples for one language; the counts
# are fixed here so the data set's shape does not depend on the seed, only its sampling does.
# ---------------------------------------------------------------------------------------------

Triple = tuple[str, str, str]


def _addition(rng: random.Random, lang: str) -> list[Triple]:
    pairs = rng.sample([(a, b) for a in range(10) for b in range(10)], 40)
    out = []
    for a, b in pairs:
        s = a + b
        if lang == "en":
            q = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Compute {a} + {b}.",
                            f"What do you get when you add {b} to {a}?",
                            f"What is the sum of {a} and {b}?"])
            out.append((q, "", f"{s}."))
        else:
            q = rng.choice([f"{a} 더하기 {_topic(str(b))} 얼마인가요?",
                            f"{a}에 {_obj(str(b))} 더하면 얼마인가요?",
                            f"{a} + {b}의 값은 무엇인가요?",
                            f"{_and(str(a))} {b}의 합은 얼마인가요?",
                            f"{a} 더하기 {_obj(str(b))} 계산하세요."])
            out.append((q, "", f"{s}입니다."))
    return out


def _subtraction(rng: random.Random, lang: str) -> list[Triple]:
    pairs = rng.sample([(a, b) for a in range(10) for b in range(a + 1)], 30)
    out = []
    for a, b in pairs:
        d = a - b
        if lang == "en":
            q = rng.choice([f"What is {a} minus {b}?", f"Subtract {b} from {a}.",
                            f"Compute {a} - {b}.", f"What do you get when you take {b} from {a}?",
                            f"What is {a} take away {b}?"])
            out.append((q, "", f"{d}."))
        else:
            q = rng.choice([f"{a} 빼기 {_topic(str(b))} 얼마인가요?",
                            f"{a}에서 {_obj(str(b))} 빼면 얼마인가요?",
                            f"{a} - {b}의 값은 무엇인가요?",
                            f"{_and(str(a))} {b}의 차는 얼마인가요?"])
            out.append((q, "", f"{d}입니다."))
    return out


def _larger(rng: random.Random, lang: str) -> list[Triple]:
    pairs = rng.sample([(a, b) for a in range(10) for b in range(10) if a != b], 25)
    out = []
    for a, b in pairs:
        m = max(a, b)
        if lang == "en":
            q = rng.choice([f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?",
                            f"Pick the larger number: {a} or {b}."])
            out.append((q, "", f"{m}."))
        else:
            q = rng.choice([f"{_and(str(a))} {b} 중에서 더 큰 수는 무엇인가요?",
                            f"{_and(str(a))} {b} 중 어느 수가 더 큰가요?",
                            f"더 큰 수를 고르세요: {a}, {b}"])
            out.append((q, "", f"{m}입니다."))
    return out


def _next_number(rng: random.Random, lang: str) -> list[Triple]:
    out = []
    for n in range(20):
        if lang == "en":
            q = rng.choice([f"What number comes after {n}?", f"What is the next number after {n}?",
                            f"Which number follows {n}?"])
            out.append((q, "", f"{n + 1}."))
        else:
            q = rng.choice([f"{n} 다음 숫자는 무엇인가요?", f"{n} 다음에 오는 수는 무엇인가요?",
                            f"{n}보다 1 큰 수는 무엇인가요?"])
            out.append((q, "", f"{n + 1}입니다."))
    return out


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
                out.append((q, "", f"{_cap(c_en)}."))
        else:
            q = rng.choice([f"{c_ko}의 수도는 어디인가요?", f"{c_ko}의 수도는 어느 도시인가요?",
                            f"{c_ko}의 수도를 알려 주세요.", f"{c_ko}의 수도 이름은 무엇인가요?"])
            out.append((q, "", f"{cap_ko}입니다."))
            if i in reverse:
                q = rng.choice([f"{_topic(cap_ko)} 어느 나라의 수도인가요?",
                                f"{_obj(cap_ko)} 수도로 하는 나라는 어디인가요?"])
                out.append((q, "", f"{c_ko}입니다."))
    return out


def _weekdays(rng: random.Random, lang: str) -> list[Triple]:
    names = WEEKDAYS_EN if lang == "en" else WEEKDAYS_KO
    out = []
    for i, d in enumerate(names):
        nxt, prv = names[(i + 1) % 7], names[(i - 1) % 7]
        # Two phrasings per fact: there are only 14 facts, and the week is a cycle worth seeing.
        if lang == "en":
            for q in rng.sample([f"What day comes after {d}?", f"Which day of the week follows {d}?",
                                 f"What is the day after {d}?"], 2):
                out.append((q, "", f"{nxt}."))
            for q in rng.sample([f"What day comes before {d}?",
                                 f"Which day of the week comes right before {d}?",
                                 f"What is the day before {d}?"], 2):
                out.append((q, "", f"{prv}."))
        else:
            for q in rng.sample([f"{d} 다음은 무슨 요일인가요?", f"{d} 다음 날은 무슨 요일인가요?",
                                 f"{d} 다음에 오는 요일은 무엇인가요?"], 2):
                out.append((q, "", f"{nxt}입니다."))
            for q in rng.sample([f"{d} 전날은 무슨 요일인가요?", f"{d} 바로 전 요일은 무엇인가요?",
                                 f"{d} 앞에 오는 요일은 무엇인가요?"], 2):
                out.append((q, "", f"{prv}입니다."))
    return out


def _months(rng: random.Random, lang: str) -> list[Triple]:
    names = MONTHS_EN if lang == "en" else MONTHS_KO
    out = []
    for i, m in enumerate(names):
        nxt, prv = names[(i + 1) % 12], names[(i - 1) % 12]
        if lang == "en":
            q = rng.choice([f"What month comes after {m}?", f"Which month follows {m}?",
                            f"What is the month after {m}?"])
            out.append((q, "", f"{nxt}."))
            q = rng.choice([f"What month comes before {m}?", f"Which month comes right before {m}?",
                            f"What is the month before {m}?"])
            out.append((q, "", f"{prv}."))
        else:
            q = rng.choice([f"{m} 다음 달은 몇 월인가요?", f"{m} 다음에 오는 달은 무엇인가요?"])
            out.append((q, "", f"{nxt}입니다."))
            q = rng.choice([f"{m} 이전 달은 몇 월인가요?", f"{m} 바로 앞의 달은 무엇인가요?"])
            out.append((q, "", f"{prv}입니다."))
    return out


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
                out.append((q[0], q[1], f"{_cap(o)}."))
            else:
                q = rng.choice([(f"'{w}'의 반대말은 무엇인가요?", ""),
                                (f"{_and(w, quote=True)} 뜻이 반대인 말은 무엇인가요?", ""),
                                (f"'{w}'의 반의어를 알려 주세요.", ""),
                                ("다음 단어의 반대말을 쓰세요.", w)])
                out.append((q[0], q[1], f"'{o}'입니다."))
    return out


def _colours(rng: random.Random, lang: str) -> list[Triple]:
    out = []
    # Every thing once; half of them a second time in another phrasing.
    twice = set(rng.sample(range(len(COLOURS)), len(COLOURS) // 2))
    for i, (x_en, x_ko, c_en, c_ko) in enumerate(COLOURS):
        k = 2 if i in twice else 1
        if lang == "en":
            for q in rng.sample([f"What colour is {x_en}?", f"What color is {x_en}?",
                                 f"Name the usual colour of {x_en}.",
                                 f"What is the colour of {x_en}?"], k):
                out.append((q, "", f"{_cap(c_en)}."))
        else:
            for q in rng.sample([f"{_topic(x_ko)} 무슨 색인가요?", f"{x_ko}의 색깔은 무엇인가요?",
                                 f"{_topic(x_ko)} 보통 어떤 색인가요?",
                                 f"{x_ko}의 색을 알려 주세요."], k):
                out.append((q, "", f"{c_ko}입니다."))
    return out


def _translation(rng: random.Random, lang: str) -> list[Triple]:
    """English instructions translate English -> Korean; Korean ones Korean -> English."""
    out = []
    no_input = set(rng.sample(range(len(WORDS)), len(WORDS) // 2))
    for i, (en, ko) in enumerate(WORDS):
        if lang == "en":
            q = rng.choice(["Translate this word into Korean.", "Give the Korean word for this.",
                            "What is this word in Korean?"])
            out.append((q, en, ko))
            if i in no_input:
                q = rng.choice([f"What is the Korean word for '{en}'?",
                                f"How do you say '{en}' in Korean?",
                                f"Translate '{en}' into Korean."])
                out.append((q, "", ko))
        else:
            q = rng.choice(["다음 단어를 영어로 번역하세요.", "다음 단어는 영어로 무엇인가요?",
                            "이 단어를 영어로 바꾸어 주세요."])
            out.append((q, ko, en))
            if i in no_input:
                q = rng.choice([f"{_obj(ko, quote=True)} 영어로 하면 무엇인가요?",
                                f"'{ko}'의 영어 단어는 무엇인가요?",
                                f"{_topic(ko, quote=True)} 영어로 무엇인가요?"])
                out.append((q, "", en))
    return out


def _animal_sounds(rng: random.Random, lang: str) -> list[Triple]:
    out = []
    twice = set(rng.sample(range(len(ANIMAL_SOUNDS)), len(ANIMAL_SOUNDS) // 2))
    for i, (a_en, s_en, a_ko, s_ko) in enumerate(ANIMAL_SOUNDS):
        k = 2 if i in twice else 1
        if lang == "en":
            for q in rng.sample([f"What sound does {a_en} make?", f"What does {a_en} say?",
                                 f"How does {a_en} sound?"], k):
                out.append((q, "", f"{_cap(s_en)}."))
        else:
            for q in rng.sample([f"{_topic(a_ko)} 어떻게 우나요?",
                                 f"{_topic(a_ko)} 어떤 소리를 내나요?",
                                 f"{a_ko}의 울음소리는 무엇인가요?"], k):
                out.append((q, "", f"{s_ko}."))
    return out


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
            q = rng.choice([(f"{_topic(w, quote=True)} 몇 글자인가요?", ""),
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


def _write_atomic(path: Path, text: str) -> None:
    # Write beside the target and rename, so an interrupted run never leaves half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the file ships in the repo, so make it readable
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
    _write_atomic(args.out, text)
    print(f"wrote {args.out} ({len(tagged)} rows, {len(text.encode('utf-8'))} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
