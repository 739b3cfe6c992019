"""Lookup tables and Korean particle rules for the tiny data set (every entry written for this project)."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# Korean particles. The particle after a word depends on whether its last syllable ends in a
# consonant (batchim): 사과는 / 책은, 사과를 / 책을, 사과와 / 책과. We compute it instead of
# writing "은(는)", and refuse words we cannot judge rather than guess.
# ---------------------------------------------------------------------------------------------

# Sino-Korean reading of the last digit: 영 일 이 삼 사 오 육 칠 팔 구; True = ends in a consonant.
_DIGIT_BATCHIM = {0: True, 1: True, 2: False, 3: True, 4: False, 5: False, 6: True, 7: True,
                  8: True, 9: False}


def has_batchim(word: str) -> bool:
    last = word[-1]
    if "가" <= last <= "힣":
        return (ord(last) - 0xAC00) % 28 != 0
    if word.isdigit():
        n = int(word)
        # 십, 백, 천 all end in a consonant; otherwise the last digit decides (13 = 십삼).
        return True if n % 10 == 0 else _DIGIT_BATCHIM[n % 10]
    raise ValueError(f"cannot choose a Korean particle after {word!r}")


def particle(word: str, after_consonant: str, after_vowel: str, quote: bool) -> str:
    # The particle goes outside the quotes: '빵'은, not '빵은'.
    shown = f"'{word}'" if quote else word
    return shown + (after_consonant if has_batchim(word) else after_vowel)


def topic(word: str, quote: bool = False) -> str:  # 은/는
    return particle(word, "은", "는", quote)


def obj(word: str, quote: bool = False) -> str:  # 을/를
    return particle(word, "을", "를", quote)


def and_(word: str, quote: bool = False) -> str:  # 과/와
    return particle(word, "과", "와", quote)


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


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]
