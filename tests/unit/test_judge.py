"""Tests for qlora_kit.judge: prompts, parsers, aggregation, replay of the sources' recorded
judge outputs, and the live OpenAI-compatible client against a stub server on 127.0.0.1.

Run: python -m pytest -q tests/test_judge.py
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

import pytest

from qlora_kit.judge.client import JudgeCache, JudgeCacheError, JudgeClient, JudgeError, JudgeNotConfigured, judge_status
from qlora_kit.judge.parse import KomtJudgment, PairJudgment, pair_points, parse_alpagasus_score, parse_komt_score, summarise_komt, tally_alpagasus
from qlora_kit.judge.replay import ReplayInputError, replay_alpagasus, replay_komt
from qlora_kit.judge.prompts import alpagasus_messages, alpagasus_question, komt_messages
from qlora_kit.judge.live import judge_alpagasus, judge_komt
from qlora_kit.judge import prompts as judge_prompts
from qlora_kit.judge import replay as judge_replay
from support.judge_stub import StubServer
from support.repo import FIXTURES, SHARED_DATA

SHARED = SHARED_DATA.parent  # ../shared: the data and the research notes (source-facts.md)
FIXTURE_DATA = FIXTURES / "judge" / "data"

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data not present at {SHARED_DATA}"
)


# ------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------

# sha256 of the AlpaGasus2 judge strings (AG2@3f70e96:evaluation/AlpaGasus-Evaluation/
# evaluation.py:L69-77), pinned so the golden test runs even without ../shared.
PINNED_SHA256 = {
    "ALPAGASUS_SYSTEM_PROMPT": "8ec001fd8f1a623f9e444c9eca7be1cc3ee529003e931167a1b44958132baf33",
    "ALPAGASUS_USER_TEMPLATE": "9a5a71b69d68bdc65b9157ebac20b4915a8b753336d5838277afb1749670e3cf",
    "ALPAGASUS_CRITERIA": "9d31cdb9ee31c22a3103c41ff5ab073e33367a1fd5306f1b33acdf0e68c1110b",
}


@pytest.mark.parametrize("name", sorted(PINNED_SHA256))
def test_alpagasus_prompt_strings_are_pinned(name):
    value = getattr(judge_prompts, name)
    assert hashlib.sha256(value.encode("utf-8")).hexdigest() == PINNED_SHA256[name]


@pytest.mark.skipif(
    not (SHARED / "reference" / "source-facts.md").is_file(), reason="source-facts.md absent"
)
def test_alpagasus_prompt_strings_match_source_facts():
    text = (SHARED / "reference" / "source-facts.md").read_text(encoding="utf-8")
    section = text[text.index("- Judge (evaluation.py)") : text.index("- Aggregation (eval README")]
    quoted = re.findall(r'`"(.*?)"`', section)
    # The Python-escaped literals as written in source-facts.md, decoded like Python would.
    decoded = [json.loads('"' + q + '"') for q in quoted]
    assert decoded[:3] == [
        judge_prompts.ALPAGASUS_SYSTEM_PROMPT,
        judge_prompts.ALPAGASUS_USER_TEMPLATE,
        judge_prompts.ALPAGASUS_CRITERIA,
    ]
    assert decoded[3] == "{instruction} Input: {input}"


def test_alpagasus_messages_layout():
    messages = alpagasus_messages("Q?", "A one", "A two")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert user.startswith("[Question]\nQ?\n\n[The Start of Assistant 1's Answer]\nA one\n\n")
    assert "[The Start of Assistant 2's Answer]\nA two\n\n[The End of Assistant 2's Answer]" in user
    assert user.endswith(judge_prompts.ALPAGASUS_CRITERIA + "\n\n")


def test_alpagasus_question_per_test_set():
    assert alpagasus_question({"prompt": "k"}, "koala") == "k"
    assert alpagasus_question({"text": "v"}, "vicuna") == "v"
    with_input = {"instruction": "Fix it.", "instances": [{"input": "teh cat", "output": ""}]}
    assert alpagasus_question(with_input, "sinstruct") == "Fix it. Input: teh cat"
    no_input = {"instruction": "Say hi.", "instances": [{"input": "", "output": ""}]}
    assert alpagasus_question(no_input, "sinstruct") == "Say hi."
    with pytest.raises(ValueError):
        alpagasus_question({"instruction": "x", "instances": []}, "sinstruct")
    with pytest.raises(ValueError, match="unknown"):
        alpagasus_question({}, "wizardlm")


def test_komt_prompt_fills_placeholders_once():
    messages = komt_messages("질문에 {answer} 라는 글자가 있다", "답변 {question}")
    assert len(messages) == 1 and messages[0]["role"] == "user"
    content = messages[0]["content"]
    assert "[Question]\n질문에 {answer} 라는 글자가 있다\n" in content
    assert "[Candidate Answer]\n답변 {question}\n" in content
    assert "0 to 5" in content and "첫 줄" in content
    custom = komt_messages("q", "a", prompt='{"json": 1} Q={question} A={answer}')
    assert custom[0]["content"] == '{"json": 1} Q=q A=a'
    with pytest.raises(ValueError, match=r"\{answer\}"):
        komt_messages("q", "a", prompt="only {question}")


# ------------------------------------------------------------------------------------------
# Parsers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "review, expected",
    [
        ("8 9\nexplanation", [8.0, 9.0]),
        ("7.5 4.5\n", [7.5, 4.5]),
        ("8,9\n", [8.0, 9.0]),
        ("10 1", [10.0, 1.0]),
        ("8 9\r\nwindows newline", [8.0, 9.0]),  # float() strips the trailing \r
        # Faithful quirks of evaluation.py:L53-66:
        ("8, 9\n", [-1, -1]),  # comma+space -> "8  9" -> three parts
        ("8  9\n", [-1, -1]),  # two spaces
        (" 8 9\n", [-1, -1]),  # leading space
        ("\n8 9", [-1, -1]),  # blank first line
        ("Score: 8 9", [-1, -1]),
        ("Assistant 1: 8\nAssistant 2: 9", [-1, -1]),
        ("8\n9", [-1, -1]),
        ("eight nine", [-1, -1]),
        ("", [-1, -1]),
        (None, [-1, -1]),
    ],
)
def test_parse_alpagasus_score(review, expected):
    assert parse_alpagasus_score(review) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4\n설명", 4),
        ("Score: 4\nexplanation", 4),
        ("score:5", 5),
        ("점수: 2\n부분적으로 맞습니다.", 2),
        ("0\nno answer", 0),
        ("**3**\nok", 3),
        ("4/5\n", 4),
        ("4점\n", 4),
        ("4.\n", 4),
        ("\n\n  3  \nleading blank lines", 3),
        ("Score: 4", 4),
        # Not a bare score -> None (the source recorded such rows as 0).
        ("3: It means the answer is helpful", None),
        ("1: The candidate answer does not provide", None),
        ("I'm sorry, but I can't", None),
        ("6\n", None),
        ("10\n", None),
        ("4.5\n", None),
        ("-1\n", None),
        ("The answer deserves 4\n", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_komt_score(text, expected):
    assert parse_komt_score(text) == expected


# ------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------


def pair(model_first, baseline_first):
    return PairJudgment.from_reviews("q", model_first, baseline_first)


@pytest.mark.parametrize(
    "model_first, baseline_first, points",
    [
        ("9 5", "5 9", 2),  # model wins both orders
        ("9 5", "5 5", 1),  # win + draw
        ("9 5", "9 5", 0),  # win + loss
        ("5 5", "5 5", 0),  # draw twice
        ("5 9", "5 5", -1),  # loss + draw
        ("5 9", "9 5", -2),  # loses both
        ("8.5 8", "8 8", 0),  # int() truncation: 8.5 vs 8 is a draw (result_graph.py)
        ("bad", "5 9", 1),  # [-1,-1] counts as a draw, the other order still counts
    ],
)
def test_pair_points(model_first, baseline_first, points):
    assert pair_points(pair(model_first, baseline_first)) == points


def test_pair_points_float_switch():
    assert pair_points(pair("8.5 8", "8 8"), truncate_scores=False) == 1


def test_tally_alpagasus_rule():
    judgments = [
        pair("9 5", "5 9"),  # +2 win
        pair("9 5", "5 5"),  # +1 win
        pair("9 5", "9 5"),  # 0 tie
        pair("x", "y"),  # 0 tie, two parse failures
        pair("5 9", "5 5"),  # -1 lose
        pair("5 9", "9 5"),  # -2 lose
        pair("5 9", "9 5"),  # -2 lose
    ]
    tally = tally_alpagasus(judgments)
    assert (tally.n, tally.win, tally.tie, tally.lose, tally.parse_failures) == (7, 2, 2, 3, 2)


def test_summarise_komt():
    judgments = [KomtJudgment.from_text(i, t) for i, t in enumerate(["5", "Score: 3", "huh", "0"])]
    row = summarise_komt("m", judgments)
    assert (row.n, row.sum, row.unparsed) == (4, 8, 1)
    assert row.average == pytest.approx(2.0)
    assert row.percentage == pytest.approx(40.0)
    assert row.recorded_sum is None
    with_recorded = summarise_komt("m", judgments, recorded=[5, 3, 0, 1])
    assert with_recorded.recorded_sum == 9
    assert with_recorded.agree == 3  # "0" parsed as 0 but recorded 1
    assert with_recorded.parsed_agree == 2
    assert with_recorded.unparsed_recorded_zero == 1
    with pytest.raises(ValueError):
        summarise_komt("m", [])
    with pytest.raises(ValueError):
        summarise_komt("m", judgments, recorded=[1])


# ------------------------------------------------------------------------------------------
# Replay: hand-made fixtures (always run)
# ------------------------------------------------------------------------------------------


def by_set(result):
    return {
        r["test_set"]: (r["win"], r["tie"], r["lose"], r["parse_failures"])
        for r in result["test_sets"]
    }


def test_replay_alpagasus_fixture():
    result = replay_alpagasus(FIXTURE_DATA)
    assert by_set(result) == {
        "koala": (2, 2, 1, 1),
        "sinstruct": (2, 0, 1, 1),
        "vicuna": (0, 2, 0, 2),
    }
    assert all(r["recorded_score_mismatches"] == 0 for r in result["test_sets"])
    published = {r["test_set"]: r["published"] for r in result["test_sets"]}
    assert published == {"koala": {"win": 2, "draw": 2, "lose": 1}, "sinstruct": None, "vicuna": None}
    floats = replay_alpagasus(FIXTURE_DATA, truncate_scores=False)
    assert by_set(floats)["koala"] == (3, 1, 1, 1)


def test_replay_komt_fixture():
    rows = {r["model"]: r for r in replay_komt(FIXTURE_DATA)["models"]}
    assert set(rows) == {"tiny-a", "tiny-b"}
    a, b = rows["tiny-a"], rows["tiny-b"]
    assert (a["n"], a["sum"], a["recorded_sum"], a["agree"], a["unparsed"]) == (4, 11, 11, 4, 1)
    assert a["percentage"] == pytest.approx(55.0)
    assert (b["n"], b["sum"], b["recorded_sum"], b["agree"], b["unparsed"]) == (3, 7, 6, 2, 1)
    assert (b["parsed_agree"], b["unparsed_recorded_zero"]) == (1, 1)


def test_replay_detects_recorded_score_mismatch(tmp_path):
    data = copy_fixture(tmp_path)
    path = judge_replay.alpagasus_score_path(data, "alpagasus2", "alpaca2", "koala")
    rows = json.loads(path.read_text())
    rows[0]["score"] = [1.0, 2.0]
    path.write_text(json.dumps(rows))
    koala = replay_alpagasus(data)["test_sets"][0]
    assert koala["recorded_score_mismatches"] == 1
    assert koala["mismatch_examples"] == ["alpagasus2-alpaca2-koala.json:koala_1"]
    assert (koala["win"], koala["tie"], koala["lose"]) == (2, 2, 1)  # parsed from the review


def copy_fixture(tmp_path):
    import shutil

    target = tmp_path / "data"
    shutil.copytree(FIXTURE_DATA, target)
    for p in target.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return target


def test_replay_malformed_inputs_name_file_and_field(tmp_path):
    data = copy_fixture(tmp_path)
    path = judge_replay.alpagasus_score_path(data, "alpaca2", "alpagasus2", "sinstruct")
    rows = json.loads(path.read_text())
    del rows[1]["review"]
    path.write_text(json.dumps(rows))
    with pytest.raises(ReplayInputError, match=r"alpaca2-alpagasus2-sinstruct\.json: row 1: field 'review' missing"):
        replay_alpagasus(data)

    komt_path = data / judge_replay.KOMT_RESULTS_DIR / "score_result_tiny-b.jsonl"
    lines = komt_path.read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[2])
    bad["score"] = 7
    lines[2] = json.dumps(bad)
    komt_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ReplayInputError, match=r"score_result_tiny-b\.jsonl:3: field 'score'"):
        replay_komt(data)


def test_cli_replay_markdown_json_and_missing(tmp_path, capsys):
    assert judge_replay.main(["replay", "--style", "alpagasus", "--data-dir", str(FIXTURE_DATA)]) == 0
    out = capsys.readouterr().out
    assert "| koala | 5 | 2 | 2 | 1 | 2/2/1 | 1 | 0 |" in out
    assert "| vicuna | 2 | 0 | 2 | 0 | - | 2 | 0 |" in out

    assert judge_replay.main(["judge", "replay", "--style", "komt", "--data-dir", str(FIXTURE_DATA), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert [m["sum"] for m in parsed["models"]] == [11, 7]

    missing = tmp_path / "nowhere"
    assert judge_replay.main(["replay", "--style", "alpagasus", "--data-dir", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(judge_replay.alpagasus_score_path(missing, "alpagasus2", "alpaca2", "koala")) in captured.err
    assert judge_replay.main(["replay", "--style", "komt", "--data-dir", str(missing)]) == 2
    assert str(missing / judge_replay.KOMT_RESULTS_DIR) in capsys.readouterr().err


def test_add_cli_registers_judge_replay():
    import argparse

    parser = argparse.ArgumentParser()
    judge_replay.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["judge", "replay", "--style", "komt"])
    assert args.func is judge_replay._cmd_replay and args.data_dir is None  # then $QLORA_KIT_SHARED_DATA
    with pytest.raises(SystemExit):
        parser.parse_args(["judge", "replay", "--style", "mtbench"])


# ------------------------------------------------------------------------------------------
# Replay: the sources' recorded judge outputs (skip without ../shared/data)
# ------------------------------------------------------------------------------------------

# AG2 evaluation_score/{koala,sinstruct,vicuna}_result.json (win/draw/lose).
PUBLISHED_ALPAGASUS2 = {"koala": (94, 71, 15), "sinstruct": (107, 122, 23), "vicuna": (40, 38, 2)}

# komt README.md:L351-366, with the two README typos corrected from the files
# (Llama-2-13b-chat 73 -> 71, komt-llama-30b-v1 129 -> 117; source-facts #12).
PUBLISHED_KOMT = {
    "gpt-3.5-turbo": (147, "3.97", "79.45"),
    "cue": (140, "3.78", "75.67"),
    "clova": (136, "3.67", "73.51"),
    "WizardLM-13B-V1.2": (96, "2.59", "51.89"),
    "Llama-2-7b-chat-hf": (67, "1.81", "36.21"),
    "Llama-2-13b-chat-hf": (71, "1.91", "38.37"),
    "nlpai-lab-kullm-polyglot-12.8b-v2": (70, "1.89", "37.83"),
    "kfkas-Llama-2-ko-7b-Chat": (96, "2.59", "51.89"),
    "beomi-KoAlpaca-Polyglot-12.8B": (100, "2.70", "54.05"),
    "komt-llama2-7b-v1": (117, "3.16", "63.24"),
    "komt-llama2-13b-v1": (129, "3.48", "69.72"),
    "komt-llama-30b-v1": (117, "3.16", "63.24"),
    "komt-mistral-7b-v1": (131, "3.54", "70.81"),
    "komt-mistral-7b-v1-dpo": (142, "3.83", "76.75"),
}


@needs_shared_data
def test_replay_alpagasus2_reproduces_published_table():
    result = replay_alpagasus(SHARED_DATA)
    got = {r["test_set"]: (r["win"], r["tie"], r["lose"]) for r in result["test_sets"]}
    assert got == PUBLISHED_ALPAGASUS2
    for r in result["test_sets"]:
        assert r["parse_failures"] == 0
        assert r["recorded_score_mismatches"] == 0  # our parse of `review` == recorded `score`
        assert (r["published"]["win"], r["published"]["draw"], r["published"]["lose"]) == got[r["test_set"]]
    # Float comparison gives the same table on these files.
    floats = replay_alpagasus(SHARED_DATA, truncate_scores=False)
    assert {r["test_set"]: (r["win"], r["tie"], r["lose"]) for r in floats["test_sets"]} == got


@needs_shared_data
def test_replay_komt_reproduces_published_table(capsys):
    result = replay_komt(SHARED_DATA)
    rows = {r["model"]: r for r in result["models"]}
    assert {m: r["sum"] for m, r in rows.items()} == {m: v[0] for m, v in PUBLISHED_KOMT.items()}
    for model, r in rows.items():
        assert r["n"] == 37
        assert r["recorded_sum"] == r["sum"]
        assert r["agree"] == 37  # our parser + "unparsed counts 0" matches every recorded score
        assert r["unparsed_recorded_zero"] == r["unparsed"]
    assert sum(r["unparsed"] for r in rows.values()) == 17
    assert judge_replay.main(["replay", "--style", "komt", "--data-dir", str(SHARED_DATA)]) == 0
    out = capsys.readouterr().out
    for model, (total, average, percentage) in PUBLISHED_KOMT.items():
        assert f"| {model} | 37 | {total} | {average} | {percentage}% |" in out


# ------------------------------------------------------------------------------------------
# Live client against a stub OpenAI-compatible server
# ------------------------------------------------------------------------------------------

API_KEY = "sk-test-ONLY-IN-ENV-7f3a9c"
KEY_ENV = "QLORA_KIT_TEST_JUDGE_KEY"


@pytest.fixture()
def stub():
    server = StubServer()
    yield server
    server.close()


def make_client(stub, tmp_path, sleeps=None, **kwargs):
    return JudgeClient(
        stub.base_url,
        "stub-judge",
        api_key_env=KEY_ENV,
        cache_path=tmp_path / "judge_cache.jsonl",
        sleep=(sleeps.append if sleeps is not None else (lambda s: None)),
        timeout_s=kwargs.pop("timeout_s", 5.0),
        environ={KEY_ENV: API_KEY},
        **kwargs,
    )


ALPAGASUS_ITEMS = [
    {"id": "q1", "question": "Q1?", "model": "GOOD answer", "baseline": "weak answer"},
    {"id": "q2", "question": "Q2?", "model": "weak answer", "baseline": "GOOD answer"},
    {"id": "q3", "question": "Q3?", "model": "GOOD one", "baseline": "GOOD two"},
]
KOMT_ITEMS = [
    {"id": 0, "question": "인삼은 어떤 효과가 있나요?", "answer": "GOOD 답변"},
    {"id": 1, "question": "서울의 인구는?", "answer": "모르겠습니다"},
]


def test_live_judge_retries_caches_and_resumes(stub, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="qlora_kit.judge")
    stub.script = ["500", "drop"]  # the first item fails twice before succeeding
    sleeps: list[float] = []
    client = make_client(stub, tmp_path, sleeps, backoff_s=1.0)
    judgments = judge_alpagasus(client, ALPAGASUS_ITEMS)
    tally = tally_alpagasus(judgments)
    assert (tally.win, tally.tie, tally.lose, tally.parse_failures) == (1, 1, 1, 0)
    assert judgments[0].score_model_first == (9.0, 4.0)
    assert judgments[0].score_baseline_first == (4.0, 9.0)

    assert [r["action"] for r in stub.requests[:3]] == ["500", "drop", "ok"]
    assert len(stub.requests) == 2 + 2 * len(ALPAGASUS_ITEMS)
    assert client.stats.retries == 2 and client.stats.completions == 6
    assert sleeps == [1.0, 2.0]  # exponential backoff, injected sleep (no real waiting)

    first = stub.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert set(first["body"]) == {"model", "messages", "temperature", "max_tokens", "top_p"}
    assert first["body"]["model"] == "stub-judge"
    assert (first["body"]["temperature"], first["body"]["max_tokens"], first["body"]["top_p"]) == (0.0, 256, 1.0)
    assert first["body"]["messages"] == alpagasus_messages("Q1?", "GOOD answer", "weak answer")

    komt = judge_komt(client, KOMT_ITEMS)
    assert [j.score for j in komt] == [5, 1]
    assert summarise_komt("stub", komt).sum == 6

    cache_lines = (tmp_path / "judge_cache.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(cache_lines) == 8 and all(json.loads(line)["key"] for line in cache_lines)

    # A second run with a fresh client reads everything from the cache: zero HTTP calls.
    calls_before = len(stub.requests)
    again = make_client(stub, tmp_path)
    assert judge_alpagasus(again, ALPAGASUS_ITEMS) == judgments
    assert judge_komt(again, KOMT_ITEMS) == komt
    assert len(stub.requests) == calls_before
    assert again.stats.http_requests == 0 and again.stats.cache_hits == 8

    # Another judge model or other generation params is a different cache key.
    judge_komt(again, KOMT_ITEMS[:1], generation={"temperature": 0.7, "max_tokens": 64, "top_p": 0.9})
    assert len(stub.requests) == calls_before + 1

    # The key is in no file we wrote, nor in any log record, nor in the client's repr.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
    assert API_KEY not in caplog.text
    assert "attempt 1/6 failed (HTTP 500" in caplog.text  # the retry was logged
    assert API_KEY not in repr(again)


def test_live_judge_interrupted_cache_resumes(stub, tmp_path):
    client = make_client(stub, tmp_path)
    judge_komt(client, KOMT_ITEMS)
    cache = tmp_path / "judge_cache.jsonl"
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) - 25])  # crash in the middle of the last record

    resumed = make_client(stub, tmp_path)
    assert resumed.cache.truncated_lines == 1 and len(resumed.cache) == 1
    calls_before = len(stub.requests)
    assert [j.score for j in judge_komt(resumed, KOMT_ITEMS)] == [5, 1]
    assert len(stub.requests) == calls_before + 1  # only the lost item was judged again
    assert cache.read_bytes() == data  # the partial line was replaced, file is clean JSONL

    clean = JudgeCache(cache)
    assert clean.truncated_lines == 0 and len(clean) == 2


def test_cache_complete_last_line_without_newline_and_corrupt_middle(tmp_path):
    path = tmp_path / "c.jsonl"
    record = {"key": "k1", "model": "m", "params": {}, "content": "4"}
    path.write_text(json.dumps(record), encoding="utf-8")  # no trailing newline
    cache = JudgeCache(path)
    assert cache.get("k1") == "4" and cache.truncated_lines == 0
    cache.put("k2", "m", {}, "5")
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["k1", "k2"]

    path.write_text('{"key": "k1", "content": "4"}\n{broken\n{"key": "k2", "content": "5"}\n')
    with pytest.raises(JudgeCacheError, match=r"c\.jsonl:2: not valid JSON"):
        JudgeCache(path)
    path.write_text('{"key": "k1"}\n')
    with pytest.raises(JudgeCacheError, match=r"c\.jsonl:1: field 'content'"):
        JudgeCache(path)


def test_live_judge_429_timeout_and_giving_up(stub, tmp_path):
    stub.script = ["429", "sleep"]
    sleeps: list[float] = []
    client = make_client(stub, tmp_path, sleeps, backoff_s=0.001, timeout_s=0.3)
    assert judge_komt(client, KOMT_ITEMS[:1])[0].score == 5
    assert client.stats.retries == 2 and len(sleeps) == 2
    assert "HTTP 429" in client.stats.errors[0] and "timed out" in client.stats.errors[1].lower()

    stub.script = ["500"] * 3
    gives_up = make_client(stub, tmp_path / "other", [], max_attempts=3)
    with pytest.raises(JudgeError, match="gave up after 3 attempts: HTTP 500"):
        judge_komt(gives_up, KOMT_ITEMS[1:])
    assert not (tmp_path / "other" / "judge_cache.jsonl").exists()


def test_live_judge_client_error_is_not_retried(stub, tmp_path):
    stub.script = ["400"]
    client = make_client(stub, tmp_path, [])
    with pytest.raises(JudgeError, match="HTTP 400"):
        judge_komt(client, KOMT_ITEMS[:1])
    assert len(stub.requests) == 1 and client.stats.retries == 0


def test_connection_refused_is_retried(tmp_path):
    server = StubServer()
    base_url = server.base_url
    server.close()  # nothing listens on that port any more
    sleeps: list[float] = []
    client = JudgeClient(
        base_url, "m", api_key_env=KEY_ENV, environ={KEY_ENV: API_KEY},
        sleep=sleeps.append, max_attempts=2, backoff_s=0.5, timeout_s=2.0,
    )
    with pytest.raises(JudgeError, match="gave up after 2 attempts"):
        client.complete([{"role": "user", "content": "hi"}], temperature=0.0, max_tokens=8, top_p=1.0)
    assert sleeps == [0.5]


def test_judge_not_configured():
    status = judge_status("http://127.0.0.1:1/v1", "m", KEY_ENV, environ={})
    assert not status.configured
    assert str(status).startswith("judge not configured: set the environment variable " + KEY_ENV)
    status = judge_status(None, None, environ={judge_prompts.DEFAULT_API_KEY_ENV: API_KEY})
    assert not status.configured and "base URL" in status.message and "model" in status.message
    assert API_KEY not in status.message
    ok = judge_status("http://x/v1", "m", KEY_ENV, environ={KEY_ENV: API_KEY})
    assert ok.configured and API_KEY not in ok.message and KEY_ENV in ok.message
    assert judge_status("http://x/v1", "m", KEY_ENV, require_api_key=False, environ={}).configured
    with pytest.raises(JudgeNotConfigured, match="judge not configured"):
        JudgeClient("http://127.0.0.1:1/v1", "m", api_key_env=KEY_ENV, environ={})


def test_no_key_no_authorization_header(stub, tmp_path):
    client = JudgeClient(stub.base_url, "m", api_key_env=KEY_ENV, require_api_key=False, environ={})
    assert client.complete(komt_messages("q", "GOOD"), temperature=0.0, max_tokens=8, top_p=1.0).startswith("Score: 5")
    assert "Authorization" not in stub.requests[0]["headers"]


# --- honest status: a set whose judge replies mostly do not parse has failed ---------------------

def test_a_set_with_more_than_a_fifth_unparsed_replies_is_failed():
    from qlora_kit.judge.live import MAX_UNPARSED, set_status

    assert MAX_UNPARSED == 0.2
    # the run: 37 answers, every reply unparsed, a score of 0/185 -> never "ok"
    assert set_status({"n": 37, "sum": 0, "unparsed": 37}).startswith("failed: 37 of 37 judge replies did not parse")
    assert set_status({"n": 10, "unparsed": 2}) == "ok"  # exactly 20 %
    assert set_status({"n": 10, "unparsed": 2, "recorded": {"n": 10, "unparsed": 3}}).startswith("failed: 5 of 20")
    assert set_status({"n": 5, "win": 1, "tie": 4, "lose": 0, "parse_failures": 2}) == "ok"  # 2 of 10 orders
    assert set_status({"n": 5, "win": 0, "tie": 5, "lose": 0, "parse_failures": 3}).startswith("failed: 3 of 10")


def test_evaluate_raises_after_writing_when_a_judged_set_failed(tmp_path):
    from qlora_kit import evaluate

    evaluate._raise_on_failed_judge({"status": "configured", "a": {"status": "ok"}}, tmp_path / "report.md")
    with pytest.raises(evaluate.EvaluationFailed, match=r"judge failed on 1 prompt set\(s\): komt-37: 37 of 37"):
        evaluate._raise_on_failed_judge({"komt-37": {"status": "failed: 37 of 37 judge replies did not parse"},
                                         "b": {"status": "off: not configured"}}, tmp_path / "report.md")


def test_replay_reads_the_mirror_the_environment_names_and_says_so_without_one(monkeypatch, capsys):
    monkeypatch.setenv("QLORA_KIT_SHARED_DATA", str(FIXTURE_DATA))
    assert judge_replay.main(["replay", "--style", "komt"]) == 0
    capsys.readouterr()
    monkeypatch.delenv("QLORA_KIT_SHARED_DATA")
    assert judge_replay.main(["replay", "--style", "alpagasus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "set QLORA_KIT_SHARED_DATA to that folder or pass --data-dir" in err
