"""lm-evaluation-harness benchmarks on the merged model (evaluate stage, `eval.benchmarks`).

    qlora-kit evaluate --recipe alpagasus2 --set eval.run_benchmarks=true

Each recipe lists presets in `eval.benchmarks` (task or group, few-shot count, headline metric):
the Open LLM Leaderboard set the AlpaGasus2 README reports (ARC 25-shot acc_norm, HellaSwag
10-shot acc_norm, MMLU 5-shot acc, TruthfulQA mc2 0-shot), and for the Korean recipes KoBEST,
KMMLU and HAE-RAE. They run only with `eval.run_benchmarks: true`: lm-eval downloads the data sets
from the Hugging Face Hub, and MMLU alone is ~14k documents x 5 shots (hours for a 13B model).

lm-eval's own HF backend (`HFLM`) loads `models/NAME/merged` once and `lm_eval.simple_evaluate`
runs one preset at a time, because the few-shot count is per call. `lm_eval` is imported only
here, and only when benchmarks run. Extra task YAMLs (a kit-defined task, or the test's local one)
are found through `include_path` (`eval.benchmark_tasks_dir`).

Results: `metrics["benchmarks"][name]` = {<metric>, <metric>_stderr, n, num_fewshot} for
metrics.json, and lm-eval's full result dict per preset in `reports/NAME/evaluate/benchmarks.json`.
A preset that fails (no network, unknown task) is recorded as failed with the reason; the others
still run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from qlora_kit.config import Benchmark


def _clean_key(key: str) -> str:
    """lm-eval result keys are "metric,filter"; the default filter "none" is dropped."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def _numbers(entry: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in entry.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[_clean_key(k)] = float(v)
    return out


def _leaves(task: str, groups: dict[str, list[str]]) -> list[str]:
    """The leaf tasks under a (possibly nested) group: mmlu -> mmlu_stem -> mmlu_anatomy, ..."""
    if task not in groups or not groups[task]:
        return [task]
    return [leaf for sub in groups[task] for leaf in _leaves(sub, groups)]


def headline(bench: Benchmark, results: dict[str, Any]) -> dict[str, Any]:
    """The preset's numbers for metrics.json from one simple_evaluate result."""
    entry = results.get("groups", {}).get(bench.task) or results.get("results", {}).get(bench.task)
    if entry is None:
        raise KeyError(f"lm-eval returned no result for {bench.task!r} (got {sorted(results.get('results', {}))})")
    nums = _numbers(entry)
    if bench.metric not in nums:
        raise KeyError(f"{bench.task}: no metric {bench.metric!r} in lm-eval's result ({sorted(nums)})")
    out: dict[str, Any] = {bench.metric: nums[bench.metric]}
    if f"{bench.metric}_stderr" in nums:
        out[f"{bench.metric}_stderr"] = nums[f"{bench.metric}_stderr"]
    leaves = _leaves(bench.task, results.get("group_subtasks", {}))
    samples = results.get("n-samples", {})
    n = sum(samples.get(t, {}).get("effective", 0) for t in leaves)
    if n:
        out["n"] = n
    shots = results.get("n-shot", {})
    fewshot = shots.get(bench.task, shots.get(leaves[0]) if leaves else None)
    if fewshot is not None:
        out["num_fewshot"] = fewshot
    return out


def run(benchmarks: Sequence[Benchmark], merged: Path, *, include_path: str | Path | None = None,
        device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
        batch_size: int | str = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every preset on the merged model. Returns (numbers for metrics.json, full results)."""
    import torch
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "auto" if device.startswith("cuda") else "float32"  # CPU half precision is slow and lossy
    lm = HFLM(pretrained=str(merged), device=device, dtype=dtype, batch_size=batch_size,
              trust_remote_code=trust_remote_code)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    numbers: dict[str, Any] = {}
    full: dict[str, Any] = {}
    for bench in benchmarks:
        name = bench.name or bench.task
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=[bench.task], num_fewshot=bench.num_fewshot,
                                          limit=bench.limit, task_manager=manager, log_samples=False,
                                          batch_size=batch_size)
            if res is None:  # non-zero ranks in a distributed run; not how the kit runs it
                raise RuntimeError("lm-eval returned no results")
            numbers[name] = {**headline(bench, res), "status": "ok"}
            full[name] = {k: v for k, v in res.items() if k not in ("samples", "pretty_env_info")}
        except Exception as e:  # noqa: BLE001 - one failed preset must not lose the others
            first = (str(e).strip().splitlines() or [""])[0][:300]
            numbers[name] = {"status": f"failed: {type(e).__name__}: {first}"}
    del lm
    return numbers, full
