"""QLoRA training throughput, peak memory and MFU on one NVIDIA GPU: the sources' settings vs the kit's.

    .venv/bin/python bench/gpu_throughput.py                 # Llama-2-7B shape, cutoffs 512 and 1024
    .venv/bin/python bench/gpu_throughput.py --seq 1024 --repeats 3
    .venv/bin/python bench/gpu_throughput.py --dry-run       # CPU, tiny shape, one step: the test suite runs this

The model has Llama-2-7B's shape (32 layers, hidden 4096, intermediate 11008, 32 heads, vocab
32000) and random fp16 weights, written once as sharded safetensors into --workdir (13.5 GB;
no download, no gated repo) and loaded in 4-bit by `qlora_kit.train.load_base`, the kit's own
path (NF4 + double quantization, bf16 compute). The tokenizer is a 32000-piece sentencepiece
BPE the kit trains on the data (`qlora_kit.tiny.model`), so sequence lengths are of the order
of Llama-2's. Data: gpt4life's claude_t45.json from ../shared/data when present, else the kit's
shipped sample (smaller, shorter rows; the result file says which), rendered with the
alpagasus2 template and cut at the cutoff by `qlora_kit.preprocess.build`.

Variants (same numerics: NF4+DQ, bf16 AMP, adamw_torch, LoRA r8 on q/v; same effective batch of
16 examples per optimizer step and the same random sampler, so every variant trains on the
same 16 examples in each step; the script checks that from inside the forward pass):

- `source`: micro-batch 4 x grad-accum 4, every micro-batch padded to the cutoff, gradient
  checkpointing on: the sources' way (AlpaGasus2 / llama2-koalpaca: micro-batch 4, pad to the
  cutoff, `prepare_model_for_kbit_training`'s checkpointing).
- `kit_padding_free`: the same, with `train.packing: true` (no padding, no cross-attention).
- `kit_padding_free_mb16`: padding-free with micro-batch 16 x grad-accum 1 (the memory QLoRA
  saves buys a bigger micro-batch; the 4-bit weights are dequantized once per micro-batch, so
  fewer, larger micro-batches amortize it). Same examples per optimizer step; the loss is the
  same token-weighted mean (transformers 5 normalizes by the items in the whole step).
- `kit_padding_free_mb16_nockpt`: the same without gradient checkpointing, where memory allows
  (a forward pass saved instead of recomputed; numerically the same).

FLOPs per token (stated, not measured). N = parameters doing matmuls = all but the input
embedding (6.61e9 for Llama-2-7B). A frozen base still runs its forward (2N per token) and the
backward pass through it for the activation gradients (2N); it skips the weight gradients
(2N) that full fine-tuning pays, and LoRA's own FLOPs (r=8 on q/v: ~0.1% of N) are ignored.
Attention adds, per token of a sequence of length l, 4*L*d*l forward (QK^T and AV, no causal
discount, as PaLM's appendix B counts), times 3 for forward + backward.

- model FLOPs  = 4N * tokens + 12*L*d * sum(l^2)      -> MFU (the useful work of LoRA training)
- with checkpointing the forward runs twice: + 2N * tokens + 4*L*d * sum(l^2) -> HFU
- the common 6N convention (full fine-tuning's count): 6N * tokens + 12*L*d * sum(l^2) -> "MFU@6N",
  reported because many QLoRA write-ups quote it; it overstates LoRA's work by 1.5x.

Tokens are the real (non-pad) tokens: padding is waste, not work. Peak: H100/H200 989.4 dense
bf16 TFLOP/s, A100 312 (override with --peak-tflops). Results: bench/results/gpu_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gguf_export  # noqa: E402  (the checkpoint builder)
import train_throughput as tt  # noqa: E402  (one_run: the Trainer set up as qlora_kit.train does)

LLAMA2_7B = {"layers": 32, "hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "vocab": 32000}
DRY = {"layers": 2, "hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 4, "vocab": 1000}
# name: (batching, micro-batch, grad-accum, gradient checkpointing); effective batch 16 for all
VARIANTS = {"source": ("cutoff", 4, 4, True), "kit_padding_free": ("padding_free", 4, 4, True),
            "kit_padding_free_mb16": ("padding_free", 16, 1, True),
            "kit_padding_free_mb16_nockpt": ("padding_free", 16, 1, False)}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def matmul_params(cfg: dict[str, Any]) -> int:
    """N: parameters that take part in matmuls (everything but the input embedding and norms)."""
    d, inter, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * (d // cfg["num_attention_heads"])
    return L * (2 * d * d + 2 * d * kv + 3 * d * inter) + V * d


def flops(cfg: dict[str, Any], tokens: int, sum_sq: int, checkpointing: bool) -> dict[str, float]:
    n = matmul_params(cfg)
    att = cfg["num_hidden_layers"] * cfg["hidden_size"]
    model = 4 * n * tokens + 12 * att * sum_sq
    hw = model + (2 * n * tokens + 4 * att * sum_sq if checkpointing else 0)
    return {"model": model, "hardware": hw, "six_n": 6 * n * tokens + 12 * att * sum_sq}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def readme_text(res: dict[str, Any]) -> str:
    rows = ["| cutoff | variant | micro-batch x accum | ckpt | padding | real tok/s | x source | peak GiB | MFU (4N) | "
            "HFU | MFU@6N |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cutoff, r in res["results"].items():
        for v, row in r["summary"].items():
            if not isinstance(row, dict):
                continue
            b, mb, ga, ck = VARIANTS[v]
            if row.get("oom"):
                rows.append(f"| {cutoff} | `{v}` | {mb} x {ga} | {'on' if ck else 'off'} | | out of memory | | | | | |")
                continue
            pct = lambda k: f"{100 * row[k]:.1f} %" if k in row else "n/a"  # noqa: E731
            rows.append(f"| {cutoff} | `{v}` | {mb} x {ga} | {'on' if ck else 'off'} | {100 * row['padding_fraction']:.1f} % | "
                        f"{row['real_tok_per_s']:.0f} | {row.get('speedup_vs_source', 1):.2f}x | {row['peak_gpu_gib']:.1f} | "
                        f"{pct('mfu')} | {pct('hfu')} | {pct('mfu_6n')} |")
    return "\n".join([
        f"Measured {res['date']} on {res['device']} (peak {res['peak_tflops']} dense bf16 TFLOP/s). Command: "
        f"`{res['command'].strip()}` (results: `bench/results/gpu_throughput.json`). Data: {res['data']}. "
        f"{res['steps_per_run']} optimizer steps per run (first one untimed), {res['repeats']} repeats, medians; "
        "\"x source\" compares supervised tokens/s.", "", *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", default="512,1024", help="cutoffs to run (comma-separated)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run; the first is warm-up")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--data", type=Path, default=tt.DEFAULT_DATA)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-kit-bench")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu_throughput.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, one step per variant (no GPU needed)")
    ap.add_argument("--no-readme", action="store_true", help="do not write the table into bench/README.md")
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        print("gpu_throughput: no CUDA device visible; run on an NVIDIA machine, or --dry-run for the CPU smoke",
              file=sys.stderr)
        return 1
    device = "cpu" if a.dry_run else "cuda"
    shape = DRY if a.dry_run else LLAMA2_7B
    steps, repeats = (1, 1) if a.dry_run else (a.steps, a.repeats)
    cutoffs = [128] if a.dry_run else [int(x) for x in a.seq.split(",") if x]
    names = [v for v in a.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)} (known: {', '.join(VARIANTS)})")

    from qlora_kit.config import load_recipe
    from qlora_kit.text.examples import build as build_examples
    from qlora_kit.text.rows import SourceRow, read_rows
    from qlora_kit.tiny.data import generate
    from qlora_kit.tiny.model import sample_texts
    from qlora_kit.text.tokenizer import load_tokenizer

    if a.data.is_file():
        rows, data_name = list(read_rows(a.data, "json")), a.data.name
    else:
        rows = [SourceRow("tiny-sample", i + 1, {k: r.get(k, "") for k in ("instruction", "input", "output")})
                for i, r in enumerate(generate(0))]
        data_name = "the kit's shipped sample (qlora_kit.tiny.data; ../shared/data absent)"
    if a.dry_run:
        rows = rows[:48]
    good = [r.fields for r in rows if r.fields and not r.problem]
    a.workdir.mkdir(parents=True, exist_ok=True)
    tok_dir = tt.build_model(a.workdir, sample_texts(good), {"hidden": 256, "layers": 1, "intermediate": 256,
                                                             "heads": 4, "vocab": shape["vocab"]})
    ckpt = a.workdir / ("ckpt-dry" if a.dry_run else "ckpt-llama2-7b-shape") / tok_dir.name
    if not (ckpt / "model.safetensors.index.json").is_file():
        shutil.rmtree(ckpt, ignore_errors=True)  # a build that was cut short
        t0 = time.perf_counter()
        info = gguf_export.build_checkpoint(ckpt, shape["layers"], shape["hidden"], shape["intermediate"],
                                            shape["heads"], shape["kv_heads"], shape["vocab"], tokenizer_dir=tok_dir)
        print(f"gpu_throughput: built {ckpt} ({info['params'] / 1e9:.2f}B params) in {time.perf_counter() - t0:.0f}s",
              flush=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    dev_name = torch.cuda.get_device_name(0) if cuda and not a.dry_run else "cpu (dry run)"
    peak = None if a.dry_run else peak_tflops(dev_name, a.peak_tflops)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qlora-kit-bench-gpu-") as tmp:
        for cutoff in cutoffs:
            runs = []
            recipe0 = load_recipe("alpagasus2", {"preprocess.max_length": cutoff})
            tok = load_tokenizer(ckpt, recipe0.template)
            parts, _ = build_examples(rows, tok, recipe0.template, recipe0.preprocess)
            train_rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in parts["train"]]
            for rep in range(repeats):
                order = names[rep % len(names):] + names[: rep % len(names)]
                for v in order:
                    batching, mb, ga, ckpt_on = VARIANTS[v]
                    recipe = load_recipe("alpagasus2", {
                        "preprocess.max_length": cutoff, "train.per_device_batch": mb, "train.grad_accum": ga,
                        "train.gradient_checkpointing": ckpt_on, "train.device": device,
                        "qlora.double_quant": True, "qlora.compute_dtype": "float32" if a.dry_run else "bfloat16",
                        "train.precision": "fp32" if a.dry_run else "bf16", "train.optimizer": "adamw_torch"})
                    try:
                        r = tt.one_run(v, recipe, ckpt, train_rows, tok.pad_id, steps, Path(tmp) / v,
                                       batching=batching, sampler="random", device=device)
                    except torch.cuda.OutOfMemoryError as e:  # the no-checkpointing variant may not fit
                        r = {"variant": v, "oom": str(e).splitlines()[0]}
                        torch.cuda.empty_cache()
                    if "oom" not in r:
                        f = flops(cfg, r["real_tokens"], r["sum_len_squared"], ckpt_on)
                        per_s = {k: f[k] / r["wall_s"] for k in f}
                        r.update(real_tok_per_s=round(r["real_tokens"] / r["wall_s"], 1),
                                 model_flops_per_s=per_s["model"], hardware_flops_per_s=per_s["hardware"],
                                 model_tflops=round(per_s["model"] / 1e12, 2),
                                 hardware_tflops=round(per_s["hardware"] / 1e12, 2))
                        if peak:
                            r.update(mfu=round(per_s["model"] / (peak * 1e12), 4),
                                     hfu=round(per_s["hardware"] / (peak * 1e12), 4),
                                     mfu_6n=round(per_s["six_n"] / (peak * 1e12), 4))
                    r["repeat"] = rep
                    runs.append(r)
                    print(f"gpu_throughput: seq {cutoff}: " + json.dumps(
                        {k: x for k, x in r.items() if k != "fingerprints"}), flush=True)
            ok = [r for r in runs if "oom" not in r]
            summary: dict[str, Any] = {}
            for v in names:
                rs = [r for r in ok if r["variant"] == v]
                if not rs:
                    summary[v] = {"oom": True}
                    continue
                summary[v] = {k: statistics.median(r[k] for r in rs) for k in
                              ("real_tok_per_s", "supervised_tok_per_s", "s_per_step", "padding_fraction")}
                summary[v]["peak_gpu_gib"] = max(r["peak_gpu_gib"] or 0 for r in rs) if not a.dry_run else None
                for k in ("mfu", "hfu", "mfu_6n"):
                    if k in rs[0]:
                        summary[v][k] = statistics.median(r[k] for r in rs)
            base = summary.get("source", {}).get("supervised_tok_per_s")
            for v, row in summary.items():
                if base and "supervised_tok_per_s" in row:
                    row["speedup_vs_source"] = round(row["supervised_tok_per_s"] / base, 3)
            fps = {tuple(r["fingerprints"]) for r in ok if r["repeat"] == 0}
            summary["same_examples_per_step"] = len(fps) <= 1
            results[str(cutoff)] = {"summary": summary, "runs": runs}
    out = {"benchmark": "gpu_throughput", "dry_run": a.dry_run, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "command": "python bench/gpu_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "device": dev_name, "peak_tflops": peak, "data": data_name,
           "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")},
           "model": {"shape": shape, "matmul_params": matmul_params(cfg)}, "steps_per_run": steps,
           "repeats": repeats, "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"gpu_throughput: wrote {a.out}")
    if not a.dry_run and not a.no_readme:
        from run_all import write_readme_block

        write_readme_block("gpu_throughput", "GPU throughput (bench/gpu_throughput.py)", readme_text(out))
    same = all(r["summary"]["same_examples_per_step"] for r in results.values())
    if not same:
        print("gpu_throughput: FAILED: the variants did not train on the same examples per step", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
