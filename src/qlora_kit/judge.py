"""LLM-as-judge scoring for the evaluate stage: komt (0-5 per answer) and AlpaGasus (pairwise).

Two judge styles, each reproducing one source:

* komt (davidkim205/komt README.md:L348-366): a judge scores every answer 0-5; per model the
  scores are summed over the questions and shown as sum / average (sum/N) / percentage (sum/5N).
  The source never published its judge prompt, so ``DEFAULT_KOMT_JUDGE_PROMPT`` is ours.
* AlpaGasus (gauss5930/AlpaGasus2-QLoRA evaluation/AlpaGasus-Evaluation/evaluation.py and
  result_graph.py): a judge compares two answers and returns "s1 s2" on its first line; every
  question is judged in both orders and turned into win / tie / lose for the model.

One code path: the live judge (``judge_komt`` / ``judge_alpagasus`` over ``JudgeClient``) and the
replay of recorded judge outputs (``replay_komt`` / ``replay_alpagasus``) both build
``KomtJudgment`` / ``PairJudgment`` objects from raw judge text, which parse with the same parser,
and both aggregate with ``summarise_komt`` / ``tally_alpagasus``.

The live client talks to any OpenAI-compatible endpoint (``POST {base_url}/chat/completions``)
with the standard library only (urllib), so a hosted API and llama-cpp-python's local server
work the same way. The API key is read only from an environment variable whose *name* is passed
in (default ``QLORA_KIT_JUDGE_API_KEY``); it is sent as a Bearer header and never stored, logged
or written. Judged items go to an append-only JSONL cache so an interrupted run resumes without
paying twice.

In the evaluate stage (``evaluate.judge_prompt_sets``) the endpoint comes from
``resolve_endpoint``: ``QLORA_KIT_JUDGE_BASE_URL`` / ``QLORA_KIT_JUDGE_MODEL`` or the recipe's
``eval.judge_base_url`` / ``eval.judge_model``; a judge on 127.0.0.1 needs no key.
``judge_komt_set`` scores the merged model's answers and, where the prompt file records another
model's answers (komt's score files do), those too, so the kit's judge can be compared with the
source's on the same text; ``judge_alpagasus_set`` judges the model against the recorded baseline
in both orders. Their tables go to metrics.json (``judge.<prompt set>.*``) and report.md.

Run the replay (prints a markdown table, or JSON with ``--json``)::

    qlora-kit judge replay --style alpagasus --data-dir ../shared/data
    qlora-kit judge replay --style komt --json
    python -m qlora_kit.judge replay --style komt        # same, without the main CLI
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "QLORA_KIT_JUDGE_API_KEY"

# ../shared/data relative to the repo root (src/qlora_kit/judge.py -> parents[2] is the root).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"

# Where the recorded judge outputs sit inside the shared data dir (see shared/data/SOURCES.md).
ALPAGASUS2_SCORE_DIR = Path(
    "gauss5930-AlpaGasus2-QLoRA/evaluation/AlpaGasus-Evaluation/evaluation_score"
)
ALPAGASUS2_TEST_SETS = ("koala", "sinstruct", "vicuna")
KOMT_RESULTS_DIR = Path("davidkim205-komt/eval_results")


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

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
    (the generation step dropped that input, but the judge sees it; source-facts #21).
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


# --------------------------------------------------------------------------------------------
# Parsers (shared by live judging and replay)
# --------------------------------------------------------------------------------------------


def parse_alpagasus_score(review: str) -> list[float]:
    """The source's parser, evaluation.py:L53-66, behaviour for behaviour.

    First line, commas turned into spaces, split on single spaces; exactly two parts -> two
    floats, anything else -> [-1, -1]. Faithful quirks: "8, 9" becomes "8  9" -> three parts ->
    [-1, -1]; a leading space or blank first line fails too; "nan"/"inf" parse as floats.
    """
    try:
        parts = review.split("\n")[0].replace(",", " ").split(" ")
        if len(parts) == 2:
            return [float(parts[0]), float(parts[1])]
        raise ValueError("invalid score pair")
    except Exception:  # the source catches everything (including a non-str review)
        logger.debug("AlpaGasus score line unparseable: %.80r", review)
        return [-1, -1]


# First line = just the score: "4", "Score: 4", "점수: 4", optionally "4/5", "4점", "**4**", "4.".
# Deliberately strict: a line with more text ("3: It means the answer is helpful") is not a
# score. The recorded komt judge outputs show the source scored such lines 0 (see summarise_komt).
_KOMT_SCORE_LINE = re.compile(
    r"^(?:(?:score|점수)\s*[:：]\s*)?([0-5])(?:\s*/\s*5|\s*점)?\.?$", re.IGNORECASE
)


def parse_komt_score(text: str) -> int | None:
    """Our komt parser: the integer 0-5 alone on the first non-blank line, else None."""
    if not isinstance(text, str):
        return None
    stripped = text.lstrip()
    if not stripped:
        return None
    line = stripped.splitlines()[0].strip().strip("*").strip()
    match = _KOMT_SCORE_LINE.match(line)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------
# Judgements and aggregation (shared by live judging and replay)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KomtJudgment:
    """One judged answer. `score` is the parsed first line, None when unparseable."""

    id: Any
    text: str
    score: int | None

    @classmethod
    def from_text(cls, id: Any, text: str) -> "KomtJudgment":
        return cls(id=id, text=text, score=parse_komt_score(text))


@dataclass(frozen=True)
class KomtRow:
    """komt README table row: sum, average = sum/N, percentage = 100*sum/(5N)."""

    model: str
    n: int
    sum: int
    average: float
    percentage: float
    unparsed: int  # first lines our parser could not read; each counted as 0
    recorded_sum: int | None = None  # replay only: sum of the recorded `score`s
    agree: int | None = None  # replay only: rows whose counted score == recorded score
    parsed_agree: int | None = None  # replay only: parsed rows whose score == recorded score
    unparsed_recorded_zero: int | None = None  # replay only: unparsed rows recorded as 0


def summarise_komt(
    model: str, judgments: Sequence[KomtJudgment], recorded: Sequence[int] | None = None
) -> KomtRow:
    """Sum the 0-5 scores of one model; an unparseable judge output counts as 0.

    Counting it as 0 is what the source did: in all 14 recorded komt files every row whose first
    line is not a bare score (17 of 518, e.g. "3: It means ...", "I'm sorry, ...") has score 0.
    The number of such rows is reported so a user sees when a judge ignores the format.
    """
    n = len(judgments)
    if n == 0:
        raise ValueError(f"komt: no judgements for model {model!r}")
    counted = [j.score if j.score is not None else 0 for j in judgments]
    total = sum(counted)
    row = dict(
        model=model,
        n=n,
        sum=total,
        average=total / n,
        percentage=100.0 * total / (5 * n),
        unparsed=sum(1 for j in judgments if j.score is None),
    )
    if recorded is not None:
        if len(recorded) != n:
            raise ValueError(f"komt: {model}: {len(recorded)} recorded scores for {n} judgements")
        row.update(
            recorded_sum=sum(recorded),
            agree=sum(1 for c, r in zip(counted, recorded) if c == r),
            parsed_agree=sum(
                1 for j, r in zip(judgments, recorded) if j.score is not None and j.score == r
            ),
            unparsed_recorded_zero=sum(
                1 for j, r in zip(judgments, recorded) if j.score is None and r == 0
            ),
        )
    return KomtRow(**row)


@dataclass(frozen=True)
class PairJudgment:
    """Both orders of one AlpaGasus question, seen from the model under test.

    `model_first` is the judge output with the model as Assistant 1 (score = [model, baseline]);
    `baseline_first` has the baseline as Assistant 1 (score = [baseline, model]).
    """

    id: Any
    review_model_first: str
    review_baseline_first: str
    score_model_first: tuple[float, float]
    score_baseline_first: tuple[float, float]

    @classmethod
    def from_reviews(cls, id: Any, review_model_first: str, review_baseline_first: str):
        return cls(
            id=id,
            review_model_first=review_model_first,
            review_baseline_first=review_baseline_first,
            score_model_first=tuple(parse_alpagasus_score(review_model_first)),
            score_baseline_first=tuple(parse_alpagasus_score(review_baseline_first)),
        )

    @property
    def parse_failures(self) -> int:
        return sum(s == (-1, -1) for s in (self.score_model_first, self.score_baseline_first))


def pair_points(judgment: PairJudgment, truncate_scores: bool = True) -> int:
    """+1 for each order in which the model scores higher, -1 for each lower (-2..2).

    result_graph.py:L31-46 compares `int(score)` (truncation: 8.5 vs 8.0 is a draw there);
    `truncate_scores=False` compares the floats instead. On the recorded AlpaGasus2 files both
    give the same table. A [-1, -1] parse failure compares equal, i.e. counts as a draw, as in
    the source.
    """
    conv = int if truncate_scores else float
    model_1, base_1 = (conv(x) for x in judgment.score_model_first)
    base_2, model_2 = (conv(x) for x in judgment.score_baseline_first)
    points = 0
    for model_score, base_score in ((model_1, base_1), (model_2, base_2)):
        if model_score > base_score:
            points += 1
        elif model_score < base_score:
            points -= 1
    return points


@dataclass(frozen=True)
class PairTally:
    """win: total >= 1, tie: total == 0, lose: total <= -1 (eval README L29-34)."""

    n: int
    win: int
    tie: int
    lose: int
    parse_failures: int


def tally_alpagasus(judgments: Iterable[PairJudgment], truncate_scores: bool = True) -> PairTally:
    win = tie = lose = failures = n = 0
    for judgment in judgments:
        n += 1
        failures += judgment.parse_failures
        points = pair_points(judgment, truncate_scores)
        if points >= 1:
            win += 1
        elif points <= -1:
            lose += 1
        else:
            tie += 1
    return PairTally(n=n, win=win, tie=tie, lose=lose, parse_failures=failures)


# --------------------------------------------------------------------------------------------
# Live client
# --------------------------------------------------------------------------------------------


class JudgeError(RuntimeError):
    """A judge call failed for good (bad response, non-retryable HTTP status, retries spent)."""


class JudgeNotConfigured(JudgeError):
    pass


class JudgeCacheError(JudgeError):
    pass


@dataclass(frozen=True)
class JudgeStatus:
    configured: bool
    message: str

    def __str__(self) -> str:
        return self.message


def judge_status(
    base_url: str | None,
    model: str | None,
    api_key_env: str = DEFAULT_API_KEY_ENV,
    *,
    require_api_key: bool = True,
    environ: Mapping[str, str] | None = None,
) -> JudgeStatus:
    """Is the live judge usable? The message is meant for the report, e.g.

    "judge not configured: set the environment variable QLORA_KIT_JUDGE_API_KEY; give a judge
    base URL". It names what is missing and never shows the key. A local server that needs no
    key (llama-cpp-python without --api_key) can pass require_api_key=False.
    """
    env = os.environ if environ is None else environ
    missing = []
    if require_api_key and not env.get(api_key_env):
        missing.append(f"set the environment variable {api_key_env} (the judge API key)")
    if not base_url:
        missing.append("give a judge base URL (an OpenAI-compatible endpoint, e.g. .../v1)")
    if not model:
        missing.append("give a judge model name")
    if missing:
        return JudgeStatus(False, "judge not configured: " + "; ".join(missing))
    key_note = f"API key from ${api_key_env}" if env.get(api_key_env) else "no API key"
    return JudgeStatus(True, f"judge configured: model {model} at {base_url} ({key_note})")


def cache_key(model: str, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> str:
    """sha256 over (model, messages, generation params), canonical JSON."""
    payload = json.dumps(
        {"model": model, "messages": list(messages), "params": dict(params)},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """Append-only JSONL of judged items: {"key", "model", "params", "content"} per line.

    Every record is written with one write() followed by flush + fsync, so a crash loses at
    most the line being written. On load a truncated last line (an interrupted write) is
    ignored and counted in `truncated_lines`; before the next append the partial line is cut
    off so the file stays valid JSONL. A broken line anywhere else is an error (it means the
    file was edited or is not our cache). One writer at a time.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.entries: dict[str, str] = {}
        self.truncated_lines = 0
        self._good_end: int | None = None  # byte offset to cut back to before appending
        self._needs_newline = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        offset = 0
        for index, raw in enumerate(lines):
            line_no = index + 1
            is_last = index == len(lines) - 1  # after the final "\n" this is b""
            line_end = offset + len(raw) + (0 if is_last else 1)
            if raw.strip():
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    if is_last:
                        self.truncated_lines += 1
                        self._good_end = offset
                        logger.warning(
                            "%s:%d: truncated last cache line ignored", self.path, line_no
                        )
                        break
                    raise JudgeCacheError(f"{self.path}:{line_no}: not valid JSON ({exc})") from exc
                for name in ("key", "content"):
                    if not isinstance(record, dict) or not isinstance(record.get(name), str):
                        raise JudgeCacheError(
                            f"{self.path}:{line_no}: field {name!r} missing or not a string"
                        )
                self.entries[record["key"]] = record["content"]
                if is_last:  # a complete record whose newline never made it to disk
                    self._needs_newline = True
            offset = line_end

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, model: str, params: Mapping[str, Any], content: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._good_end is not None:
            with open(self.path, "r+b") as fh:
                fh.truncate(self._good_end)
            self._good_end = None
        record = {"key": key, "model": model, "params": dict(params), "content": content}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._needs_newline:
            line = "\n" + line
            self._needs_newline = False
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.entries[key] = content


_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ClientStats:
    http_requests: int = 0  # attempts sent, including failed ones
    retries: int = 0
    cache_hits: int = 0
    completions: int = 0  # successful HTTP completions
    errors: list[str] = field(default_factory=list)  # one line per failed attempt


class JudgeClient:
    """Minimal OpenAI-compatible chat client with retries and a resumable cache.

    Sends exactly `model`, `messages`, `temperature`, `max_tokens`, `top_p` (what both the
    OpenAI API and llama-cpp-python's server accept). Retries connection errors, timeouts,
    HTTP 429 and 5xx up to `max_attempts` in all, sleeping backoff_s * 2**(attempt-1) (capped
    at max_backoff_s, raised to a numeric Retry-After); `sleep` is injectable for tests.
    Hand-written on urllib rather than the openai package to keep the kit's install small and
    the request body exactly what we cite.
    """

    def __init__(
        self,
        base_url: str | None,
        model: str | None,
        *,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        require_api_key: bool = True,
        cache_path: str | os.PathLike[str] | None = None,
        timeout_s: float = 120.0,
        max_attempts: int = 6,
        backoff_s: float = 2.0,
        max_backoff_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        environ: Mapping[str, str] | None = None,
    ):
        status = judge_status(
            base_url, model, api_key_env, require_api_key=require_api_key, environ=environ
        )
        if not status.configured:
            raise JudgeNotConfigured(status.message)
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        env = os.environ if environ is None else environ
        self.base_url = str(base_url).rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = str(model)
        self.api_key_env = api_key_env
        # Read once, kept only in this attribute; never part of repr, errors, logs or the cache.
        self._api_key = env.get(api_key_env) or None
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep
        self.cache = JudgeCache(cache_path) if cache_path is not None else None
        self.stats = ClientStats()
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # A judge on this machine is never reached through a proxy, whatever http_proxy says.
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"JudgeClient(url={self.url!r}, model={self.model!r}, key_env={self.api_key_env!r})"

    def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        temperature: float,
        max_tokens: int,
        top_p: float,
    ) -> str:
        """The judge's reply text for `messages`, from the cache when present."""
        params = {"temperature": temperature, "max_tokens": max_tokens, "top_p": top_p}
        key = cache_key(self.model, messages, params)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self.stats.cache_hits += 1
                return cached
        content = self._post_with_retries({"model": self.model, "messages": list(messages), **params})
        if self.cache is not None:
            self.cache.put(key, self.model, params, content)
        return content

    def _post_with_retries(self, body: dict[str, Any]) -> str:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last_error = ""
        for attempt in range(1, self.max_attempts + 1):
            self.stats.http_requests += 1
            retry_after: float | None = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    payload = response.read()
                reply = json.loads(payload.decode("utf-8"))
            except urllib.error.HTTPError as exc:
                detail = _http_error_detail(exc)
                if exc.code != 429 and exc.code < 500:
                    hint = f" (check ${self.api_key_env})" if exc.code in (401, 403) else ""
                    raise JudgeError(f"judge {self.url}: HTTP {exc.code}{hint}: {detail}") from None
                last_error = f"HTTP {exc.code}: {detail}"
                retry_after = _retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                # URLError wraps refused/reset connections; RemoteDisconnected, IncompleteRead and
                # socket timeouts can escape urlopen as HTTPException / OSError while reading.
                reason = getattr(exc, "reason", exc)
                last_error = f"{type(exc).__name__}: {reason}"
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                last_error = f"reply is not JSON ({exc})"  # e.g. a proxy's error page; retry
            else:
                self.stats.completions += 1
                return _reply_content(reply, self.url)
            self.stats.errors.append(f"attempt {attempt}: {last_error}")
            if attempt == self.max_attempts:
                break
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.max_backoff_s))
            logger.warning(
                "judge %s attempt %d/%d failed (%s); retrying in %.1fs",
                self.url, attempt, self.max_attempts, last_error, delay,
            )
            self.stats.retries += 1
            self.sleep(delay)
        raise JudgeError(f"judge {self.url}: gave up after {self.max_attempts} attempts: {last_error}")


def _http_error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode("utf-8", "replace")
    except Exception:
        text = ""
    return (text.strip() or str(exc.reason))[:300]


def _retry_after_seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _reply_content(reply: Any, url: str) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge {url}: reply has no choices[0].message.content: {str(reply)[:300]}")
    if not isinstance(content, str):
        raise JudgeError(f"judge {url}: choices[0].message.content is not a string")
    return content


# --------------------------------------------------------------------------------------------
# Live judging
# --------------------------------------------------------------------------------------------


def judge_komt(
    client: JudgeClient,
    items: Iterable[Mapping[str, Any]],
    *,
    prompt: str = DEFAULT_KOMT_JUDGE_PROMPT,
    generation: Mapping[str, Any] = KOMT_GENERATION,
) -> list[KomtJudgment]:
    """Score each item ({"id", "question", "answer"}) 0-5; aggregate with summarise_komt."""
    judgments = []
    for item in items:
        messages = komt_messages(item["question"], item["answer"], prompt)
        text = client.complete(messages, **generation)
        judgments.append(KomtJudgment.from_text(item.get("id"), text))
    return judgments


def judge_alpagasus(
    client: JudgeClient,
    items: Iterable[Mapping[str, Any]],
    *,
    generation: Mapping[str, Any] = ALPAGASUS_GENERATION,
) -> list[PairJudgment]:
    """Judge each item ({"id", "question", "model", "baseline"} answers) in both orders.

    The source ran the whole set once per order (eval README L21-23); per item both orders are
    equivalent and let an interrupted run resume item by item. Aggregate with tally_alpagasus.
    """
    judgments = []
    for item in items:
        question, model_answer, baseline_answer = item["question"], item["model"], item["baseline"]
        model_first = client.complete(
            alpagasus_messages(question, model_answer, baseline_answer), **generation
        )
        baseline_first = client.complete(
            alpagasus_messages(question, baseline_answer, model_answer), **generation
        )
        judgments.append(PairJudgment.from_reviews(item.get("id"), model_first, baseline_first))
    return judgments


# --------------------------------------------------------------------------------------------
# The evaluate stage's judge: endpoint from recipe or environment, one prompt set at a time
# --------------------------------------------------------------------------------------------

JUDGE_BASE_URL_ENV = "QLORA_KIT_JUDGE_BASE_URL"
JUDGE_MODEL_ENV = "QLORA_KIT_JUDGE_MODEL"


def redact_url(url: str) -> str:
    """scheme://host[:port]/path of a URL, without user:password@ or a query (either may carry a key)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class Endpoint:
    """Where the evaluate stage's judge lives. `message` is the report's judge status line."""

    base_url: str
    model: str
    configured: bool
    require_api_key: bool
    message: str


def resolve_endpoint(
    base_url: str = "",
    model: str = "",
    *,
    api_key_env: str = DEFAULT_API_KEY_ENV,
    environ: Mapping[str, str] | None = None,
) -> Endpoint:
    """Judge endpoint for the evaluate stage: the environment wins over the recipe's eval values.

    The environment wins so that a user can point a run at their own judge (a hosted API, or
    llama-cpp-python's server on 127.0.0.1) without editing the recipe. The API key only ever
    comes from the environment; a judge on this machine (loopback) needs none.
    """
    env = os.environ if environ is None else environ
    url = env.get(JUDGE_BASE_URL_ENV) or base_url
    name = env.get(JUDGE_MODEL_ENV) or model
    host = (urllib.parse.urlsplit(url).hostname or "") if url else ""
    require_key = host not in _LOOPBACK
    missing = []
    if not url:
        missing.append(f"{JUDGE_BASE_URL_ENV} (or eval.judge_base_url) to an OpenAI-compatible /v1 URL")
    if not name:
        missing.append(f"{JUDGE_MODEL_ENV} (or eval.judge_model)")
    if require_key and not env.get(api_key_env):
        missing.append(f"{api_key_env} (the API key of a judge that is not on 127.0.0.1)")
    if missing:
        return Endpoint(url, name, False, require_key, "judge: not configured: set " + "; set ".join(missing))
    origin = "environment" if env.get(JUDGE_BASE_URL_ENV) else "recipe"
    key_note = f"API key from ${api_key_env}" if env.get(api_key_env) else "no API key"
    return Endpoint(url, name, True, require_key,
                    f"judge: configured: {name} at {redact_url(url)} (endpoint from the {origin}; {key_note})")


def alpagasus_judge_question(instruction: str, input: str = "") -> str:
    """evaluation.py:L101-107: "{instruction} Input: {input}" when there is an input."""
    return f"{instruction} Input: {input}" if input else instruction


def judge_komt_set(
    client: JudgeClient,
    rows: Sequence[Mapping[str, Any]],
    answers: Sequence[str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """komt 0-5 judge on one prompt set: the model's answers, and the recorded answers if the
    prompt file carries them (komt's files hold the answers of the model they scored, so judging
    them again shows how our judge compares with the source's ChatGPT on the same text).

    Returns (table, per-item records): table = {n, out_of, sum, average, percentage, unparsed,
    recorded: {...} | absent}.
    """
    items = [{"id": r.get("id"), "question": r["instruction"], "answer": a} for r, a in zip(rows, answers)]
    model_j = judge_komt(client, items)

    def table(row: KomtRow) -> dict[str, Any]:
        return {"n": row.n, "out_of": 5 * row.n, "sum": row.sum, "average": row.average,
                "percentage": row.percentage, "unparsed": row.unparsed}

    out = table(summarise_komt("model", model_j))
    records = [{"id": j.id, "score": j.score, "judge": j.text} for j in model_j]
    if rows and all(isinstance(r.get("answer"), str) for r in rows):
        rec_items = [{"id": r.get("id"), "question": r["instruction"], "answer": r["answer"]} for r in rows]
        rec_j = judge_komt(client, rec_items)
        out["recorded"] = table(summarise_komt("recorded", rec_j))
        for rec, j in zip(records, rec_j):
            rec.update(recorded_score=j.score, recorded_judge=j.text)
    return out, records


def judge_alpagasus_set(
    client: JudgeClient,
    rows: Sequence[Mapping[str, Any]],
    answers: Sequence[str],
    baseline: Sequence[str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """AlpaGasus pairwise judge on one prompt set, model vs recorded baseline, both orders.

    Returns (table, per-item records): table = {n, out_of, win, tie, lose, parse_failures}.
    """
    items = [{"id": r.get("id"), "question": alpagasus_judge_question(r["instruction"], r.get("input", "")),
              "model": a, "baseline": b} for r, a, b in zip(rows, answers, baseline)]
    judgments = judge_alpagasus(client, items)
    tally = tally_alpagasus(judgments)
    table = {"n": tally.n, "out_of": tally.n, "win": tally.win, "tie": tally.tie, "lose": tally.lose,
             "parse_failures": tally.parse_failures}
    records = [{"id": j.id, "points": pair_points(j), "score_model_first": list(j.score_model_first),
                "score_baseline_first": list(j.score_baseline_first), "judge_model_first": j.review_model_first,
                "judge_baseline_first": j.review_baseline_first} for j in judgments]
    return table, records


# --------------------------------------------------------------------------------------------
# Replay of recorded judge outputs
# --------------------------------------------------------------------------------------------


class ReplayInputError(ValueError):
    """A recorded file is missing or malformed; the message names the file, row and field."""


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise ReplayInputError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReplayInputError(f"{path}: not valid JSON ({exc})") from exc


def _load_alpagasus_reviews(path: Path) -> dict[Any, tuple[str, list[float]]]:
    rows = _load_json(path)
    if not isinstance(rows, list):
        raise ReplayInputError(f"{path}: expected a JSON list of rows")
    out: dict[Any, tuple[str, list[float]]] = {}
    for index, row in enumerate(rows):
        where = f"{path}: row {index}"
        if not isinstance(row, dict):
            raise ReplayInputError(f"{where}: not an object")
        for name in ("question_id", "review", "score"):
            if name not in row:
                raise ReplayInputError(f"{where}: field {name!r} missing")
        if not isinstance(row["review"], str):
            raise ReplayInputError(f"{where}: field 'review' is not a string")
        score = row["score"]
        if not (
            isinstance(score, list)
            and len(score) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in score)
        ):
            raise ReplayInputError(f"{where}: field 'score' is not a pair of numbers")
        if row["question_id"] in out:
            raise ReplayInputError(f"{where}: duplicate question_id {row['question_id']!r}")
        out[row["question_id"]] = (row["review"], [float(x) for x in score])
    return out


def alpagasus_score_path(data_dir: Path, key_1: str, key_2: str, test_set: str) -> Path:
    # evaluation.py names its output "{key_1}-{key_2}-{dst}.json".
    return Path(data_dir) / ALPAGASUS2_SCORE_DIR / f"{key_1}-{key_2}-{test_set}.json"


def replay_alpagasus(
    data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
    *,
    model_key: str = "alpagasus2",
    baseline_key: str = "alpaca2",
    test_sets: Sequence[str] = ALPAGASUS2_TEST_SETS,
    truncate_scores: bool = True,
) -> dict[str, Any]:
    """Win/tie/lose of model_key vs baseline_key from the recorded AlpaGasus2 judge outputs.

    Each `review` is re-parsed with the source's parser (the recorded `score` is only checked
    against it), then tallied with the same code the live judge uses.
    """
    data_dir = Path(data_dir)
    results = []
    for test_set in test_sets:
        path_mf = alpagasus_score_path(data_dir, model_key, baseline_key, test_set)
        path_bf = alpagasus_score_path(data_dir, baseline_key, model_key, test_set)
        model_first = _load_alpagasus_reviews(path_mf)
        baseline_first = _load_alpagasus_reviews(path_bf)
        if set(model_first) != set(baseline_first):
            only = sorted(map(str, set(model_first) ^ set(baseline_first)))[:5]
            raise ReplayInputError(
                f"{path_mf} and {path_bf}: question_ids differ (e.g. {', '.join(only)})"
            )
        judgments = []
        mismatches = []
        for qid, (review_mf, recorded_mf) in model_first.items():
            review_bf, recorded_bf = baseline_first[qid]
            judgment = PairJudgment.from_reviews(qid, review_mf, review_bf)
            if list(judgment.score_model_first) != recorded_mf:
                mismatches.append(f"{path_mf.name}:{qid}")
            if list(judgment.score_baseline_first) != recorded_bf:
                mismatches.append(f"{path_bf.name}:{qid}")
            judgments.append(judgment)
        tally = tally_alpagasus(judgments, truncate_scores)
        published_path = data_dir / ALPAGASUS2_SCORE_DIR / f"{test_set}_result.json"
        published = None
        if published_path.is_file():  # optional: the source's own aggregate, for comparison
            raw = _load_json(published_path)
            published = {k: raw.get(k) for k in ("win", "draw", "lose")}
        results.append(
            {
                "test_set": test_set,
                **asdict(tally),
                "recorded_score_mismatches": len(mismatches),
                "mismatch_examples": mismatches[:5],
                "published": published,
            }
        )
    return {
        "style": "alpagasus",
        "data_dir": str(data_dir),
        "model": model_key,
        "baseline": baseline_key,
        "truncate_scores": truncate_scores,
        "test_sets": results,
    }


def _load_komt_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReplayInputError(f"{where}: not valid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise ReplayInputError(f"{where}: not an object")
            for name in ("id", "chatgpt", "score"):
                if name not in row:
                    raise ReplayInputError(f"{where}: field {name!r} missing")
            if not isinstance(row["chatgpt"], str):
                raise ReplayInputError(f"{where}: field 'chatgpt' is not a string")
            score = row["score"]
            if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 5:
                raise ReplayInputError(f"{where}: field 'score' is not an integer 0-5")
            rows.append(row)
    if not rows:
        raise ReplayInputError(f"{path}: no rows")
    return rows


def replay_komt(data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR) -> dict[str, Any]:
    """Per-model komt table from the recorded `eval_results/score_result_<model>.jsonl`.

    Every row's `chatgpt` text is parsed with our komt parser and summed with summarise_komt;
    the recorded `score` is carried along to report the agreement.
    """
    results_dir = Path(data_dir) / KOMT_RESULTS_DIR
    if not results_dir.is_dir():
        raise ReplayInputError(f"missing directory: {results_dir}")
    paths = sorted(results_dir.glob("score_result_*.jsonl"))
    if not paths:
        raise ReplayInputError(f"missing files: {results_dir}/score_result_*.jsonl")
    models = []
    for path in paths:
        rows = _load_komt_rows(path)
        judgments = [KomtJudgment.from_text(row["id"], row["chatgpt"]) for row in rows]
        model = path.name[len("score_result_") : -len(".jsonl")]
        models.append(asdict(summarise_komt(model, judgments, [row["score"] for row in rows])))
    return {"style": "komt", "data_dir": str(data_dir), "models": models}


# --------------------------------------------------------------------------------------------
# Rendering and CLI
# --------------------------------------------------------------------------------------------


def _trunc2(value: float) -> str:
    """Two decimals cut, not rounded, as the komt README table does (147/185 -> 79.45 %)."""
    return f"{math.floor(value * 100 + 1e-9) / 100:.2f}"


def alpagasus_markdown(result: Mapping[str, Any]) -> str:
    lines = [
        f"AlpaGasus pairwise judge: {result['model']} vs {result['baseline']} "
        "(win: +1 per order the model scores higher, -1 per order lower; total >=1 win, 0 tie, <=-1 lose)",
        "",
        "| test set | N | win | tie | lose | published win/draw/lose | parse failures | recorded-score mismatches |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in result["test_sets"]:
        pub = r["published"]
        pub_text = f"{pub['win']}/{pub['draw']}/{pub['lose']}" if pub else "-"
        lines.append(
            f"| {r['test_set']} | {r['n']} | {r['win']} | {r['tie']} | {r['lose']} | {pub_text} "
            f"| {r['parse_failures']} | {r['recorded_score_mismatches']} |"
        )
    return "\n".join(lines) + "\n"


def komt_markdown(result: Mapping[str, Any]) -> str:
    lines = [
        "komt judge: 0-5 per answer; average = sum/N, percentage = sum/(5N); "
        "an unparseable judge output counts 0",
        "",
        "| model | N | sum | average | percentage | recorded sum | agree with recorded | unparsed (counted 0) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        recorded = "-" if r.get("recorded_sum") is None else str(r["recorded_sum"])
        agree = "-" if r.get("agree") is None else f"{r['agree']}/{r['n']}"
        lines.append(
            f"| {r['model']} | {r['n']} | {r['sum']} | {_trunc2(r['average'])} | {_trunc2(r['percentage'])}% "
            f"| {recorded} | {agree} | {r['unparsed']} |"
        )
    return "\n".join(lines) + "\n"


def _cmd_replay(args: argparse.Namespace) -> int:
    try:
        if args.style == "alpagasus":
            result = replay_alpagasus(args.data_dir)
            text = alpagasus_markdown(result)
        else:
            result = replay_komt(args.data_dir)
            text = komt_markdown(result)
    except ReplayInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print(text, end="")
    return 0


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `judge replay ...` on an argparse subparsers object.

    The leaf parser sets `func`, a callable taking the parsed args and returning the exit code
    (0 ok, 2 missing/malformed input); the caller does `sys.exit(args.func(args))`.
    """
    judge = subparsers.add_parser("judge", help="LLM-judge scoring (komt 0-5, AlpaGasus pairwise)")
    judge_sub = judge.add_subparsers(dest="judge_command", required=True)
    replay = judge_sub.add_parser(
        "replay", help="re-aggregate recorded judge outputs of a source and print its table"
    )
    replay.add_argument("--style", choices=("alpagasus", "komt"), required=True)
    replay.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"the shared data dir (default: {DEFAULT_DATA_DIR})",
    )
    replay.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    replay.set_defaults(func=_cmd_replay)
    return judge


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_kit.judge")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    # Accept both "judge replay ..." and the shorter "replay ...".
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["judge"]:
        argv = ["judge", *argv]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
