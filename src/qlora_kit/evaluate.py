"""Evaluate stage: what training changed, and whether every artifact behaves the same.

    qlora-kit evaluate --recipe tiny       (dvc: evaluate@tiny)

Measures, on the validation split (completion-only loss, as preprocess labelled it):
- loss and perplexity of the base model (before) and the merged model (after), in HF;
- the same loss for each GGUF in llama.cpp (llama-cpp-python), from the same token ids;
- greedy generations on held-out prompts (the recipe's inference form, BOS explicit) in HF and
  in each GGUF: the share that ends with EOS before max_new_tokens, answer lengths, and the share
  that exactly matches the reference answer.
Against the source (the reproduction report):
- the source's prompt sets (`eval.prompt_sets`, read from ../shared/data or downloaded at the
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
Writes `reports/NAME/metrics.json` (numbers and short status words for `dvc metrics show/diff`),
`report.md` (with the loss curve as an embedded PNG) and `reports/NAME/evaluate/` (generations,
prompt-set answers and judgements, lm-eval results, plot, manifest).
"""
from __future__ import annotations

import base64
import csv
import json
import math
from pathlib import Path
from typing import Any

from .config import Recipe


def hf_completion_loss(model, rows: list[dict[str, Any]]) -> float:
    """Mean NLL over loss-bearing tokens (labels != -100), summed over rows, in nats/token."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            labels = torch.tensor([r["labels"]])
            logits = model(input_ids=ids).logits.float()[0, :-1]
            tgt = labels[0, 1:]
            mask = tgt != -100
            if mask.any():
                lp = torch.log_softmax(logits[mask], -1)
                nll -= float(lp.gather(1, tgt[mask].unsqueeze(1)).sum())
                n += int(mask.sum())
    return nll / max(n, 1)


def gguf_completion_loss(llm, rows: list[dict[str, Any]]) -> float:
    import numpy as np

    nll, n = 0.0, 0
    for r in rows:
        ids, labels = r["input_ids"], r["labels"]
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        for pos in range(len(ids) - 1):
            tgt = labels[pos + 1]
            if tgt == -100:
                continue
            row = scores[pos]
            m = row.max()
            nll -= row[tgt] - (m + math.log(np.exp(row - m).sum()))
            n += 1
    return nll / max(n, 1)


def prompt_ids(recipe: Recipe, tok, row: dict[str, str]) -> list[int]:
    from .templates import render_inference

    text = render_inference(recipe.template, row, bos=tok.bos, eos=tok.eos)
    bos = [tok.bos_id] if (recipe.template.add_bos and tok.bos_id is not None) else []
    return bos + tok.encode(text)


def _answer(expected: str, got: str) -> bool:
    return got.strip() == expected.strip()


def hf_generate(model, tok, recipe: Recipe, prompts: list[list[int]]) -> list[dict[str, Any]]:
    import torch

    e = recipe.eval
    out = []
    with torch.no_grad():
        for ids in prompts:
            kw: dict[str, Any] = dict(max_new_tokens=e.max_new_tokens, do_sample=e.do_sample,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                      repetition_penalty=e.repetition_penalty)
            if e.do_sample:
                kw.update(temperature=e.temperature, top_p=e.top_p, top_k=e.top_k)
            gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 **kw)[0, len(ids):].tolist()
            ended = tok.eos_id in gen
            new = gen[: gen.index(tok.eos_id)] if ended else gen
            out.append({"tokens": len(new), "ended_with_eos": ended, "text": tok.hf.decode(new, skip_special_tokens=True)})
    return out


def gguf_generate(llm, tok, recipe: Recipe, prompts: list[list[int]]) -> list[dict[str, Any]]:
    e = recipe.eval
    out = []
    for ids in prompts:
        llm.reset()
        new: list[int] = []
        ended = False
        # llama.cpp's own sampler; greedy unless the recipe samples (then the source's settings)
        for t in llm.generate(ids, temp=e.temperature if e.do_sample else 0.0, top_p=e.top_p,
                              top_k=e.top_k if e.do_sample else 1, repeat_penalty=e.repetition_penalty, reset=True):
            if t == tok.eos_id or llm.token_eos() == t:
                ended = True
                break
            new.append(t)
            if len(new) >= e.max_new_tokens:
                break
        text = llm.detokenize(new).decode("utf-8", errors="replace")
        out.append({"tokens": len(new), "ended_with_eos": ended, "text": text})
    return out


def summarize(gens: list[dict[str, Any]], refs: list[str]) -> dict[str, float]:
    n = max(len(gens), 1)
    lens = sorted(g["tokens"] for g in gens) or [0]
    return {"eos_rate": sum(g["ended_with_eos"] for g in gens) / n,
            "exact_match": sum(_answer(r, g["text"]) for g, r in zip(gens, refs)) / n,
            "answer_tokens_mean": sum(lens) / n, "answer_tokens_median": lens[len(lens) // 2],
            "answer_tokens_max": lens[-1]}


def read_reference_curve(path: Path) -> dict[str, Any]:
    """(step, loss) points and the total steps of a transformers `trainer_state.json`."""
    state = json.loads(path.read_text(encoding="utf-8"))
    points = [(int(h["step"]), float(h["loss"])) for h in state.get("log_history", [])
              if isinstance(h, dict) and "loss" in h and "step" in h]
    if not points:
        raise ValueError(f"{path}: log_history holds no training loss")
    total = int(state.get("max_steps") or state.get("global_step") or points[-1][0])
    return {"points": points, "total_steps": total}


def plot_loss(csv_path: Path, png: Path, reference: dict[str, Any] | None = None,
              total_steps: int | None = None) -> bool:
    """The run's loss curve; with a `reference` (the source's trainer_state.json) both curves are
    drawn over the fraction of their own run, so a short smoke run and the source's 17k steps
    share one axis (a full-length reproduction has the same steps, so the x axes agree anyway)."""
    if not csv_path.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss, esteps, eloss = [], [], [], []
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            if r["loss"]:
                steps.append(int(r["step"]))
                loss.append(float(r["loss"]))
            if r["eval_loss"]:
                esteps.append(int(r["step"]))
                eloss.append(float(r["eval_loss"]))
    total = max(total_steps or 0, *(steps or [1]), *(esteps or [1]))
    scale = (lambda xs: [x / total for x in xs]) if reference else (lambda xs: xs)  # noqa: E731
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(scale(steps), loss, label="train loss (this run)" if reference else "train loss")
    if esteps:
        ax.plot(scale(esteps), eloss, "o-", label="val loss")
    if reference:
        rs, rl = zip(*reference["points"])
        ax.plot([s / reference["total_steps"] for s in rs], rl, "--",
                label=f"train loss (source, {reference['total_steps']} steps)")
        ax.set_xlabel("fraction of the training run")
    else:
        ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, metadata={"Software": None})  # no timestamp: same curve, same bytes
    plt.close(fig)
    return True


# --- environment, expected numbers -----------------------------------------------------------

KEY_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets",
                "tokenizers", "llama-cpp-python", "lm-eval", "dvc")


def environment() -> dict[str, Any]:
    """What ran this evaluation: every installed distribution, platform and device, and a
    fingerprint (sha256 of all of it) that changes whenever any of them does."""
    import hashlib
    import os
    import platform
    from importlib import metadata

    import torch

    pkgs = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                   if d.metadata and d.metadata["Name"]}, key=str.lower)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
           "cpus": os.cpu_count(), "device": device,
           "cuda": torch.version.cuda or "none"}
    versions = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    blob = json.dumps({"packages": pkgs, **{k: env[k] for k in ("python", "platform", "device", "cuda")}},
                      sort_keys=True)
    return {"fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16], **env, "packages": versions,
            "all_packages": pkgs}


def _lookup(metrics: dict[str, Any], dotted: str) -> Any:
    cur: Any = metrics
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _why_missing(metrics: dict[str, Any], dotted: str) -> str:
    """The most specific status on the way to a metric this run did not produce."""
    cur: Any = metrics
    why = ""
    for part in dotted.split("."):
        if isinstance(cur, dict) and isinstance(cur.get("status"), str) and cur["status"] != "ok":
            why = cur["status"]
        if not isinstance(cur, dict) or part not in cur:
            break
        cur = cur[part]
    return why or f"this run has no {dotted}"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compare_expected(expected: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """The recipe's `expected:` numbers next to this run's, for metrics.json and the report.

    An entry names the metric it compares with (`metric:`, a dotted metrics.json key, or one per
    sub-value for a dict value) and may carry `tolerance` (same shape as value), `out_of` (the
    size the source measured on; a run on fewer items is not comparable), `scale` (multiplies the
    measured number, e.g. 100 for lm-eval's fractions vs a leaderboard's percent), `applies_to`
    and `cite`. Entries without `metric:` have no counterpart in what the kit measures.
    """
    out: dict[str, Any] = {}
    for key, entry in expected.items():
        value, metric = entry.get("value"), entry.get("metric")
        row: dict[str, Any] = {"source": value, "reproduced": None, "within_tolerance": None}
        if not metric:
            row["status"] = ("not measured in this run: the kit measures no counterpart"
                             + (f" ({entry['applies_to']})" if entry.get("applies_to") else ""))
            out[key] = row
            continue
        scale = float(entry.get("scale", 1.0))
        tol = entry.get("tolerance")
        subkeys = list(value) if isinstance(value, dict) else [None]
        paths = {s: (metric[s] if isinstance(metric, dict) else (f"{metric}.{s}" if s is not None else metric))
                 for s in subkeys if not isinstance(metric, dict) or s in metric}
        got = {s: _lookup(metrics, p) for s, p in paths.items()}
        measured = {s: v * scale for s, v in got.items() if _number(v)}
        if not measured:
            first = next(iter(paths.values()), str(metric))
            row["status"] = f"not measured in this run: {_why_missing(metrics, first)}"
            out[key] = row
            continue
        if entry.get("out_of") is not None:
            parent = ".".join(next(iter(paths.values())).split(".")[:-1])
            size = _lookup(metrics, parent + ".out_of") if parent else None
            if _number(size) and size != entry["out_of"]:
                row["reproduced"] = measured if isinstance(value, dict) else measured[None]
                row["status"] = (f"not comparable: this run measured out of {size}, the source out of "
                                 f"{entry['out_of']} (eval.prompt_set_limit)")
                out[key] = row
                continue
        checks = []
        for s, v in measured.items():
            want = value[s] if s is not None else value
            t = tol.get(s) if isinstance(tol, dict) else (tol if s is None else None)
            if _number(want) and _number(t):
                checks.append(abs(v - want) <= t)
        row["reproduced"] = measured if isinstance(value, dict) else measured[None]
        row["within_tolerance"] = all(checks) if checks else None
        missing = [s for s in subkeys if s not in measured]
        row["status"] = "measured" + (f" (not measured: {', '.join(map(str, missing))})" if missing else "")
        out[key] = row
    return out


# --- prompt sets: generate with the merged model, judge ---------------------------------------

def load_prompt_sets(recipe: Recipe, cache_dir: Path, online: bool) -> list:
    from .prompt_sets import load_prompt_set

    return [load_prompt_set(ps, cache_dir, allow_download=online) for ps in recipe.eval.prompt_sets]


def prompt_set_answers(recipe: Recipe, model, tok, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The merged model's answers to prompt-set rows, with the source's generation settings."""
    prompts = [prompt_ids(recipe, tok, {"instruction": r["instruction"], "input": r.get("input", "")})
               for r in rows]
    return hf_generate(model, tok, recipe, prompts)


def judge_prompt_sets(sets: list, answers: dict[str, list[dict[str, Any]]], endpoint, cache_path: Path,
                      client_options: dict[str, Any] | None = None,
                      ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Judge every judged prompt set that has answers; (metrics["judge"], per-item records).
    `client_options` go to JudgeClient (retries, backoff, sleep; tests shorten them).

    A judge that fails for good (retries spent, HTTP 4xx) marks its set failed and the stage goes
    on: everything judged so far is in the cache, so a rerun (`dvc repro -f evaluate@NAME`)
    pays only for the rest.
    """
    from . import judge

    judged = [s for s in sets if s.spec.judge != "none"]
    out: dict[str, Any] = {"status": endpoint.message.removeprefix("judge: ") if judged
                           else "off: the recipe has no judged prompt sets",
                           "configured": bool(judged and endpoint.configured)}
    records: dict[str, list[dict[str, Any]]] = {}
    if not judged:
        return out, records
    client = None
    if endpoint.configured:
        client = judge.JudgeClient(endpoint.base_url, endpoint.model, require_api_key=endpoint.require_api_key,
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
                    table, recs = judge.judge_komt_set(client, rows, texts)
                else:
                    table, recs = judge.judge_alpagasus_set(client, rows, texts, (s.baseline or [])[: len(texts)])
                entry.update(table, status="ok", of_prompts=len(s.rows))
                records[s.name] = recs
            except judge.JudgeError as e:
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
    from . import benchmarks, layout

    include = layout.root() / e.benchmark_tasks_dir if e.benchmark_tasks_dir else None
    numbers, full = benchmarks.run(e.benchmarks, merged, include_path=include,
                                   trust_remote_code=recipe.model.trust_remote_code)
    failed = [k for k, v in numbers.items() if v.get("status") != "ok"]
    status = "ok" if not failed else f"{len(failed)} of {len(numbers)} presets failed: {', '.join(failed)}"
    return {"status": status, **numbers}, full


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from . import layout, model_safety
    from .artifacts import StageRun, atomic_dir, write_atomic, write_json
    from .judge import resolve_endpoint
    from .preprocess import read_split
    from .prompt_sets import Unavailable, locate
    from .rows import DataError
    from .tokenizer import load_tokenizer

    paths = layout.paths(recipe.name)
    for folder in (paths.base, paths.merged):  # before any tokenizer or model is loaded
        model_safety.check(folder, recipe.model)
    st = StageRun("evaluate", recipe, overrides)
    for label in ("processed", "merged", "gguf"):
        st.add_input(label, getattr(paths, label))
    torch.manual_seed(0)
    e = recipe.eval
    # Evaluation inputs first, so a prompt file that does not fit the recipe's field mapping stops
    # the stage before any model is loaded. Pinned files are downloaded only when a judge is
    # configured (such a run is online anyway); otherwise the stage stays offline like every stage
    # after fetch, and a file missing from ../shared/data is reported as unavailable.
    endpoint = resolve_endpoint(e.judge_base_url, e.judge_model)
    downloads = paths.reports / "prompt_sets"
    sets = load_prompt_sets(recipe, downloads, endpoint.configured)
    reference, reference_note = None, ""
    if e.reference_curve is not None:
        try:
            ref_path, ref_file = locate(e.reference_curve, downloads, allow_download=endpoint.configured)
            reference = {**read_reference_curve(ref_path), "file": ref_file}
        except Unavailable as ex:
            reference_note = f"unavailable: {ex}"
        except (ValueError, KeyError, TypeError) as ex:  # a verified file that is not a trainer_state.json
            raise DataError(f"eval.reference_curve: {e.reference_curve.path}: {ex}") from None
    val = read_split(paths.processed, "val")
    split = "val"
    if not val:
        # komt and the Polyglot run trained on everything (no held-out split); like the Polyglot
        # EVAL notebook we then measure on a sample of the training rows, and say so in the report
        val = read_split(paths.processed, "train")[: max(e.num_prompts, 64)]
        split = "train-sample (the recipe holds out no validation split)"
    held = val[: e.num_prompts]
    tok = load_tokenizer(paths.merged, recipe.template, trust_remote_code=recipe.model.trust_remote_code)
    prompts = [prompt_ids(recipe, tok, r) for r in held]
    refs = [r["output"] for r in held]
    metrics: dict[str, Any] = {"val_rows": len(val), "eval_split": split, "prompts": len(held)}
    gens: dict[str, list] = {}

    load = dict(dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code,
                use_safetensors=not recipe.model.allow_pickle or None)
    base = AutoModelForCausalLM.from_pretrained(str(paths.base), **load).eval()
    metrics["val_loss_before"] = hf_completion_loss(base, val)
    del base
    merged = AutoModelForCausalLM.from_pretrained(str(paths.merged), **load).eval()
    metrics["val_loss_after"] = hf_completion_loss(merged, val)
    for k in ("before", "after"):
        metrics[f"val_ppl_{k}"] = math.exp(min(metrics[f"val_loss_{k}"], 50))
    gens["hf"] = hf_generate(merged, tok, recipe, prompts)
    metrics["hf"] = summarize(gens["hf"], refs)
    st.lap("hf")

    # The prompt sets the source evaluated on, answered by the merged model with the source's
    # generation settings (eval.*). Judged sets are answered only when their judge can run.
    limit = e.prompt_set_limit or None
    set_answers: dict[str, list[dict[str, Any]]] = {}
    set_metrics: dict[str, Any] = {}
    for s in sets:
        if s.unavailable:
            set_metrics[s.name] = {"status": f"unavailable: {s.unavailable}"}
            continue
        if s.spec.judge != "none" and not endpoint.configured:
            set_metrics[s.name] = {"status": "not answered: judge not configured", "prompts": len(s.rows)}
            continue
        answers = prompt_set_answers(recipe, merged, tok, s.rows[:limit])
        set_answers[s.name] = answers
        lens = [a["tokens"] for a in answers] or [0]
        set_metrics[s.name] = {"status": "ok", "prompts": len(s.rows), "answered": len(answers),
                               "eos_rate": sum(a["ended_with_eos"] for a in answers) / max(len(answers), 1),
                               "answer_tokens_mean": sum(lens) / max(len(answers), 1)}
    del merged
    st.lap("prompt_sets")
    judge_metrics, judge_records = judge_prompt_sets(sets, set_answers, endpoint,
                                                     paths.reports / "judge_cache.jsonl")
    st.lap("judge")

    from .gguf_runtime import open_gguf

    metrics["gguf"] = {}
    for f in sorted(paths.gguf.glob("model-*.gguf")):
        qtype = f.stem.removeprefix("model-")
        n_ctx = max([512] + [len(r["input_ids"]) + e.max_new_tokens + 8 for r in val])
        with open_gguf(f, n_ctx=n_ctx, logits_all=True, seed=0) as llm:
            loss = gguf_completion_loss(llm, val)
            gens[f"gguf-{qtype}"] = gguf_generate(llm, tok, recipe, prompts)
        metrics["gguf"][qtype] = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
                                  **summarize(gens[f"gguf-{qtype}"], refs)}
    st.lap("gguf")

    extras = {name: json.loads((paths.reports / name).read_text())
              for name in ("data_report.json", "merge_parity.json", "gguf_parity.json")
              if (paths.reports / name).exists()}
    for qtype, p in extras.get("gguf_parity.json", {}).get("types", {}).items():
        if qtype in metrics["gguf"] and isinstance(p, dict):
            metrics["gguf"][qtype].update({f"parity_{k}": p[k] for k in ("mean_kl", "top1_agreement", "passed")
                                           if k in p})
    metrics["benchmarks"], bench_full = _benchmarks(recipe, paths.merged)
    st.lap("benchmarks")
    metrics["prompt_sets"] = set_metrics
    metrics["judge"] = judge_metrics
    train_manifest = json.loads((paths.adapter / "manifest.json").read_text())
    fin = train_manifest["facts"].get("final", {})
    metrics["train"] = {k: fin[k] for k in ("global_step", "train_loss") if k in fin}
    env = environment()
    metrics["environment"] = {"fingerprint": env["fingerprint"], "python": env["python"], "device": env["device"],
                              **{k: env["packages"][k] for k in ("torch", "transformers", "llama-cpp-python")}}
    metrics["expected"] = compare_expected(recipe.expected.metrics, metrics)
    with atomic_dir(paths.reports / "evaluate") as tmp:
        has_plot = plot_loss(paths.reports / "train_log.csv", tmp / "loss_curve.png", reference,
                             fin.get("global_step"))
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
        if bench_full:
            write_json(tmp / "benchmarks.json", json.loads(json.dumps(bench_full, default=str)))
        st.facts.update(metrics=metrics, environment=env,
                        eval_files={s.name: s.files for s in sets},
                        reference_curve=(reference or {}).get("file") or reference_note or None)
        write_json(tmp / "manifest.json", st.manifest())
        report = render_report(recipe, metrics, extras, train_manifest["facts"], gens, held,
                               (tmp / "loss_curve.png") if has_plot else None,
                               sets=sets, set_answers=set_answers, judge_records=judge_records, env=env,
                               reference=reference, reference_note=reference_note)
    write_json(paths.reports / "metrics.json", for_dvc(metrics))
    write_atomic(paths.reports / "report.md", report)
    return metrics


def for_dvc(metrics: Any) -> Any:
    """metrics.json as `dvc metrics show/diff` reads it: status texts cut to their kind ("off",
    "not configured", "unavailable", "failed", "ok", "not measured in this run", ...); the
    full texts are in report.md and evaluate/manifest.json. Keeps the DVC table readable."""
    if isinstance(metrics, dict):
        return {k: (v.split(":", 1)[0] if k == "status" and isinstance(v, str) else for_dvc(v))
                for k, v in metrics.items()}
    return metrics


def _f(x: Any, nd: int = 4) -> str:
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _cell(x: Any, width: int = 60) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")[:width]


def _value(x: Any) -> str:
    if isinstance(x, dict):
        return ", ".join(f"{k} {_value(v)}" for k, v in x.items())
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def _expected_section(recipe: Recipe, m: dict[str, Any]) -> list[str]:
    rows = m.get("expected", {})
    if not rows:
        return ["## Source reported vs reproduced", "", "The recipe lists no numbers reported by its source "
                "(`expected:` is empty).", ""]
    L = ["## Source reported vs reproduced", "",
         "| metric | applies to | source reported | reproduced | within tolerance | tolerance | cite |",
         "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        entry = recipe.expected.metrics.get(key, {})
        ok = {True: "yes", False: "**no**", None: "-"}[r.get("within_tolerance")]
        got = _value(r["reproduced"]) if r.get("reproduced") is not None else ""
        if r.get("status", "measured").startswith(("not measured", "not comparable")):
            got = (got + "; " if got else "") + r["status"]
        L.append(f"| {key} | {_cell(entry.get('applies_to', 'this run'), 70)} | {_value(r['source'])}"
                 + (f" / {entry['out_of']}" if entry.get("out_of") else "")
                 + f" | {_cell(got, 300)} | {ok} | {_value(entry.get('tolerance'))} | "
                 f"{_cell(entry.get('cite', ''), 90)} |")
    L += ["", "Only numbers this run measured are compared; a comparison needs the same items as the source "
          "(`out_of`) and, for a judge, the judge itself differs from the source's (see the judge section).", ""]
    return L


def _judge_section(m: dict[str, Any]) -> list[str]:
    j = m.get("judge", {})
    L = ["## LLM judge", "", f"judge: {j.get('status', 'off')}", ""]
    if j.get("configured"):
        L += [f"Judge calls: {j.get('http_requests', 0)} HTTP requests ({j.get('retries', 0)} retries), "
              f"{j.get('cache_hits', 0)} answered from `judge_cache.jsonl`.", ""]
    komt = [(k, v) for k, v in j.items() if isinstance(v, dict) and v.get("style") == "komt"]
    pair = [(k, v) for k, v in j.items() if isinstance(v, dict) and v.get("style") == "alpagasus"]
    if any(v.get("status") == "ok" for _, v in komt):
        L += ["komt judge (0-5 per answer; score = sum, average = sum/N, percentage = sum/(5N); an unparseable "
              "judge output counts 0, as in the source's files). The judge prompt is the kit's own (komt never "
              "published its prompt).", "",
              "| prompt set | answers | N | score | average | percentage | unparsed (counted 0) |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for k, v in komt:
            if v.get("status") != "ok":
                continue
            for label, t in (("this run (merged model)", v),
                             ("recorded answers in the prompt file", v.get("recorded"))):
                if t:
                    L.append(f"| {k} | {label} | {t['n']} | {t['sum']} / {t['out_of']} | {t['average']:.2f} | "
                             f"{t['percentage']:.2f} % | {t['unparsed']} |")
        L.append("")
    if any(v.get("status") == "ok" for _, v in pair):
        L += ["AlpaGasus pairwise judge (this run vs the recorded baseline answers, judged in both orders; "
              "+1 per order the model scores higher, -1 lower: total >= 1 win, 0 tie, <= -1 lose; "
              "evaluation.py's prompt and parser).", "",
              "| prompt set | N | win | tie | lose | parse failures (of 2N) |", "|---|---:|---:|---:|---:|---:|"]
        for k, v in pair:
            if v.get("status") == "ok":
                L.append(f"| {k} | {v['n']} | {v['win']} | {v['tie']} | {v['lose']} | {v['parse_failures']} |")
        L.append("")
    for k, v in komt + pair:
        if v.get("status") != "ok":
            L.append(f"- {k} ({v.get('style')}): {v.get('status')}")
        elif v.get("n", 0) < v.get("of_prompts", 0):
            L.append(f"- {k}: judged the first {v['n']} of {v['of_prompts']} prompts (eval.prompt_set_limit)")
    if komt or pair:
        L.append("")
    return L


def _benchmark_section(m: dict[str, Any], recipe: Recipe) -> list[str]:
    b = m.get("benchmarks", {})
    L = ["## Benchmarks (lm-evaluation-harness)", "", f"Status: {b.get('status', 'off')}", ""]
    ran = [(k, v) for k, v in b.items() if isinstance(v, dict)]
    if ran:
        L += ["| preset | task | few-shot | metric | value | stderr | documents | status |",
              "|---|---|---:|---|---:|---:|---:|---|"]
        for bench in recipe.eval.benchmarks:
            name = bench.name or bench.task
            v = b.get(name, {})
            val = v.get(bench.metric)
            err = v.get(f"{bench.metric}_stderr")
            L.append(f"| {name} | {bench.task} | {v.get('num_fewshot', bench.num_fewshot)} | {bench.metric} | "
                     f"{_value(val)} | {_value(err)} | {v.get('n', '-')} | {_cell(v.get('status', 'not run'), 120)} |")
        L.append("")
    elif recipe.eval.benchmarks:
        shots = lambda b: b.num_fewshot if b.num_fewshot is not None else "default"  # noqa: E731
        L += ["Presets: " + "; ".join(f"{b.name or b.task} ({b.task}, {shots(b)}-shot, {b.metric})"
                                      for b in recipe.eval.benchmarks), ""]
    return L


def _parity_section(extras: dict[str, Any]) -> list[str]:
    p = extras.get("gguf_parity.json")
    if not p:
        return ["GGUF parity: no `gguf_parity.json` from the quantize stage.", ""]
    L = [f"GGUF parity (quantize stage, {p.get('rows', '?')} {p.get('split', '')} rows, reference: "
         f"{p.get('reference', '?')}): next-token distributions of each GGUF vs the HF model.", "",
         "| GGUF | mean KL | gate | top-1 agreement | gate | ppl ratio | tokenization | passed |",
         "|---|---:|---:|---:|---:|---:|---|---|"]
    for q, t in p.get("types", {}).items():
        if not isinstance(t, dict):
            continue
        tk = t.get("tokenization", {})
        L.append(f"| {q} | {_value(t.get('mean_kl'))} | {_value(t.get('max_mean_kl'))} | "
                 f"{_value(t.get('top1_agreement'))} | "
                 f"{_value(t.get('min_top1'))} | {_value(t.get('ppl_ratio'))} | "
                 f"{'ok' if tk.get('ok') else 'mismatch' if tk else '-'} | {t.get('passed')} |")
    return L + [""]


def _environment_section(env: dict[str, Any] | None) -> list[str]:
    if not env:
        return []
    pk = env["packages"]
    L = ["## Environment", "",
         f"Fingerprint `{env['fingerprint']}` (sha256 over every installed package, platform and device). "
         f"Python {env['python']} on {env['platform']}; CPU {env['cpu']} ({env['cpus']} cores); device "
         f"{env['device']} (CUDA {env['cuda']}).", "",
         "| " + " | ".join(pk) + " |", "|" + "---|" * len(pk), "| " + " | ".join(pk.values()) + " |", "",
         "<details><summary>all installed packages</summary>", "", "```",
         *env["all_packages"], "```", "", "</details>", ""]
    return L


def render_report(recipe: Recipe, m: dict[str, Any], extras: dict[str, Any], train: dict[str, Any],
                  gens: dict[str, list], held: list[dict], png: Path | None, *, sets: list | None = None,
                  set_answers: dict[str, list] | None = None, judge_records: dict[str, list] | None = None,
                  env: dict[str, Any] | None = None, reference: dict[str, Any] | None = None,
                  reference_note: str = "") -> str:
    sets, set_answers, judge_records = sets or [], set_answers or {}, judge_records or {}
    L = [f"# Reproduction report: {recipe.name}", "", recipe.description, ""]
    if recipe.source.repo:
        L += [f"Source: `{recipe.source.repo}@{recipe.source.commit}`", ""]
    L += _expected_section(recipe, m)
    L += ["## Did it learn?", "",
          "| | before training (base) | after training (merged) |", "|---|---|---|",
          f"| val loss (completion tokens, nats) | {_f(m['val_loss_before'])} | {_f(m['val_loss_after'])} |",
          f"| val perplexity | {_f(m['val_ppl_before'], 2)} | {_f(m['val_ppl_after'], 2)} |", "",
          f"Rows measured: {m['val_rows']} ({m['eval_split']}). Loss falls by "
          f"{_f(m['val_loss_before'] - m['val_loss_after'], 3)} nats/token "
          f"({100 * (1 - m['val_loss_after'] / m['val_loss_before']):.1f} %).", ""]
    L += ["## Artifacts agree", "",
          "| model | val loss | EOS before max_new_tokens | exact match | answer tokens (mean / max) |",
          "|---|---|---|---|---|",
          f"| HF merged | {_f(m['val_loss_after'])} | {m['hf']['eos_rate']:.0%} | {m['hf']['exact_match']:.0%} | "
          f"{m['hf']['answer_tokens_mean']:.1f} / {m['hf']['answer_tokens_max']} |"]
    for q, g in m["gguf"].items():
        L.append(f"| GGUF {q} | {_f(g['val_loss'])} | {g['eos_rate']:.0%} | {g['exact_match']:.0%} | "
                 f"{g['answer_tokens_mean']:.1f} / {g['answer_tokens_max']} |")
    L += ["", f"{m['prompts']} held-out prompts, greedy, max_new_tokens={recipe.eval.max_new_tokens}; "
          "EOS rate = share of generations that emitted EOS before the limit.", ""]
    if "merge_parity.json" in extras:
        p = extras["merge_parity.json"]
        if p.get("max_rel_error") is None:  # the merge stage skipped the fp32 logit check (too big)
            lg = p.get("logits", {})
            L += [f"Merge parity (base `{p.get('base')}`): logit check skipped: {lg.get('skipped', 'see merge_parity.json')}; "
                  "per-module LoRA deltas were checked against peft.", ""]
        else:
            L += [f"Merge parity (merged vs base+adapter, {p['rows']} rows, base `{p['base']}`): max relative logit "
                  f"error {p['max_rel_error']:.2e}, mean {p['mean_rel_error']:.2e}, top-1 agreement "
                  f"{p['top1_agreement']:.1%} (threshold {p['threshold']}).", ""]
    L += _parity_section(extras)
    L += _judge_section(m)
    L += _benchmark_section(m, recipe)
    L += ["## Training", ""]
    d = train.get("derived", {})
    if d:
        L += ["| " + " | ".join(d) + " |", "|" + "---|" * len(d), "| " + " | ".join(str(v) for v in d.values()) + " |", ""]
    for note in train.get("fallbacks", []):
        L.append(f"- Fallback: {note}")
    fin = train.get("final", {})
    if fin:
        L += [f"- Steps run: {fin.get('global_step')}; mean train loss {_f(fin.get('train_loss'))}; "
              f"resumed from: {train.get('resumed_from') or 'no checkpoint'}.", ""]
    if reference is not None:
        pts = reference["points"]
        L += [f"The dashed curve is the source's own training loss (`{recipe.eval.reference_curve.path}`, "
              f"{len(pts)} logged points over {reference['total_steps']} steps, last {pts[-1][1]:.4f}); both curves "
              "are drawn over the fraction of their run.", ""]
    elif reference_note:
        L += [f"Source training curve: {reference_note}", ""]
    if png is not None:
        b64 = base64.b64encode(png.read_bytes()).decode()
        L += ["![loss curve](data:image/png;base64," + b64 + ")", ""]
    if "data_report.json" in extras:
        dr = extras["data_report.json"]
        L += ["## Data", "", f"Rows in {dr['rows_in']}, kept {dr['kept']} (train {dr['kept_by_split'].get('train')}, "
              f"val {dr['kept_by_split'].get('val')}), dropped {dr['dropped']} "
              f"{json.dumps(dr['dropped_by_reason'], ensure_ascii=False)}, truncated {dr['truncated']}.", ""]
    L += ["## Sample generations", "", "| instruction | reference | HF | " +
          " | ".join(k for k in gens if k != "hf") + " |", "|---|---|---|" + "---|" * (len(gens) - 1)]
    for i, r in enumerate(held[:8]):
        ins = r["instruction"] + (f" [{r['input']}]" if r["input"] else "")
        outs = " | ".join(_cell(v[i]["text"]) for v in gens.values())
        L.append(f"| {_cell(ins)} | {_cell(r['output'])} | {outs} |")
    L.append("")
    if sets:
        L += ["## Prompt sets", "", "| prompt set | origin | judge | prompts | status |", "|---|---|---|---:|---|"]
        for s in sets:
            sm = m.get("prompt_sets", {}).get(s.name, {})
            L.append(f"| {s.name} | {s.spec.origin} | {s.spec.judge} | {len(s.rows) or '-'} | "
                     f"{_cell(sm.get('status', ''), 300)} |")
        L.append("")
        for s in sets:
            answers = set_answers.get(s.name)
            if not answers:
                continue
            recs = judge_records.get(s.name, [])
            L += [f"{s.name}: first answers (full text in `evaluate/prompt_sets/{s.name}.jsonl`)", "",
                  "| instruction | answer | judge |", "|---|---|---|"]
            for i, a in enumerate(answers[:3]):
                r = recs[i] if i < len(recs) else {}
                verdict = r.get("score", r.get("points", "-"))
                L.append(f"| {_cell(s.rows[i]['instruction'])} | {_cell(a['text'])} | {verdict} |")
            L.append("")
    L += _environment_section(env)
    return "\n".join(L)
