"""report.md for the evaluate stage: sections, tables, the loss plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any
from qlora_kit.config import Recipe


def read_reference_curve(path: Path) -> dict[str, Any]:
    """(step, loss) points and the total steps of a transformers `trainer_state.json`."""
    state = json.loads(path.read_text(encoding="utf-8"))
    points = [(int(h["step"]), float(h["loss"])) for h in state.get("log_history", [])
              if isinstance(h, dict) and "loss" in h and "step" in h]
    if not points:
        raise ValueError(f"{path}: log_history holds no training loss")
    total = int(state.get("max_steps") or state.get("global_step") or points[-1][0])
    return {"points": points, "total_steps": total}


def _series(path: Path, column: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one column of a loss log; empty when the file is absent."""
    steps, values = [], []
    if path.is_file():
        with open(path) as f:
            for r in csv.DictReader(f):
                if r.get(column):
                    steps.append(int(r["step"]))
                    values.append(float(r[column]))
    return steps, values


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

    steps, loss = _series(csv_path, "loss")
    esteps, eloss = _series(csv_path.with_name("eval_log.csv"), "eval_loss")  # the train stage's eval log
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


def for_dvc(metrics: Any) -> Any:
    """details.json, every number and status of the run: status texts cut to their kind ("off",
    "not configured", "unavailable", "failed", "ok", "not measured in this run", ...); the
    full texts are in report.md and evaluate/manifest.json."""
    if isinstance(metrics, dict):
        return {k: (v.split(":", 1)[0] if k == "status" and isinstance(v, str) else for_dvc(v))
                for k, v in metrics.items()}
    return metrics


JUDGE_HEADLINE = ("average", "win", "tie", "lose")  # komt 0-5 average; AlpaGasus pairwise counts


def _num(x: Any) -> float | int | None:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The small, numbers-only metrics.json that `dvc metrics show/diff` reads: step count,
    validation loss before and after, EOS rate in HF and the lowest over the GGUFs, parity KL per
    GGUF, judge scores. Per-GGUF EOS rates and top-1 agreement are in details.json with everything
    else (not a DVC metric): with them, the tiny recipe's three GGUFs would not fit 120 columns."""
    gguf = metrics.get("gguf", {})
    eos = [g["eos_rate"] for g in gguf.values() if _num(g.get("eos_rate")) is not None]
    out: dict[str, Any] = {"steps": metrics.get("train", {}).get("global_step"),
                           "loss": {"before": metrics.get("val_loss_before"), "after": metrics.get("val_loss_after")},
                           "eos": {"hf": metrics.get("hf", {}).get("eos_rate"), "gguf": min(eos, default=None)},
                           "kl": {q: g.get("parity_mean_kl") for q, g in gguf.items()}}
    judge = {f"{name}.{k}": entry[k] for name, entry in metrics.get("judge", {}).items()
             if isinstance(entry, dict) and entry.get("status") == "ok" for k in JUDGE_HEADLINE if k in entry}
    if judge:
        out["judge"] = judge
    return _numbers_only(out)


def _numbers_only(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        v = _numbers_only(v) if isinstance(v, dict) else _num(v)
        if v not in (None, {}):
            out[k] = round(v, 6) if isinstance(v, float) else v
    return out


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
    # a set judged to the end has its table, also when it failed on unparsed replies (status says so)
    if any("n" in v for _, v in komt):
        L += ["komt judge (0-5 per answer; score = sum, average = sum/N, percentage = sum/(5N); an unparseable "
              "judge output counts 0, as in the source's files). The judge prompt is the kit's own (komt never "
              "published its prompt).", "",
              "| prompt set | answers | N | score | average | percentage | unparsed (counted 0) |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for k, v in komt:
            if "n" not in v:
                continue
            for label, t in (("this run (merged model)", v),
                             ("recorded answers in the prompt file", v.get("recorded"))):
                if t:
                    L.append(f"| {k} | {label} | {t['n']} | {t['sum']} / {t['out_of']} | {t['average']:.2f} | "
                             f"{t['percentage']:.2f} % | {t['unparsed']} |")
        L.append("")
    if any("n" in v for _, v in pair):
        L += ["AlpaGasus pairwise judge (this run vs the recorded baseline answers, judged in both orders; "
              "+1 per order the model scores higher, -1 lower: total >= 1 win, 0 tie, <= -1 lose; "
              "evaluation.py's prompt and parser).", "",
              "| prompt set | N | win | tie | lose | parse failures (of 2N) |", "|---|---:|---:|---:|---:|---:|"]
        for k, v in pair:
            if "n" in v:
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


def _learning_section(m: dict[str, Any]) -> list[str]:
    """Validation loss before and after training."""
    L: list[str] = []
    L += ["## Did it learn?", "",
          "| | before training (base) | after training (merged) |", "|---|---|---|",
          f"| val loss (completion tokens, nats) | {_f(m['val_loss_before'])} | {_f(m['val_loss_after'])} |",
          f"| val perplexity | {_f(m['val_ppl_before'], 2)} | {_f(m['val_ppl_after'], 2)} |", "",
          f"Rows measured: {m['val_rows']} ({m['eval_split']}). Loss falls by "
          f"{_f(m['val_loss_before'] - m['val_loss_after'], 3)} nats/token "
          f"({100 * (1 - m['val_loss_after'] / m['val_loss_before']):.1f} %).", ""]
    return L


def _artifacts_section(recipe: Recipe, m: dict[str, Any], extras: dict[str, Any]) -> list[str]:
    """HF vs every GGUF, and the merge parity check."""
    L: list[str] = []
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
    return L


def _training_section(recipe: Recipe, train: dict[str, Any], png: Path | None, reference: dict[str, Any] | None,
                      reference_note: str) -> list[str]:
    """The train run's figures, the source's curve, the loss plot."""
    L: list[str] = []
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
        # a PNG file beside the report, linked (GitHub and most viewers show no inline base64 image)
        L += [f"![loss curve](evaluate/{png.name})", ""]
    return L


def _data_section(extras: dict[str, Any]) -> list[str]:
    """What preprocess kept and dropped."""
    L: list[str] = []
    if "data_report.json" in extras:
        dr = extras["data_report.json"]
        L += ["## Data", "", f"Rows in {dr['rows_in']}, kept {dr['kept']} (train {dr['kept_by_split'].get('train')}, "
              f"val {dr['kept_by_split'].get('val')}), dropped {dr['dropped']} "
              f"{json.dumps(dr['dropped_by_reason'], ensure_ascii=False)}, truncated {dr['truncated']}.", ""]
    return L


def _samples_section(gens: dict[str, list], held: list[dict]) -> list[str]:
    """The first held-out prompts with every model's answer."""
    L: list[str] = []
    L += ["## Sample generations", "", "| instruction | reference | HF | " +
          " | ".join(k for k in gens if k != "hf") + " |", "|---|---|---|" + "---|" * (len(gens) - 1)]
    for i, r in enumerate(held[:8]):
        ins = r["instruction"] + (f" [{r['input']}]" if r["input"] else "")
        outs = " | ".join(_cell(v[i]["text"]) for v in gens.values())
        L.append(f"| {_cell(ins)} | {_cell(r['output'])} | {outs} |")
    L.append("")
    return L


def _prompt_sets_section(sets: list, m: dict[str, Any], set_answers: dict[str, list], judge_records: dict[str, list]) -> list[str]:
    """The source's prompt sets: status, first answers, verdicts."""
    L: list[str] = []
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
    L += _learning_section(m)
    L += _artifacts_section(recipe, m, extras)
    L += _parity_section(extras)
    L += _judge_section(m)
    L += _benchmark_section(m, recipe)
    L += _training_section(recipe, train, png, reference, reference_note)
    L += _data_section(extras)
    L += _samples_section(gens, held)
    L += _prompt_sets_section(sets, m, set_answers, judge_records)
    L += _environment_section(env)
    return "\n".join(L)
