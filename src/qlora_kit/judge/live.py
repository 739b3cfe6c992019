"""Judging a model's answers live: komt 0-5 per answer, AlpaGasus pairwise in both orders."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence
from qlora_kit.judge.prompts import ALPAGASUS_GENERATION, DEFAULT_KOMT_JUDGE_PROMPT, KOMT_GENERATION, alpagasus_judge_question, alpagasus_messages, komt_messages
from qlora_kit.judge.client import JudgeClient
from qlora_kit.judge.parse import KomtJudgment, KomtRow, PairJudgment, pair_points, summarise_komt, tally_alpagasus

# A judged set with more than this share of judge replies that do not parse is `failed`: its score
# would measure the judge's reply format, not the model (an unparsed komt reply counts 0).
MAX_UNPARSED = 0.2


def set_status(table: Mapping[str, Any]) -> str:
    """"ok", or "failed: ..." when more than MAX_UNPARSED of the set's judge replies did not parse."""
    if "parse_failures" in table:  # AlpaGasus: two replies per item, one per order
        bad, total = table["parse_failures"], 2 * table["n"]
    else:  # komt: one reply per answer, the recorded answers' too
        rec = table.get("recorded") or {}
        bad, total = table["unparsed"] + rec.get("unparsed", 0), table["n"] + rec.get("n", 0)
    if total and bad / total > MAX_UNPARSED:
        return (f"failed: {bad} of {total} judge replies did not parse (more than {MAX_UNPARSED:.0%}), so the "
                "score measures the judge's reply format, not the model; use a judge that follows the prompt")
    return "ok"


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
