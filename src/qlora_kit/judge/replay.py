"""Replay of the sources' recorded judge outputs through the kit's parsers and tallies; its CLI."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence
from qlora_kit.judge.parse import KomtJudgment, PairJudgment, summarise_komt, tally_alpagasus


# The local mirror of the sources' files (`<repo with "/" -> "-">/<path>`), the same folder the
# evaluate stage reads prompt sets from (sources/prompt_sets.py); --data-dir names another.
MIRROR_ENV = "QLORA_KIT_SHARED_DATA"



def _check_fields(where: str, row: Any, required: tuple[str, ...], text_field: str) -> None:
    """A recorded judgement row: an object with every required field, its reply text a string."""
    if not isinstance(row, dict):
        raise ReplayInputError(f"{where}: not an object")
    for name in required:
        if name not in row:
            raise ReplayInputError(f"{where}: field {name!r} missing")
    if not isinstance(row[text_field], str):
        raise ReplayInputError(f"{where}: field {text_field!r} is not a string")

def default_data_dir() -> Path | None:
    return Path(os.environ[MIRROR_ENV]) if os.environ.get(MIRROR_ENV) else None


# Where the recorded judge outputs sit inside the mirror folder.
ALPAGASUS2_SCORE_DIR = Path(
    "gauss5930-AlpaGasus2-QLoRA/evaluation/AlpaGasus-Evaluation/evaluation_score"
)


ALPAGASUS2_TEST_SETS = ("koala", "sinstruct", "vicuna")


KOMT_RESULTS_DIR = Path("davidkim205-komt/eval_results")


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
        _check_fields(where, row, ("question_id", "review", "score"), "review")
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
    data_dir: str | os.PathLike[str],
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
            _check_fields(where, row, ("id", "chatgpt", "score"), "chatgpt")
            score = row["score"]
            if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 5:
                raise ReplayInputError(f"{where}: field 'score' is not an integer 0-5")
            rows.append(row)
    if not rows:
        raise ReplayInputError(f"{path}: no rows")
    return rows


def replay_komt(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
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
    data_dir = args.data_dir or default_data_dir()
    if data_dir is None:
        print(f"error: judge replay reads the sources' recorded judge files from a local mirror: set {MIRROR_ENV} "
              "to that folder or pass --data-dir (docs/use-the-outputs.md)", file=sys.stderr)
        return 2
    try:
        if args.style == "alpagasus":
            result = replay_alpagasus(data_dir)
            text = alpagasus_markdown(result)
        else:
            result = replay_komt(data_dir)
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
        default=None,
        help=f"the folder holding the sources' files as <repo with / -> ->/<path> (default: ${MIRROR_ENV})",
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
