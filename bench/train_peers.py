"""CPU QLoRA training: the kit's packed batches vs what people run today, on the same steps.

    .venv/bin/python bench/train_peers.py              # the grid: 2 data sets x cutoff 256/1024 x micro-batch 4/16/64
    .venv/bin/python bench/train_peers.py --quick      # smoke: tiny shape, one point, 1 repeat

Variants, each through its own real code path, run alternately (the order rotates every repeat):

- `sources_dynamic`: transformers' `Trainer` + `DataCollatorForLanguageModeling(mlm=False)`: every
  micro-batch padded to its longest row, pad positions out of the loss. llama2-koalpaca and
  AlpaGasus2 (trl's default collator with packing=False) trained this way; komt and Polyglot's
  `pad_sequence` collators pad the same way. None of the four padded to the cutoff in training.
- `hf_seq2seq`: plain transformers `Trainer` + `DataCollatorForSeq2Seq` (labels padded with -100).
- `trl_padding_free`: trl `SFTTrainer(padding_free=True)` with the rows already tokenized
  (`skip_prepare_dataset`), as trl's documentation sets up padding-free training; trl casts the
  LoRA weights of a quantized model to bf16 (its QLoRA default, kept).
- `kit`: `train.packing: true` as `qlora_kit.train` runs it: `collate.PaddingFreeCollator` and the
  packed attention `qlora_kit.training.attention` picks for the device (recorded per run).

Every variant trains the same examples in every optimizer step (the same random sampler and seed;
checked: the sequences of each step are fingerprinted inside the forward pass and compared), from
the same 4-bit model (bitsandbytes NF4, fp32 compute, LoRA r8 on q/v, gradient checkpointing, one
torch thread), and logs its per-step losses, which are compared with `sources_dynamic`'s.

Figure: supervised tokens (label positions that carry loss) per CPU second, from the end of the
first optimizer step to the end of the last; median over repeats with min-max. Results go to
bench/results/train_peers.json and the table into bench/README.md (not with --quick).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_throughput as tt  # noqa: E402  (build_model, sequences, machine)

SHARED_DATA = tt.SHARED_DATA
VARIANTS = ("sources_dynamic", "hf_seq2seq", "trl_padding_free", "kit")
PEERS = VARIANTS[:3]
# name: (recipe, file, leading rows left out, overrides): the KoAlpaca rows run through
# llama2-koalpaca's template; its drop-over-cutoff would keep no row at 256, so they are truncated
DATASETS = {
    "claude_t45": ("alpagasus2", "gpt4life-alpagasus/data/filtered/claude_t45.json", 0, {}),
    "koalpaca_sample": ("llama2-koalpaca", "samples/Volume21-github_test__ko_alpaca_data.sample.json", 11,
                        {"preprocess.overlength": "truncate"}),
}


def collator_for(variant: str, hf_tok, pad_id: int):
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq


    if variant == "sources_dynamic":
        inner = DataCollatorForLanguageModeling(hf_tok, mlm=False)
        return lambda feats: inner([{"input_ids": f["input_ids"]} for f in feats])
    if variant == "hf_seq2seq":
        inner = DataCollatorForSeq2Seq(hf_tok, padding=True, label_pad_token_id=-100)
        return lambda feats: inner([{"input_ids": f["input_ids"], "labels": f["labels"],
                                     "attention_mask": [1] * len(f["input_ids"])} for f in feats])
    raise ValueError(variant)


def make_trainer(variant: str, model, args_kw: dict[str, Any], rows: list[dict], hf_tok, pad_id: int, callbacks,
                 kernel: str | None = None):
    from transformers import Trainer, TrainingArguments

    if variant == "trl_padding_free":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        cfg = SFTConfig(**args_kw, padding_free=True, max_length=None, completion_only_loss=False,
                        dataset_kwargs={"skip_prepare_dataset": True})
        data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        return SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=hf_tok, callbacks=callbacks)
    from qlora_kit.training.attention import packed_collator

    collator = packed_collator(kernel) if variant == "kit" else collator_for(variant, hf_tok, pad_id)
    return Trainer(model=model, args=TrainingArguments(**args_kw), train_dataset=rows,
                   data_collator=collator, callbacks=callbacks)


def prepare_model(variant: str, recipe, model_dir: Path, rows: list[dict]) -> tuple[Any, str | None]:
    from peft import get_peft_model, prepare_model_for_kbit_training

    from qlora_kit import train
    from qlora_kit.training import collate
    from qlora_kit.training.attention import packed_collator, use_packed_attention

    t = recipe.train
    model = train.load_base(recipe, model_dir, "cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    model = get_peft_model(model, train.lora_config(recipe))
    kernel = None
    if variant == "kit":  # what train.run does before step 0
        kernel = use_packed_attention(model, "cpu", recipe.train.packed_attention)
        collate.check_padding_free(model, rows, collator=packed_collator(kernel))
    return model, kernel


def one_run(variant: str, recipe, model_dir: Path, rows: list[dict], hf_tok, pad_id: int, steps: int,
            outdir: Path) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback, set_seed

    from qlora_kit import train

    t = recipe.train
    set_seed(t.seed)
    model, kernel = prepare_model(variant, recipe, model_dir, rows)
    per_fwd: list[dict[str, Any]] = []

    def count(_mod, _args, kw):
        if not torch.is_grad_enabled():
            return
        seqs = tt.sequences(kw)
        labels = kw["labels"]
        per_fwd.append({"supervised": int((labels[..., 1:] != -100).sum()), "positions": int(kw["input_ids"].numel()),
                        "real": sum(len(x) for x in seqs),
                        "seq_hashes": [hashlib.sha256(repr(x).encode()).hexdigest()[:12] for x in seqs]})

    model.register_forward_pre_hook(count, with_kwargs=True)
    marks: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

    optim, _ = train.effective_optimizer(t.optimizer, "cpu")
    args_kw = dict(output_dir=str(outdir), per_device_train_batch_size=t.per_device_batch, gradient_accumulation_steps=1,
                   max_steps=steps, learning_rate=t.learning_rate, lr_scheduler_type=t.scheduler,
                   warmup_steps=math.ceil(steps * t.warmup_ratio), weight_decay=t.weight_decay,
                   max_grad_norm=t.max_grad_norm, optim=optim, fp16=False, bf16=False, seed=t.seed, data_seed=t.seed,
                   logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
                   remove_unused_columns=False, disable_tqdm=True)
    trainer = make_trainer(variant, model, args_kw, rows, hf_tok, pad_id, [Clock()], kernel)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(per_fwd) == steps and len(marks) == steps, (variant, len(per_fwd), len(marks))
    timed = per_fwd[1:]
    wall, cpu = marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]
    sup, pos, real = (sum(s[k] for s in timed) for k in ("supervised", "positions", "real"))
    del trainer, model
    return {"variant": variant, "packed_attention": kernel, "steps_timed": steps - 1, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "supervised_tokens": sup, "positions": pos, "real_tokens": real,
            "padding_fraction": round(1 - real / pos, 4), "supervised_tok_per_cpu_s": round(sup / max(cpu, 1e-9), 2),
            "supervised_tok_per_s": round(sup / max(wall, 1e-9), 2), "losses": losses,
            "fingerprints": [hashlib.sha256(repr(sorted(f["seq_hashes"])).encode()).hexdigest()[:16] for f in per_fwd]}


def point(name: str, cutoff: int, mb: int, steps: int, repeats: int, a, workdir: Path) -> dict[str, Any]:
    """One grid point: every variant `repeats` times, alternating; their summary."""
    from transformers import AutoTokenizer

    from qlora_kit.config import load_recipe
    from qlora_kit.text.examples import build as build_examples
    from qlora_kit.text.rows import read_rows
    from qlora_kit.text.tokenizer import load_tokenizer
    from qlora_kit.tiny.model import sample_texts

    recipe_name, rel, skip, over = DATASETS[name]
    rows = list(read_rows(SHARED_DATA / rel, "json"))[skip:][: a.limit]
    shape = {"hidden": a.hidden, "layers": a.layers, "intermediate": a.intermediate, "heads": a.heads, "vocab": a.vocab}
    model_dir = tt.build_model(workdir, sample_texts([r.fields for r in rows if r.fields and not r.problem]), shape)
    recipe = load_recipe(recipe_name, {**over, "preprocess.max_length": cutoff, "train.per_device_batch": mb,
                                       "train.grad_accum": 1, "train.device": "cpu", "qlora.bits": 4,
                                       "qlora.double_quant": False, "train.gradient_checkpointing": True,
                                       # fp32 compute for every point (alpagasus2's own; bf16 matmuls
                                       # are emulated on CPUs without bf16 units, 10x slower)
                                       "qlora.compute_dtype": "float32"})
    tok = load_tokenizer(model_dir, recipe.template)
    parts, _ = build_examples(rows, tok, recipe.template, recipe.preprocess)
    train_rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in parts["train"]]
    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    hf_tok.pad_token_id = tok.pad_id
    hf_tok.padding_side = "right"  # AlpaGasus2 set it (finetune.py:L117); komt, Polyglot pad right too
    variants = tuple(v for v in a.variants.split(",") if v)
    runs = []
    with tempfile.TemporaryDirectory(prefix="qlora-kit-bench-peers-") as tmp:
        for rep in range(repeats):
            order = variants[rep % len(variants):] + variants[: rep % len(variants)]
            for v in order:
                r = one_run(v, recipe, model_dir, train_rows, hf_tok, tok.pad_id, steps, Path(tmp) / v)
                r["repeat"] = rep
                runs.append(r)
    lengths = sorted(len(r["input_ids"]) for r in train_rows)
    return {"data": name, "recipe": recipe_name, "cutoff": cutoff, "micro_batch": mb, "steps": steps,
            "train_rows": len(train_rows), "mean_length": round(sum(lengths) / len(lengths), 1),
            "summary": summarize(runs, variants), "runs": runs}


def summarize(runs: list[dict[str, Any]], variants: tuple[str, ...]) -> dict[str, Any]:
    by = {v: [r for r in runs if r["variant"] == v] for v in variants}
    out: dict[str, Any] = {}
    for v, rs in by.items():
        vals = [r["supervised_tok_per_cpu_s"] for r in rs]
        out[v] = {"median": round(statistics.median(vals), 1), "min": min(vals), "max": max(vals),
                  "padding_fraction": rs[0]["padding_fraction"], "packed_attention": rs[0]["packed_attention"]}
    fps = {v: rs[0]["fingerprints"] for v, rs in by.items()}
    out["same_examples_per_step"] = len({tuple(x) for x in fps.values()}) == 1
    ref = by.get("sources_dynamic")
    if ref:
        out["max_loss_diff_vs_sources_dynamic"] = {
            v: round(max(abs(x - y) for x, y in zip(rs[0]["losses"], ref[0]["losses"])), 6) for v, rs in by.items()}
    peers = [v for v in PEERS if v in out]
    if "kit" in out and peers:
        best = max(peers, key=lambda v: out[v]["median"])
        out["best_peer"] = best
        out["kit_over_best_peer"] = round(out["kit"]["median"] / out[best]["median"], 3)
        if "sources_dynamic" in out:
            out["kit_over_sources_dynamic"] = round(out["kit"]["median"] / out["sources_dynamic"]["median"], 3)
    return out


def steps_for(mb: int, rows_per_run: int) -> int:
    """Optimizer steps per run: about the same number of rows timed at every micro-batch, one warm-up step."""
    return 1 + max(1, math.ceil(rows_per_run / mb))


def readme_text(res: dict[str, Any]) -> str:
    from run_all import machine_line

    m, st = res["machine"], res["setup"]
    head = ("| data (recipe) | cutoff | micro-batch | rows, mean length | " + " | ".join(f"`{v}`" for v in VARIANTS)
            + " | kit ÷ best peer | kit ÷ `sources_dynamic` | padding share (dynamic) | same steps | max loss diff |")
    rows = [head, "|" + "---|" * (len(VARIANTS) + 9)]
    for p in res["points"]:
        s = p["summary"]
        cells = [f"{s[v]['median']:.0f} ({s[v]['min']:.0f}-{s[v]['max']:.0f})" if v in s else "-" for v in VARIANTS]
        diff = s.get("max_loss_diff_vs_sources_dynamic", {})
        rows.append(f"| {p['data']} ({p['recipe']}) | {p['cutoff']} | {p['micro_batch']} | {p['train_rows']}, "
                    f"{p['mean_length']:.0f} | " + " | ".join(cells) + f" | **{s.get('kit_over_best_peer', 0):.2f}x** "
                    f"({s.get('best_peer', '-')}) | {s.get('kit_over_sources_dynamic', 0):.2f}x | "
                    f"{s['sources_dynamic']['padding_fraction'] * 100:.0f} % | {'yes' if s['same_examples_per_step'] else 'NO'} | "
                    f"kit {diff.get('kit', 0):.1e}, trl {diff.get('trl_padding_free', 0):.1e} |")
    kernels = sorted({p["summary"]["kit"]["packed_attention"] or "-" for p in res["points"] if "kit" in p["summary"]})
    return "\n".join([
        f"Measured {res['date']} on {machine_line(tuple(m['load_avg_before']), tuple(m['load_avg_after']))}.",
        "",
        f"Command: `{res['command'].strip()}` (results: `bench/results/train_peers.json`). Versions: "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".",
        "",
        f"Setup: 4-bit NF4 QLoRA on the CPU (fp32 compute, LoRA r{st['lora_r']} on {', '.join(st['lora_targets'])}, "
        f"gradient checkpointing, one torch thread) on a random-init Llama-shaped model the bench builds "
        f"(hidden {st['hidden']}, {st['layers']} layers, intermediate {st['intermediate']}, vocabulary {st['vocab']}: a "
        "sentencepiece BPE trained on the rows); about "
        f"{st['rows_per_run']} rows (at least one micro-batch) timed per run after one warm-up step, {st['repeats']} repeats, variants alternating. "
        f"Figures: supervised tokens per CPU second, median (min-max). The kit's packed attention: {', '.join(kernels)}.",
        "",
        *rows,
        "",
        "\"Same steps\": every variant trained the same examples in every optimizer step (fingerprinted in the "
        "forward pass). \"Max loss diff\": the largest per-step training-loss difference from `sources_dynamic` "
        "over the run (trl trains its LoRA weights in bf16, the others in fp32).",
        "",
        *shortfalls(res["points"]),
    ])


def shortfalls(points: list[dict[str, Any]]) -> list[str]:
    """The points where the kit is under 1.2x the best peer or slower than dynamic padding, and why."""
    low = [p for p in points if p["summary"].get("kit_over_best_peer", 0) < 1.2]
    slower = [p for p in points if p["summary"].get("kit_over_sources_dynamic", 1) < 1]
    out = [f"Slower than dynamic padding: {'none' if not slower else ', '.join(_where(p) for p in slower)}."]
    if not low:
        return out + ["", "The kit is at least 1.2x the best peer at every point."]
    parts = []
    for p in low:
        sm = p["summary"]
        part = (f"{_where(p)}: {sm['kit_over_best_peer']:.2f}x, padding share "
                f"{sm['sources_dynamic']['padding_fraction'] * 100:.0f} %, so at most "
                f"{1 / (1 - sm['sources_dynamic']['padding_fraction']):.2f}x to gain from removing it")
        if sm["kit_over_best_peer"] < 1:
            best, kit = sm[sm["best_peer"]], sm["kit"]
            part += (f" (under {sm['best_peer']} here: the kit's runs {kit['min']:.0f}-{kit['max']:.0f}, "
                     f"{sm['best_peer']}'s {best['min']:.0f}-{best['max']:.0f})")
        parts.append(part)
    # sources_dynamic and hf_seq2seq train the same padded batches: their gap is the measurement's spread
    pairs = [(p["summary"]["sources_dynamic"]["median"], p["summary"]["hf_seq2seq"]["median"])
             for p in low if {"sources_dynamic", "hf_seq2seq"} <= set(p["summary"])]
    spread = max((max(a, b) / min(a, b) for a, b in pairs), default=None)
    tail = ("" if spread is None else
            f" At these points `sources_dynamic` and `hf_seq2seq`, which train the same padded batches, differ "
            f"by up to {spread:.2f}x: the spread of the measurement itself, so the best of three peers is "
            "picked partly by that noise.")
    return out + ["", "Under 1.2x the best peer: " + "; ".join(parts) + ". Packing saves the padded positions' work "
                  "(and, against trl, the block-diagonal mask); where a peer's batches hold little padding there "
                  "is little to save, and the per-step costs (optimizer, 4-bit dequantization, Python) are the "
                  "same for every variant." + tail]


def _where(p: dict[str, Any]) -> str:
    return f"{p['data']} cutoff {p['cutoff']} micro-batch {p['micro_batch']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=",".join(DATASETS))
    ap.add_argument("--cutoffs", default="256,1024")
    ap.add_argument("--micro-batches", default="4,16,64")
    ap.add_argument("--rows-per-run", type=int, default=32, help="rows timed per run (steps = rows / micro-batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--limit", type=int, default=None, help="use only the first N rows of each data set")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-kit-bench")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "train_peers.json")
    ap.add_argument("--quick", action="store_true", help="smoke: claude_t45, cutoff 128, micro-batch 4, 1 repeat")
    ap.add_argument("--no-readme", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.data, a.cutoffs, a.micro_batches, a.repeats, a.rows_per_run = "claude_t45", "128", "4", 1, 8
        a.hidden, a.layers, a.intermediate, a.heads, a.vocab, a.limit = 64, 1, 128, 2, 1000, a.limit or 64
    unknown = set(a.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)} (known: {', '.join(VARIANTS)})")
    names = [n for n in a.data.split(",") if n]
    present = [n for n in names if (SHARED_DATA / DATASETS[n][1]).is_file()]
    for n in sorted(set(names) - set(present)):
        print(f"train_peers: skipped {n}: {SHARED_DATA / DATASETS[n][1]} is absent")
    if not present:
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    a.workdir.mkdir(parents=True, exist_ok=True)
    points = []
    for n in present:
        for cutoff in map(int, a.cutoffs.split(",")):
            for mb in map(int, a.micro_batches.split(",")):
                t0 = time.perf_counter()
                p = point(n, cutoff, mb, steps_for(mb, a.rows_per_run), a.repeats, a, a.workdir)
                points.append(p)
                print(f"train_peers: {n} cutoff {cutoff} mb {mb} ({time.perf_counter() - t0:.0f}s): "
                      + json.dumps(p["summary"]), flush=True)
    from qlora_kit.config import load_recipe

    lora = load_recipe("alpagasus2").lora
    result = {"benchmark": "train_peers", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": "python bench/train_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": tt.machine() | {"load_avg_before": load_before, "load_avg_after": os.getloadavg()},
              "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "trl", "bitsandbytes")},
              "setup": {"hidden": a.hidden, "layers": a.layers, "intermediate": a.intermediate, "heads": a.heads,
                        "vocab": a.vocab, "rows_per_run": a.rows_per_run, "repeats": a.repeats,
                        "lora_r": lora.r, "lora_targets": list(lora.target_modules), "torch_threads": 1},
              "points": points}
    from run_all import publish

    publish("train_peers", "Training throughput vs peers, CPU (bench/train_peers.py)", result, a.out, readme_text,
            readme=not (a.quick or a.no_readme))
    bad = [p for p in points if not p["summary"]["same_examples_per_step"]]
    if bad:
        print(f"train_peers: FAILED: variants saw different examples per step at {len(bad)} point(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
