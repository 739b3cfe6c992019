"""Evaluate stage: what training changed, and whether every artifact behaves the same.

    qlora-kit evaluate --recipe tiny       (dvc: evaluate@tiny)

Measures, on the validation split (completion-only loss, as preprocess labelled it):
- loss and perplexity of the base model (before) and the merged model (after), in HF;
- the same loss for each GGUF in llama.cpp (llama-cpp-python), from the same token ids;
- greedy generations on held-out prompts (the recipe's inference form, BOS explicit) in HF and
  in each GGUF: the share that ends with EOS before max_new_tokens, answer lengths, and the share
  that exactly matches the reference answer.
Against the source (the reproduction report):
- the source's prompt sets (`eval.prompt_sets`, read from a local mirror or downloaded at the
  pinned commit, sha256-checked; see prompt_sets.py) answered by the merged model with the
  source's generation settings, and judged (komt 0-5 / AlpaGasus pairwise, judge.py) when a judge
  endpoint is configured (QLORA_KIT_JUDGE_BASE_URL / QLORA_KIT_JUDGE_MODEL or eval.judge_*; key
  from QLORA_KIT_JUDGE_API_KEY); judged calls are cached in `reports/NAME/judge_cache.jsonl`.
  Without a judge the stage stays offline and the report says how to configure one;
- lm-evaluation-harness presets (`eval.benchmarks`, benchmarks.py) with `eval.run_benchmarks`;
- the recipe's `expected:` numbers next to what this run measured, within tolerance or not;
- GGUF parity from the quantize stage (`reports/NAME/gguf_parity.json`, when present), the
  source's own training curve (`eval.reference_curve`) under ours, and an environment
  fingerprint (every installed package, platform, device).
Writes `reports/NAME/metrics.json` (the numbers-only headline for `dvc metrics show/diff`),
`details.json` (every number and short status word), `report.md` (linking the loss curve, a PNG
file in `evaluate/`) and `reports/NAME/evaluate/` (generations, prompt-set answers and judgements,
lm-eval results, loss_curve.png, manifest). Torch and llama.cpp use QLORA_KIT_THREADS threads (default 1).
HF generations run `eval.generation_batch_size` prompts at a time; so do a greedy recipe's GGUF
generations, as parallel sequences of one llama.cpp context (a sampling recipe's GGUF generates
one prompt at a time in the context its loss was measured in, keeping the prompt prefix the
context already holds; scoring/generation.py). Generation time per 100 prompts (wall and CPU, per model and prompt set)
goes to the run report `reports/NAME/evaluate_run.json` under `generation`, never into the metrics.
A judged set whose judge failed, or whose judge replies mostly did not parse (judge/live.py,
MAX_UNPARSED), has status `failed`: the reports are still written, and the stage exits 1.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from qlora_kit.config import Recipe
from qlora_kit.scoring.expected import compare_expected
from qlora_kit.artifacts import environment
from qlora_kit.scoring.report import for_dvc, headline, plot_loss, read_reference_curve, render_report
from qlora_kit.scoring.logprobs import gguf_completion_loss, hf_completion_loss
from qlora_kit.scoring.generation import gguf_generate, hf_generate, prompt_ids, summarize
from qlora_kit.judge import client as judge_client
from qlora_kit.judge import live as judge_live


# --- environment, expected numbers -----------------------------------------------------------


# --- prompt sets: generate with the merged model, judge ---------------------------------------

def load_prompt_sets(recipe: Recipe, cache_dir: Path, online: bool) -> list:
    from qlora_kit.sources.prompt_sets import load_prompt_set

    return [load_prompt_set(ps, cache_dir, allow_download=online) for ps in recipe.eval.prompt_sets]


def prompt_set_answers(recipe: Recipe, model, tok, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The merged model's answers to prompt-set rows, with the source's generation settings."""
    prompts = [prompt_ids(recipe, tok, {"instruction": r["instruction"], "input": r.get("input", "")})
               for r in rows]
    return hf_generate(model, tok, recipe, prompts)


def _timed(times: dict[str, Any], label: str, n: int, fn: Any, *args: Any) -> Any:
    """fn(*args), with its wall and CPU seconds per 100 of its n prompts in `times[label]` (the
    run report's volatile generation timings)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    times[label] = {"prompts": n, "s_per_100_prompts": round(100 * wall / max(n, 1), 3),
                    "cpu_s_per_100_prompts": round(100 * cpu / max(n, 1), 3)}
    return out


def judge_prompt_sets(sets: list, answers: dict[str, list[dict[str, Any]]], endpoint, cache_path: Path,
                      client_options: dict[str, Any] | None = None,
                      ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Judge every judged prompt set that has answers; (metrics["judge"], per-item records).
    `client_options` go to JudgeClient (retries, backoff, sleep; tests shorten them).

    A judge that fails for good (retries spent, HTTP 4xx) marks its set failed and the stage goes
    on: everything judged so far is in the cache, so a rerun (`dvc repro -f evaluate@NAME`)
    pays only for the rest.
    """

    judged = [s for s in sets if s.spec.judge != "none"]
    out: dict[str, Any] = {"status": endpoint.message.removeprefix("judge: ") if judged
                           else "off: the recipe has no judged prompt sets",
                           "configured": bool(judged and endpoint.configured)}
    records: dict[str, list[dict[str, Any]]] = {}
    if not judged:
        return out, records
    client = None
    if endpoint.configured:
        client = judge_client.JudgeClient(endpoint.base_url, endpoint.model, require_api_key=endpoint.require_api_key,
                                   cache_path=cache_path, **(client_options or {}))
        out["model"] = endpoint.model
    failed_on = ""
    for s in judged:
        entry: dict[str, Any] = {"style": s.spec.judge}
        if s.unavailable:
            entry["status"] = f"unavailable: {s.unavailable}"
        elif client is None:
            entry["status"] = "off: judge not configured (see the LLM judge section)"
        elif failed_on:  # an unreachable judge would cost every set its full retry budget
            entry["status"] = f"failed: not judged, the judge failed on {failed_on}"
        else:
            texts = [g["text"] for g in answers[s.name]]
            rows = s.rows[: len(texts)]
            try:
                if s.spec.judge == "komt":
                    table, recs = judge_live.judge_komt_set(client, rows, texts)
                else:
                    table, recs = judge_live.judge_alpagasus_set(client, rows, texts, (s.baseline or [])[: len(texts)])
                entry.update(table, status=judge_live.set_status(table), of_prompts=len(s.rows))
                records[s.name] = recs
            except judge_client.JudgeError as e:
                entry["status"] = f"failed: {e}; rerun to resume from {cache_path.name}"
                failed_on = s.name
        out[s.name] = entry
    if client is not None:
        st = client.stats
        out.update(http_requests=st.http_requests, retries=st.retries, cache_hits=st.cache_hits,
                   completions=st.completions)
    return out, records


def _benchmarks(recipe: Recipe, merged: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    e = recipe.eval
    if not e.benchmarks:
        return {"status": "off: the recipe lists no benchmarks (eval.benchmarks)"}, {}
    names = ", ".join(b.name or b.task for b in e.benchmarks)
    if not e.run_benchmarks:
        return {"status": f"off: set eval.run_benchmarks=true to run {names} with lm-evaluation-harness "
                          "(it downloads the data sets from the Hugging Face Hub)"}, {}
    from qlora_kit import layout
    from qlora_kit.scoring import lm_eval as benchmarks

    include = layout.root() / e.benchmark_tasks_dir if e.benchmark_tasks_dir else None
    numbers, full = benchmarks.run(e.benchmarks, merged, include_path=include,
                                   trust_remote_code=recipe.model.trust_remote_code)
    failed = [k for k, v in numbers.items() if v.get("status") != "ok"]
    status = "ok" if not failed else f"{len(failed)} of {len(numbers)} presets failed: {', '.join(failed)}"
    return {"status": status, **numbers}, full


def _reference_curve(e: Any, downloads: Path, online: bool) -> tuple[dict[str, Any] | None, str]:
    """The source's own training curve (eval.reference_curve), or why it is unavailable."""
    from qlora_kit.errors import DataError
    from qlora_kit.sources.prompt_sets import Unavailable, locate

    if e.reference_curve is None:
        return None, ""
    try:
        ref_path, ref_file = locate(e.reference_curve, downloads, allow_download=online)
        return {**read_reference_curve(ref_path), "file": ref_file}, ""
    except Unavailable as ex:
        return None, f"unavailable: {ex}"
    except (ValueError, KeyError, TypeError) as ex:  # a verified file that is not a trainer_state.json
        raise DataError(f"eval.reference_curve: {e.reference_curve.path}: {ex}") from None


def _eval_rows(processed: Path, e: Any) -> tuple[list[dict[str, Any]], str]:
    from qlora_kit.text.examples import read_split

    val = read_split(processed, "val")
    if val:
        return val, "val"
    # komt and the Polyglot run trained on everything (no held-out split); like the Polyglot
    # EVAL notebook we then measure on a sample of the training rows, and say so in the report
    return (read_split(processed, "train")[: max(e.num_prompts, 64)],
            "train-sample (the recipe holds out no validation split)")


def _hf_phase(recipe: Recipe, paths: Any, tok: Any, val: list, prompts: list, refs: list,
              metrics: dict[str, Any], gens: dict[str, list], times: dict[str, Any]) -> Any:
    """Validation loss of the base and the merged model, the merged model's generations; returns
    the merged model (the prompt sets are answered with it next)."""
    import torch
    from transformers import AutoModelForCausalLM

    load = dict(dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code,
                use_safetensors=not recipe.model.allow_pickle or None)
    base = AutoModelForCausalLM.from_pretrained(str(paths.base), **load).eval()
    metrics["val_loss_before"] = hf_completion_loss(base, val)
    del base
    merged = AutoModelForCausalLM.from_pretrained(str(paths.merged), **load).eval()
    metrics["val_loss_after"] = hf_completion_loss(merged, val)
    for k in ("before", "after"):
        metrics[f"val_ppl_{k}"] = math.exp(min(metrics[f"val_loss_{k}"], 50))
    gens["hf"] = _timed(times, "hf", len(prompts), hf_generate, merged, tok, recipe, prompts)
    metrics["hf"] = summarize(gens["hf"], refs)
    return merged


def _answer_sets(recipe: Recipe, sets: list, merged: Any, tok: Any, judge_configured: bool,
                 times: dict[str, Any]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The prompt sets the source evaluated on, answered by the merged model with the source's
    generation settings (eval.*). Judged sets are answered only when their judge can run."""
    limit = recipe.eval.prompt_set_limit or None
    set_answers: dict[str, list[dict[str, Any]]] = {}
    set_metrics: dict[str, Any] = {}
    for s in sets:
        if s.unavailable:
            set_metrics[s.name] = {"status": f"unavailable: {s.unavailable}"}
            continue
        if s.spec.judge != "none" and not judge_configured:
            set_metrics[s.name] = {"status": "not answered: judge not configured", "prompts": len(s.rows)}
            continue
        rows = s.rows[:limit]
        answers = _timed(times, f"prompt_set-{s.name}", len(rows), prompt_set_answers, recipe, merged, tok, rows)
        set_answers[s.name] = answers
        lens = [a["tokens"] for a in answers] or [0]
        set_metrics[s.name] = {"status": "ok", "prompts": len(s.rows), "answered": len(answers),
                               "eos_rate": sum(a["ended_with_eos"] for a in answers) / max(len(answers), 1),
                               "answer_tokens_mean": sum(lens) / max(len(answers), 1)}
    return set_answers, set_metrics


def _gguf_phase(recipe: Recipe, gguf_dir: Path, tok: Any, val: list, prompts: list, refs: list,
                threads: int, gens: dict[str, list], times: dict[str, Any]) -> dict[str, Any]:
    """Validation loss and generations of every GGUF (scoring/generation.gguf_generate: batched
    sequences for a greedy recipe, else one prompt at a time in the loss's context)."""
    from qlora_kit.gguf.runtime import open_gguf

    out: dict[str, Any] = {}
    for f in sorted(gguf_dir.glob("model-*.gguf")):
        qtype = f.stem.removeprefix("model-")
        n_ctx = max([512] + [len(r["input_ids"]) + recipe.eval.max_new_tokens + 8 for r in val])
        # n_threads_batch too: llama-cpp-python would decode prompts on every core otherwise
        with open_gguf(f, n_ctx=n_ctx, logits_all=True, seed=0, n_threads=threads, n_threads_batch=threads) as llm:
            loss = gguf_completion_loss(llm, val)
            gens[f"gguf-{qtype}"] = _timed(times, f"gguf-{qtype}", len(prompts), gguf_generate, llm, tok, recipe,
                                           prompts)
        out[qtype] = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), **summarize(gens[f"gguf-{qtype}"], refs)}
    return out


def _stage_reports(reports: Path, gguf_metrics: dict[str, Any]) -> dict[str, Any]:
    """The earlier stages' reports; GGUF parity figures copied into each GGUF's metrics."""
    extras = {name: json.loads((reports / name).read_text())
              for name in ("data_report.json", "merge_parity.json", "gguf_parity.json")
              if (reports / name).exists()}
    for qtype, p in extras.get("gguf_parity.json", {}).get("types", {}).items():
        if qtype in gguf_metrics and isinstance(p, dict):
            gguf_metrics[qtype].update({f"parity_{k}": p[k] for k in ("mean_kl", "top1_agreement", "passed")
                                        if k in p})
    return extras


def _write_answer_files(tmp: Path, held: list, gens: dict[str, list], sets: list,
                        set_answers: dict[str, list], judge_records: dict[str, list]) -> None:
    with open(tmp / "generations.jsonl", "w", encoding="utf-8") as fh:
        for i, r in enumerate(held):
            fh.write(json.dumps({"instruction": r["instruction"], "input": r["input"], "reference": r["output"],
                                 **{k: v[i] for k, v in gens.items()}}, ensure_ascii=False) + "\n")
    for name, answers in set_answers.items():
        rows = next(s.rows for s in sets if s.name == name)
        recs = judge_records.get(name, [])
        (tmp / "prompt_sets").mkdir(exist_ok=True)
        with open(tmp / "prompt_sets" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for i, a in enumerate(answers):
                row = {k: rows[i][k] for k in ("id", "instruction", "input") if k in rows[i]}
                fh.write(json.dumps({**row, **a, **(recs[i] if i < len(recs) else {})},
                                    ensure_ascii=False) + "\n")


def _train_facts(paths: Any) -> dict[str, Any]:
    train_manifest = json.loads((paths.adapter / "manifest.json").read_text())
    train_manifest["facts"]["resumed_from"] = _resumed_from(paths.reports / "train_run.json")
    return train_manifest["facts"]


def _finish_metrics(recipe: Recipe, metrics: dict[str, Any], train_facts: dict[str, Any],
                    env: dict[str, Any]) -> dict[str, Any]:
    """The train, environment and expected-vs-reported parts of the metrics; returns the train
    run's final facts."""
    fin = train_facts.get("final", {})
    metrics["train"] = {k: fin[k] for k in ("global_step", "train_loss") if k in fin}
    metrics["environment"] = {"fingerprint": env["fingerprint"], "python": env["python"], "device": env["device"],
                              **{k: env["packages"][k] for k in ("torch", "transformers", "llama-cpp-python")}}
    metrics["expected"] = compare_expected(recipe.expected.metrics, metrics)
    return fin


def _inputs(recipe: Recipe, paths: Any) -> None:
    """Refuse model folders with foreign code or pickles, and GGUFs that differ from their record."""
    from qlora_kit.artifacts import verify_recorded
    from qlora_kit.sources import model_safety

    for folder in (paths.base, paths.merged):  # before any tokenizer or model is loaded
        model_safety.check(folder, recipe.model)
    q_files = _quantize_files(paths.gguf)
    verify_recorded(paths.gguf, {i["file"]: i["sha256"] for i in q_files.values()}, "quantize", recipe.name)


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from qlora_kit import layout
    from qlora_kit.artifacts import StageRun, atomic_dir, write_json
    from qlora_kit.judge.client import resolve_endpoint
    from qlora_kit.text.tokenizer import load_tokenizer

    paths = layout.paths(recipe.name)
    _inputs(recipe, paths)
    st = StageRun("evaluate", recipe, overrides)
    threads = st.use_threads()  # torch here; llama.cpp in _gguf_phase
    for label in ("processed", "merged", "gguf"):
        st.add_input(label, getattr(paths, label))
    torch.manual_seed(0)
    e = recipe.eval
    # Evaluation inputs first (a prompt file that does not fit the field mapping stops the stage
    # before any model loads). Pinned files are downloaded only when a judge is configured (an
    # online run anyway); otherwise a file missing from the local mirror is reported unavailable.
    endpoint, downloads = resolve_endpoint(e.judge_base_url, e.judge_model), paths.reports / "prompt_sets"
    sets = load_prompt_sets(recipe, downloads, endpoint.configured)
    reference, reference_note = _reference_curve(e, downloads, endpoint.configured)
    val, split = _eval_rows(paths.processed, e)
    held = val[: e.num_prompts]
    tok = load_tokenizer(paths.merged, recipe.template, trust_remote_code=recipe.model.trust_remote_code)
    prompts, refs = [prompt_ids(recipe, tok, r) for r in held], [r["output"] for r in held]
    metrics: dict[str, Any] = {"val_rows": len(val), "eval_split": split, "prompts": len(held)}
    gens, times = {}, st.volatile.setdefault("generation", {})  # per model: held-out generations, their timings
    merged = _hf_phase(recipe, paths, tok, val, prompts, refs, metrics, gens, times)
    st.lap("hf")
    set_answers, set_metrics = _answer_sets(recipe, sets, merged, tok, endpoint.configured, times)
    del merged
    st.lap("prompt_sets")
    judge_metrics, judge_records = judge_prompt_sets(sets, set_answers, endpoint,
                                                     paths.reports / "judge_cache.jsonl")
    st.lap("judge")
    metrics["gguf"] = _gguf_phase(recipe, paths.gguf, tok, val, prompts, refs, threads, gens, times)
    st.lap("gguf")
    extras = _stage_reports(paths.reports, metrics["gguf"])
    metrics["benchmarks"], bench_full = _benchmarks(recipe, paths.merged)
    st.lap("benchmarks")
    metrics["prompt_sets"], metrics["judge"] = set_metrics, judge_metrics
    train_facts, env = _train_facts(paths), environment()
    fin = _finish_metrics(recipe, metrics, train_facts, env)
    with atomic_dir(paths.reports / "evaluate") as tmp:
        has_plot = plot_loss(paths.reports / "train_log.csv", tmp / "loss_curve.png", reference,
                             fin.get("global_step"))
        _write_answer_files(tmp, held, gens, sets, set_answers, judge_records)
        if bench_full:
            write_json(tmp / "benchmarks.json", json.loads(json.dumps(bench_full, default=str)))
        st.facts.update(metrics=metrics, environment=env, eval_files={s.name: s.files for s in sets},
                        reference_curve=(reference or {}).get("file") or reference_note or None)
        write_json(tmp / "manifest.json", st.manifest())
        report = render_report(recipe, metrics, extras, train_facts, gens, held,
                               (tmp / "loss_curve.png") if has_plot else None,
                               sets=sets, set_answers=set_answers, judge_records=judge_records, env=env,
                               reference=reference, reference_note=reference_note)
    _publish(paths.reports, metrics, report, st)
    _raise_on_failed_judge(judge_metrics, paths.reports / "report.md")
    return metrics


def _publish(reports: Path, metrics: dict[str, Any], report: str, st: Any) -> None:
    """details.json, the metrics.json headline, report.md and the run report, in that order."""
    from qlora_kit.artifacts import write_atomic, write_json

    head = headline(metrics)
    write_json(reports / "details.json", for_dvc(metrics))
    write_json(reports / "metrics.json", head)
    write_atomic(reports / "report.md", report)
    st.write_run_report(reports)
    for line in headline_lines(head, reports):
        print(f"evaluate: {line}", flush=True)


def headline_lines(h: dict[str, Any], reports: Path) -> list[str]:
    """The stage's last words: what training did, whether every artifact ends its answers, where
    the report is (the numbers of metrics.json)."""
    def pct(x: Any) -> str:
        return f"{100 * x:.0f} %" if isinstance(x, (int, float)) else "n/a"

    loss, eos, kl = h.get("loss", {}), h.get("eos", {}), h.get("kl", {})
    before, after = loss.get("before"), loss.get("after")
    first = (f"validation loss {before:.4f} -> {after:.4f} (base -> merged)" if None not in (before, after)
             else "validation loss: n/a")
    if h.get("steps") is not None:
        first += f" after {h['steps']} training steps"
    second = f"answers ending with EOS: HF {pct(eos.get('hf'))}, lowest GGUF {pct(eos.get('gguf'))}"
    if kl:
        second += "; GGUF vs HF mean KL " + ", ".join(f"{q} {v:.4f}" for q, v in sorted(kl.items()))
    judge = h.get("judge", {})
    if judge:
        second += "; judge " + ", ".join(f"{k} {v}" for k, v in sorted(judge.items()))
    return [first, second, f"report: {reports / 'report.md'} (numbers: metrics.json, details.json)"]


class EvaluationFailed(RuntimeError):
    """A judged prompt set failed; the reports are written, the stage exits 1 (cli.py)."""


def _raise_on_failed_judge(judge: dict[str, Any], report: Path) -> None:
    failed = [f"{k}: {v['status'].removeprefix('failed: ')}" for k, v in judge.items()
              if isinstance(v, dict) and str(v.get("status", "")).startswith("failed")]
    if failed:
        raise EvaluationFailed(f"judge failed on {len(failed)} prompt set(s): {'; '.join(failed)} (see {report})")


def _resumed_from(run_report: Path) -> str | None:
    """The checkpoint the train run resumed from, from its run report (a volatile fact)."""
    try:
        return json.loads(run_report.read_text(encoding="utf-8")).get("resumed_from")
    except (OSError, ValueError, AttributeError):
        return None


def _quantize_files(gguf: Path) -> dict[str, dict[str, Any]]:
    """The GGUF files (name, sha256) the quantize manifest recorded; {} when there is none yet."""
    try:
        return json.loads((gguf / "manifest.json").read_text(encoding="utf-8"))["facts"]["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
