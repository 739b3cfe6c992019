"""Training throughput on the CPU: the sources' pad-to-cutoff batches vs the kit's batching.

    .venv/bin/python bench/train_throughput.py                 # full run (~10 min on 2 busy cores)
    .venv/bin/python bench/train_throughput.py --quick         # smoke: tiny shape, 3 steps, 1 repeat

What runs: 4-bit NF4 QLoRA (bitsandbytes' CPU path, fp32 compute: the alpagasus2 recipe's
`quant`, `lora` and `train` values, with batch 4 and no gradient accumulation) on a Llama-shaped
model with random weights that the kit builds itself (`qlora_kit.tiny_model.build`; a
sentencepiece tokenizer trained on the same data, so token counts are of the order of
Llama-2's), through transformers' Trainer exactly as `qlora_kit.train` sets it up. The data is
real: gpt4life's `data/filtered/claude_t45.json`, read in place from ../shared/data (skipped with
a message when absent), rendered with the alpagasus2 template and cut at the recipe's cutoff by
`qlora_kit.preprocess.build`.

Variants, run alternately (the order rotates every repeat) so that load from other jobs hits
all of them alike:

- `source_pad_to_cutoff`: every micro-batch padded to the cutoff (`padding="max_length"`), the
  sources' way; random sampler.
- `kit_dynamic`: padded to the longest example of the micro-batch (`collate.Collator`, the kit's
  default); the same sampler, so the same examples form every step.
- `kit_padding_free`: `train.packing: true` (`collate.PaddingFreeCollator`): the micro-batch's
  examples side by side in one row with position_ids restarting per example, no padding and no
  cross-attention; the same examples form every step.
- `kit_grouped`: dynamic padding + `train.group_by_length: true` (transformers'
  LengthGroupedSampler). This changes which examples form a step (similar lengths together),
  so it is not the same training run; reported separately for that reason.

The script checks the "same examples per step" claim instead of assuming it: every step's set
of sequences is fingerprinted inside the model's forward and compared across variants.

Figures: supervised tokens per second = loss-bearing label positions (labels != -100, the
shifted targets the loss averages over) per second, over all steps but the first (warm-up),
from the end of step 1 to the end of the last step; the median over repeats per variant, the
ratio of medians to the source variant, and the median of the per-repeat ratios (each repeat's
runs are neighbours in time). Both per wall second and per CPU second of this process: torch
runs one thread (--threads 1), so CPU time is the work done and hardly depends on other jobs
sharing the machine, while wall time does (with 2 threads on 2 busy cores, OpenMP's waiting
made a step 5x slower and the timings meaningless). Results go to
bench/results/train_throughput.json and the table into bench/README.md (not with --quick).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from qlora_kit.training import collate

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # run_all: the README block writer
# the source data folder (its SOURCES.md): QLORA_KIT_TEST_DATA, as the tests read it
SHARED_DATA = Path(os.environ.get("QLORA_KIT_TEST_DATA") or REPO.parent / "shared" / "data")
DEFAULT_DATA = SHARED_DATA / "gpt4life-alpagasus" / "data" / "filtered" / "claude_t45.json"
VARIANTS = ("source_pad_to_cutoff", "kit_dynamic", "kit_padding_free", "kit_grouped")
SAME_STEPS = ("source_pad_to_cutoff", "kit_dynamic", "kit_padding_free")  # must see identical steps


class PadToCutoff:
    """The sources' batches: every row padded to the cutoff, labels -100 and attention 0 on pads."""

    def __init__(self, pad_id: int, cutoff: int):
        from qlora_kit.training.collate import Collator

        self.inner, self.cutoff = Collator(pad_id), cutoff

    def __call__(self, feats: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        b = self.inner(feats)
        extra = self.cutoff - b["input_ids"].shape[1]
        if extra > 0:
            n = len(feats)
            b["input_ids"] = torch.cat([b["input_ids"], torch.full((n, extra), self.inner.pad_id)], 1)
            b["labels"] = torch.cat([b["labels"], torch.full((n, extra), -100)], 1)
            b["attention_mask"] = torch.cat([b["attention_mask"], torch.zeros((n, extra), dtype=torch.long)], 1)
        return b


def sequences(kw: dict[str, Any]) -> list[tuple[int, ...]]:
    """The real (unpadded) sequences of a batch, whichever layout it has."""
    ids = kw["input_ids"]
    if "position_ids" in kw and kw.get("attention_mask") is None:  # padding-free row(s)
        out = []
        for row, pos in zip(ids.tolist(), kw["position_ids"].tolist()):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(row)]
            out += [tuple(row[s:e]) for s, e in zip(starts, starts[1:])]
        return out
    return [tuple(r[: int(m.sum())]) for r, m in zip(ids.tolist(), kw["attention_mask"])]


def build_model(workdir: Path, texts: list[str], shape: dict[str, int]) -> Path:
    """The kit's own Llama-shaped model + tokenizer, cached per shape in workdir."""
    from qlora_kit.config import TinyModel
    from qlora_kit.tiny.model import build

    key = hashlib.sha256(json.dumps([shape, len(texts), texts[:3]], sort_keys=True).encode()).hexdigest()[:12]
    out = workdir / f"model-{key}"
    if not (out / "config.json").is_file():
        build("llama", out, texts, TinyModel(seed=0, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                                             num_layers=shape["layers"], num_heads=shape["heads"],
                                             vocab_size=shape["vocab"], max_position_embeddings=1024))
    return out


# variant -> (batching, sampler). "cutoff" = the sources' pad-to-cutoff, "dynamic" = collate.Collator,
# "padding_free" = collate.PaddingFreeCollator (train.packing: true).
VARIANT_SPECS = {"source_pad_to_cutoff": ("cutoff", "random"), "kit_dynamic": ("dynamic", "random"),
                 "kit_padding_free": ("padding_free", "random"), "kit_grouped": ("dynamic", "group_by_length")}


def one_run(variant: str, recipe, model_dir: Path, train_rows: list[dict], pad_id: int, steps: int,
            outdir: Path, *, batching: str | None = None, sampler: str | None = None,
            device: str = "cpu") -> dict[str, Any]:
    """One training run through transformers' Trainer, set up as `qlora_kit.train.run` does.

    Timing: from the end of optimizer step 1 (warm-up: allocator, kernels, lazy init) to the end
    of the last step; with a single step, from its start to its end.
    """
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from qlora_kit import train

    batching, sampler = batching or VARIANT_SPECS[variant][0], sampler or VARIANT_SPECS[variant][1]
    t = recipe.train
    cuda = device == "cuda"
    set_seed(t.seed)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = train.load_base(recipe, model_dir, device)
    if recipe.qlora.bits in (4, 8):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    elif t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, train.lora_config(recipe))
    collator = {"cutoff": PadToCutoff(pad_id, recipe.preprocess.max_length), "dynamic": collate.Collator(pad_id),
                "padding_free": collate.PaddingFreeCollator()}[batching]
    if batching == "padding_free":
        collate.check_padding_free(model, train_rows)  # what train.run does before step 0

    per_fwd: list[dict[str, Any]] = []

    def count(_mod, _args, kw):
        if not torch.is_grad_enabled():
            return
        labels = kw["labels"]
        seqs = sequences(kw)
        per_fwd.append({"supervised": int((labels[..., 1:] != -100).sum()), "positions": int(kw["input_ids"].numel()),
                        "lengths": [len(x) for x in seqs],
                        "seq_hashes": [hashlib.sha256(repr(x).encode()).hexdigest()[:12] for x in seqs]})

    model.register_forward_pre_hook(count, with_kwargs=True)
    marks: list[tuple[str, float, float]] = []

    def mark(what: str) -> None:
        if cuda:
            torch.cuda.synchronize()
        marks.append((what, time.perf_counter(), time.process_time()))

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 0:
                mark("begin")

        def on_step_end(self, args, state, control, **kw):
            mark("end")

    optim, _ = train.effective_optimizer(t.optimizer, device)
    precision, _ = train.effective_precision(t.precision, device)
    args = TrainingArguments(
        output_dir=str(outdir), per_device_train_batch_size=t.per_device_batch, gradient_accumulation_steps=t.grad_accum,
        max_steps=steps, learning_rate=t.learning_rate, lr_scheduler_type=t.scheduler,
        warmup_steps=math.ceil(steps * t.warmup_ratio), weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        optim=optim, fp16=precision == "fp16", bf16=precision == "bf16", seed=t.seed, data_seed=t.seed,
        logging_steps=steps, save_strategy="no", report_to="none", use_cpu=not cuda, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True, train_sampling_strategy=sampler)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=collator, callbacks=[Clock()])
    result = trainer.train()
    ends = [m for m in marks if m[0] == "end"]
    assert len(per_fwd) == steps * t.grad_accum and len(ends) == steps, (len(per_fwd), len(ends))
    if steps > 1:
        timed, first, last, n_timed = per_fwd[t.grad_accum:], ends[0], ends[-1], steps - 1
    else:
        timed, first, last, n_timed = per_fwd, marks[0], ends[-1], 1
    wall, cpu = last[1] - first[1], last[2] - first[2]
    sup = sum(s["supervised"] for s in timed)
    pos = sum(s["positions"] for s in timed)
    lengths = [n for s in timed for n in s["lengths"]]
    real = sum(lengths)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    del trainer, model
    return {"variant": variant, "batching": batching, "sampler": sampler, "micro_batch": t.per_device_batch,
            "grad_accum": t.grad_accum, "gradient_checkpointing": t.gradient_checkpointing,
            "load_avg_1m_after": os.getloadavg()[0], "steps_timed": n_timed, "wall_s": round(wall, 3),
            "s_per_step": round(wall / n_timed, 4), "supervised_tokens": sup, "positions": pos, "real_tokens": real,
            "sum_len_squared": sum(n * n for n in lengths), "cpu_s": round(cpu, 3),
            "supervised_tok_per_s": round(sup / wall, 2), "supervised_tok_per_cpu_s": round(sup / max(cpu, 1e-9), 2),
            "positions_per_s": round(pos / wall, 2), "padding_fraction": round(1 - real / pos, 4),
            "peak_gpu_gib": peak, "train_loss": round(result.training_loss, 4),
            # the examples of each optimizer step, whatever the micro-batching: equal lists mean
            # the runs trained on the same examples in the same steps
            "fingerprints": [hashlib.sha256(repr(sorted(h for f in per_fwd[i:i + t.grad_accum] for h in f["seq_hashes"]))
                                            .encode()).hexdigest()[:16] for i in range(0, len(per_fwd), t.grad_accum)]}


def machine() -> dict[str, Any]:
    import psutil

    return {"cpus": os.cpu_count(), "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(), "load_avg": os.getloadavg()}


def summarize(runs: list[dict[str, Any]], variants: tuple[str, ...]) -> dict[str, Any]:
    by = {v: [r for r in runs if r["variant"] == v] for v in variants}
    base = "source_pad_to_cutoff"
    out: dict[str, Any] = {}
    for v, rs in by.items():
        if not rs:
            continue
        row: dict[str, Any] = {"runs": len(rs), "padding_fraction": rs[0]["padding_fraction"],
                               "median_s_per_step": round(statistics.median(r["s_per_step"] for r in rs), 4),
                               "train_loss": [r["train_loss"] for r in rs]}
        # wall: what a user waits for; cpu: the work done, far less sensitive to other jobs on a
        # shared machine (one torch thread, so no spin-waiting is counted)
        for clock in ("supervised_tok_per_s", "supervised_tok_per_cpu_s"):
            vals = [r[clock] for r in rs]
            row[clock] = vals
            row[f"median_{clock}"] = round(statistics.median(vals), 2)
            if by.get(base) and v != base:
                b = [r[clock] for r in by[base]]
                row[f"ratio_of_medians_{clock}"] = round(statistics.median(vals) / statistics.median(b), 3)
                paired = [x / y for x, y in zip(vals, b)]  # same repeat: neighbours in time
                row[f"median_paired_ratio_{clock}"] = round(statistics.median(paired), 3)
                row[f"paired_ratios_{clock}"] = [round(x, 3) for x in paired]
        out[v] = row
    fp = {v: by[v][0]["fingerprints"] for v in SAME_STEPS if by.get(v)}
    out["same_examples_per_step"] = len({tuple(x) for x in fp.values()}) <= 1
    if by.get("kit_grouped") and fp:
        out["grouped_steps_differ"] = by["kit_grouped"][0]["fingerprints"] != next(iter(fp.values()))
    return out


def readme_text(res: dict[str, Any]) -> str:
    """The result table for bench/README.md."""
    sys.path.insert(0, str(HERE))
    from run_all import machine_line

    st, sm, m = res["setup"], res["summary"], res["machine"]
    mo, ln = st["model"], st["length_tokens"]
    rows = ["| variant | same examples per step as the source | padding share of positions | supervised tok/s (wall), median | "
            "x source (ratio of medians / median paired) | supervised tok per CPU-s, median | "
            "x source (ratio of medians / median paired) | s/step, median |",
            "|---|---|---|---|---|---|---|---|"]
    same = {"source_pad_to_cutoff": "(baseline)", "kit_dynamic": "yes (checked)", "kit_padding_free": "yes (checked)",
            "kit_grouped": "no: length-grouped sampler"}
    for v in VARIANTS:
        r = sm.get(v)
        if not r:
            continue
        w, c = "supervised_tok_per_s", "supervised_tok_per_cpu_s"
        ratio = lambda k: (f"**{r[f'ratio_of_medians_{k}']:.2f}x** / {r[f'median_paired_ratio_{k}']:.2f}x"  # noqa: E731
                           if f"ratio_of_medians_{k}" in r else "1")
        rows.append(f"| `{v}` | {same[v]} | {100 * r['padding_fraction']:.1f} % | {r[f'median_{w}']:.0f} | {ratio(w)} | "
                    f"{r[f'median_{c}']:.0f} | {ratio(c)} | {r['median_s_per_step']:.2f} |")
    ok = "yes" if sm.get("same_examples_per_step") else "NO"
    return "\n".join([
        f"Measured {res['date']} on {machine_line(tuple(m['load_avg_before']), tuple(m['load_avg_after']))}. "
        "Wall-clock figures vary with the machine; CPU-time figures much less (one torch thread: no "
        "spin-waiting is counted).",
        "",
        f"Command: `{res['command'].strip()}` (results: `bench/results/train_throughput.json`).",
        "",
        f"Setup: 4-bit NF4 QLoRA on the CPU (bitsandbytes {res['versions']['bitsandbytes']}, fp32 compute as the "
        f"alpagasus2 recipe), LoRA r{st['lora']['r']} on {'/'.join(st['lora']['targets'])}, gradient checkpointing "
        f"{'on' if st['gradient_checkpointing'] else 'off'}; a random-init Llama-shaped model of {mo['params'] / 1e6:.1f}M "
        f"parameters (hidden {mo['hidden']}, {mo['layers']} layers, intermediate {mo['intermediate']}, vocab {mo['vocab']} "
        f"= a sentencepiece BPE the kit trains on the data); `{st['data']}` ({st['train_rows']} training rows after "
        f"the recipe's split) with the AlpaGasus2 template, cutoff {st['cutoff']} (lengths: median {ln['median']}, mean "
        f"{ln['mean']}, {ln['at_cutoff']} rows at the cutoff); micro-batch {st['batch']}, {st['steps_per_run']} optimizer "
        f"steps per run of which {st['timed_steps']} timed, {st['repeats']} repeats, variants alternating (order "
        f"rotated each repeat). Same examples in every step across the same-sampler variants: {ok} "
        "(fingerprinted inside the forward pass).",
        "",
        *rows,
        "",
        "Supervised tokens = label positions that carry loss (the same set in every same-sampler variant). "
        "\"Paired\" divides each run by the source run of the same repeat (neighbours in time) and takes the median. "
        "Mean training loss over each run (first repeat): "
        + ", ".join(f"`{v}` {sm[v]['train_loss'][0]:.4f}" for v in VARIANTS if v in sm)
        + " (same examples and same initialization give the same loss up to float rounding; the length-grouped "
        "sampler trains on other examples in these steps). The 4-bit base is dequantized per matmul whatever "
        "the padding, so on the CPU the saving tracks the padded positions removed, less the fixed per-step "
        "costs (optimizer, dequantization, Python).",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cutoff", type=int, default=256, help="the alpagasus2 recipe's cutoff_len (256)")
    ap.add_argument("--batch", type=int, default=4, help="micro-batch (the recipe's micro_batch_size 4)")
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per run; the first is warm-up")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000, help="tokenizer (and so model) vocabulary size")
    ap.add_argument("--bits", type=int, choices=(4, 16), default=4)
    ap.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="the recipe checkpoints (prepare_model_for_kbit_training's default); off saves CPU time")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: CPU time then measures work, not spin-waiting on a shared machine)")
    ap.add_argument("--model", type=Path, default=None,
                    help="an existing Llama folder (model + tokenizer) instead of building one")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-kit-bench")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "train_throughput.json")
    ap.add_argument("--quick", action="store_true", help="smoke: tiny shape, 3 steps, 1 repeat, 64 rows")
    ap.add_argument("--no-readme", action="store_true", help="do not write the table into bench/README.md")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.repeats, a.hidden, a.layers, a.intermediate, a.heads, a.vocab = 3, 1, 256, 2, 512, 4, 1000
        a.limit = a.limit or 64
        a.cutoff = min(a.cutoff, 128)
    if not a.data.is_file():
        print(f"train_throughput: skipped: {a.data} is absent (the bench reads ../shared/data in place)")
        return 0
    variants = tuple(v for v in a.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)} (known: {', '.join(VARIANTS)})")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from qlora_kit.config import load_recipe
    from qlora_kit.text.examples import build as build_examples
    from qlora_kit.text.rows import read_rows
    from qlora_kit.tiny.model import sample_texts
    from qlora_kit.text.tokenizer import load_tokenizer

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = list(read_rows(a.data, "json"))[: a.limit]
    good = [r.fields for r in rows if r.fields and not r.problem]
    a.workdir.mkdir(parents=True, exist_ok=True)
    shape = {"hidden": a.hidden, "layers": a.layers, "intermediate": a.intermediate, "heads": a.heads, "vocab": a.vocab}
    model_dir = a.model or build_model(a.workdir, sample_texts(good), shape)
    recipe = load_recipe("alpagasus2", {
        "preprocess.max_length": a.cutoff, "train.per_device_batch": a.batch, "train.grad_accum": 1,
        "train.device": "cpu", "qlora.bits": a.bits, "qlora.double_quant": False,
        "train.gradient_checkpointing": not a.no_gradient_checkpointing})
    tok = load_tokenizer(model_dir, recipe.template)
    parts, report = build_examples(rows, tok, recipe.template, recipe.preprocess)
    train_rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in parts["train"]]
    lengths = sorted(len(r["input_ids"]) for r in train_rows)
    cfg = json.loads((model_dir / "config.json").read_text())
    h, L, I, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    n_params = 2 * V * h + L * (4 * h * h + 3 * h * I + 2 * h) + h  # embed + head + layers + norms
    print(f"train_throughput: {len(train_rows)} train rows, length median {lengths[len(lengths) // 2]} / mean "
          f"{sum(lengths) / len(lengths):.1f} / max {lengths[-1]} tokens (cutoff {a.cutoff}, {report.truncated} truncated); "
          f"model {n_params / 1e6:.1f}M params; setup {time.perf_counter() - t0:.1f}s", flush=True)
    torch.set_num_threads(a.threads)

    runs = []
    with tempfile.TemporaryDirectory(prefix="qlora-kit-bench-train-") as tmp:
        for rep in range(a.repeats):
            order = variants[rep % len(variants):] + variants[: rep % len(variants)]
            for v in order:
                r = one_run(v, recipe, model_dir, train_rows, tok.pad_id, a.steps, Path(tmp) / v)
                r["repeat"] = rep
                runs.append(r)
                print("train_throughput: " + json.dumps({k: v for k, v in r.items() if k != "fingerprints"}), flush=True)
    summary = summarize(runs, variants)
    result = {
        "benchmark": "train_throughput", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python bench/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine() | {"load_avg_before": load_before, "load_avg_after": os.getloadavg()},
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")},
        "setup": {"data": str(a.data.relative_to(SHARED_DATA) if a.data.is_relative_to(SHARED_DATA) else a.data),
                  "rows_in": report.rows_in, "train_rows": len(train_rows), "cutoff": a.cutoff, "batch": a.batch,
                  "grad_accum": 1, "steps_per_run": a.steps, "timed_steps": a.steps - 1, "repeats": a.repeats,
                  "bits": a.bits, "compute_dtype": recipe.qlora.compute_dtype,
                  "gradient_checkpointing": recipe.train.gradient_checkpointing,
                  "lora": {"r": recipe.lora.r, "alpha": recipe.lora.alpha, "targets": list(recipe.lora.target_modules)},
                  "model": {"hidden": h, "layers": L, "intermediate": I, "heads": cfg["num_attention_heads"], "vocab": V,
                            "params": n_params},
                  "length_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2],
                                    "mean": round(sum(lengths) / len(lengths), 1), "max": lengths[-1],
                                    "at_cutoff": sum(n >= a.cutoff for n in lengths)},
                  "torch_threads": torch.get_num_threads()},
        "summary": summary,
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("train_throughput: summary " + json.dumps(summary), flush=True)
    print(f"train_throughput: wrote {a.out}")
    if not (a.quick or a.no_readme):
        from run_all import write_readme_block

        write_readme_block("train_throughput", "Training throughput, CPU (bench/train_throughput.py)", readme_text(result))
        print("train_throughput: table written into bench/README.md")
    if len(set(variants) & set(SAME_STEPS)) > 1 and not summary["same_examples_per_step"]:
        print("train_throughput: FAILED: the same-sampler variants saw different examples per step", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
