"""lm-evaluation-harness presets in the evaluate stage (issue 6, item 4), offline.

Run: .venv/bin/python -m pytest -q tests/test_lm_eval.py -p no:cacheprovider

The presets in the recipes (ARC/HellaSwag/MMLU/TruthfulQA, KoBEST/KMMLU/HAE-RAE) need the Hub;
here a small multiple-choice task is defined in the test (a task YAML and a JSON-lines data set
in tmp, found through `eval.benchmark_tasks_dir`) and run by the evaluate stage on the tiny
recipe's merged model through lm-eval's HF backend, next to a preset naming a task that does not
exist (recorded as failed; the other preset still runs).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qlora_kit import evaluate
from qlora_kit.scoring import lm_eval as benchmarks
from qlora_kit.config import Benchmark, load_recipe
from support.pipeline import FAST, clone_outputs, pipeline_root

ROWS = [
    {"q": "3 더하기 4는 얼마인가요?", "choices": ["7입니다.", "9입니다.", "12입니다."], "label": 0},
    {"q": "What is the capital of France?", "choices": ["Rome.", "Paris.", "Seoul."], "label": 1},
    {"q": "Give the Korean word for this: shoe", "choices": ["사과", "의자", "신발"], "label": 2},
    {"q": "다음 단어는 몇 글자인가요? 사과", "choices": ["2글자입니다.", "5글자입니다.", "1글자입니다."], "label": 0},
    {"q": "What do you get when you add 5 to 9?", "choices": ["13.", "14.", "15."], "label": 1},
]

TASK_YAML = """\
task: kit_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
    train: {data}
output_type: multiple_choice
test_split: test
fewshot_split: train
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_lm_eval_is_imported_only_when_benchmarks_run():
    code = ("import sys, qlora_kit.evaluate, qlora_kit.scoring.lm_eval, qlora_kit.config; "
            "assert 'lm_eval' not in sys.modules, 'lm_eval imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_headline_reads_tasks_and_nested_groups():
    res = {"results": {"mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.01, "alias": "mmlu"},
                       "arc_challenge": {"acc,none": 0.4, "acc_norm,none": 0.45, "acc_norm_stderr,none": 0.02}},
           "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_anatomy", "mmlu_astronomy"],
                              "arc_challenge": []},
           "n-samples": {"mmlu_anatomy": {"effective": 135}, "mmlu_astronomy": {"effective": 152},
                         "arc_challenge": {"effective": 1172}},
           "n-shot": {"mmlu_anatomy": 5, "arc_challenge": 25}}
    assert benchmarks.headline(Benchmark(task="mmlu"), res) == {"acc": 0.5, "acc_stderr": 0.01, "n": 287,
                                                                  "num_fewshot": 5}
    assert benchmarks.headline(Benchmark(task="arc_challenge", metric="acc_norm"), res) == {
        "acc_norm": 0.45, "acc_norm_stderr": 0.02, "n": 1172, "num_fewshot": 25}
    with pytest.raises(KeyError, match="no metric 'mc2'"):
        benchmarks.headline(Benchmark(task="arc_challenge", metric="mc2"), res)


def test_every_recipe_preset_names_a_task_lm_eval_knows():
    # The names lm-eval's TaskManager indexes, read from its task YAMLs directly (building a
    # TaskManager parses all ~10k of them: 20 s on this machine).
    import importlib.util
    import re
    from pathlib import Path

    tasks_dir = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"
    known = {m.group(2) for f in tasks_dir.rglob("*.yaml")
             for m in re.finditer(r"(?m)^(task|group): *([\w.-]+) *$", f.read_text(encoding="utf-8", errors="replace"))}
    assert {"arc_challenge", "hellaswag", "mmlu", "kobest", "kmmlu"} <= known
    for name in ("alpagasus2", "alpagasus2-13b", "komt", "llama2-koalpaca", "llama2-koalpaca-7b", "polyglot-koalpaca"):
        recipe = load_recipe(name)
        assert recipe.eval.benchmarks and not recipe.eval.run_benchmarks, name  # listed, off by default
        for b in recipe.eval.benchmarks:
            assert b.task in known, (name, b.task)
    assert not load_recipe("tiny").eval.benchmarks


@pytest.mark.slow
def test_evaluate_runs_a_local_lm_eval_task_on_the_merged_model(tmp_path_factory, tmp_path, monkeypatch):
    root = clone_outputs(pipeline_root(tmp_path_factory), tmp_path / "root")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "kit_tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    (tasks / "kit_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    for var, value in {"QLORA_KIT_ROOT": str(root), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}.items():
        monkeypatch.setenv(var, value)
    over = {**FAST, "eval.run_benchmarks": True, "eval.benchmark_tasks_dir": str(tasks),
            "eval.benchmarks": [{"name": "tiny_mc", "task": "kit_tiny_mc", "num_fewshot": 1, "metric": "acc_norm",
                                 "origin": "kit"},
                                {"name": "missing", "task": "no_such_task_anywhere", "num_fewshot": 0}],
            "expected.metrics": {"tiny_mc": {"value": {"mc": 40.0}, "scale": 100, "tolerance": {"mc": 60.0},
                                             "metric": {"mc": "benchmarks.tiny_mc.acc_norm"}}}}
    m = evaluate.run(load_recipe("tiny", over), over)
    b = m["benchmarks"]
    assert b["status"] == "1 of 2 presets failed: missing"
    assert b["missing"]["status"].startswith("failed: ") and "no_such_task_anywhere" in b["missing"]["status"]
    tiny = b["tiny_mc"]
    assert tiny["status"] == "ok" and tiny["n"] == len(ROWS) and tiny["num_fewshot"] == 1
    assert tiny["acc_norm"] * len(ROWS) == pytest.approx(round(tiny["acc_norm"] * len(ROWS)))  # k of 5 right
    assert 0 <= tiny["acc_norm"] <= 1 and tiny["acc_norm_stderr"] > 0
    exp = m["expected"]["tiny_mc"]
    assert exp["reproduced"] == {"mc": pytest.approx(100 * tiny["acc_norm"])} and exp["within_tolerance"] is True
    full = json.loads((root / "reports/tiny/evaluate/benchmarks.json").read_text())
    assert full["tiny_mc"]["configs"]["kit_tiny_mc"]["num_fewshot"] == 1
    assert full["tiny_mc"]["lm_eval_version"] == "0.4.13"
    report = (root / "reports/tiny/report.md").read_text()
    assert "Status: 1 of 2 presets failed: missing" in report
    assert f"| tiny_mc | kit_tiny_mc | 1 | acc_norm | {tiny['acc_norm']:.4g} |" in report
    saved = json.loads((root / "reports/tiny/details.json").read_text())
    assert saved["benchmarks"]["tiny_mc"]["acc_norm"] == tiny["acc_norm"]
    assert saved["benchmarks"]["status"] == "1 of 2 presets failed"
