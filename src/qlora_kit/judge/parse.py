"""Judge replies to scores, and scores to tables; shared by live judging and replay."""
from __future__ import annotations

import logging

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence


logger = logging.getLogger(__name__)


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
