"""Evaluate stage: what training changed, and whether every artifact behaves the same.

    qlora-kit evaluate --recipe tiny       (dvc: evaluate@tiny)

Measures, on the validation split (completion-only loss, as preprocess labelled it):
- loss and perplexity of the base model (before) and the merged model (after), in HF;
- the same loss for each GGUF in llama.cpp (llama-cpp-python), from the same token ids;
- greedy generations on held-out prompts (the recipe's inference form, BOS explicit) in HF and
  in each GGUF: the share that ends with EOS before max_new_tokens, answer lengths, and the share
  that exactly matches the reference answer.
Writes `reports/NAME/metrics.json` (flat numbers for `dvc metrics show/diff`), `report.md`
(with the loss curve as an embedded PNG) and `reports/NAME/evaluate/` (generations, plot,
manifest).
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


def plot_loss(csv_path: Path, png: Path) -> bool:
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
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(steps, loss, label="train loss")
    if esteps:
        ax.plot(esteps, eloss, "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, metadata={"Software": None})  # no timestamp: same curve, same bytes
    plt.close(fig)
    return True


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from . import layout
    from .artifacts import StageRun, atomic_dir, write_atomic, write_json
    from .preprocess import read_split
    from .tokenizer import load_tokenizer

    paths = layout.paths(recipe.name)
    st = StageRun("evaluate", recipe, overrides)
    for label in ("processed", "merged", "gguf"):
        st.add_input(label, getattr(paths, label))
    torch.manual_seed(0)
    e = recipe.eval
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

    load = dict(dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(str(paths.base), **load).eval()
    metrics["val_loss_before"] = hf_completion_loss(base, val)
    del base
    merged = AutoModelForCausalLM.from_pretrained(str(paths.merged), **load).eval()
    metrics["val_loss_after"] = hf_completion_loss(merged, val)
    for k in ("before", "after"):
        metrics[f"val_ppl_{k}"] = math.exp(min(metrics[f"val_loss_{k}"], 50))
    gens["hf"] = hf_generate(merged, tok, recipe, prompts)
    metrics["hf"] = summarize(gens["hf"], refs)
    del merged
    st.lap("hf")

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
              for name in ("data_report.json", "merge_parity.json") if (paths.reports / name).exists()}
    train_manifest = json.loads((paths.adapter / "manifest.json").read_text())
    with atomic_dir(paths.reports / "evaluate") as tmp:
        has_plot = plot_loss(paths.reports / "train_log.csv", tmp / "loss_curve.png")
        with open(tmp / "generations.jsonl", "w", encoding="utf-8") as fh:
            for i, r in enumerate(held):
                fh.write(json.dumps({"instruction": r["instruction"], "input": r["input"], "reference": r["output"],
                                     **{k: v[i] for k, v in gens.items()}}, ensure_ascii=False) + "\n")
        st.facts["metrics"] = metrics
        write_json(tmp / "manifest.json", st.manifest())
        report = render_report(recipe, metrics, extras, train_manifest["facts"], gens, held,
                               (tmp / "loss_curve.png") if has_plot else None)
    write_json(paths.reports / "metrics.json", metrics)
    write_atomic(paths.reports / "report.md", report)
    return metrics


def _f(x: Any, nd: int = 4) -> str:
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def render_report(recipe: Recipe, m: dict[str, Any], extras: dict[str, Any], train: dict[str, Any],
                  gens: dict[str, list], held: list[dict], png: Path | None) -> str:
    L = [f"# Reproduction report: {recipe.name}", "", recipe.description, ""]
    if recipe.source.repo:
        L += [f"Source: `{recipe.source.repo}@{recipe.source.commit}`", ""]
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
        L += [f"Merge parity (merged vs base+adapter, {p['rows']} rows, base `{p['base']}`): max relative logit "
              f"error {p['max_rel_error']:.2e}, mean {p['mean_rel_error']:.2e}, top-1 agreement "
              f"{p['top1_agreement']:.1%} (threshold {p['threshold']}).", ""]
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
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")[:60]  # noqa: E731
    for i, r in enumerate(held[:8]):
        ins = r["instruction"] + (f" [{r['input']}]" if r["input"] else "")
        L.append(f"| {cell(ins)} | {cell(r['output'])} | " + " | ".join(cell(v[i]["text"]) for v in gens.values()) + " |")
    L.append("")
    return "\n".join(L)
