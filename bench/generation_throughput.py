"""Generation throughput: seconds per 100 prompts of the evaluate stage's generations, one prompt
at a time against batched (HF: padded batches; GGUF: parallel sequences of one llama.cpp context).

    .venv/bin/python bench/generation_throughput.py            # the tiny recipe, ~2 min on 2 cores
    .venv/bin/python bench/generation_throughput.py --quick    # smoke: a 3-step model, f16, 1 repeat

Builds the tiny recipe's merged model and GGUFs with the kit's own stages (fetch, preprocess,
train, merge, quantize: `qlora_kit.<stage>.run`, no download) in a kit root under `--workdir`
(kept, and reused by the next run when it already holds them), then times, on the tiny recipe's
held-out prompts in their inference form (the prompts `qlora-kit evaluate` generates from), the
call the evaluate stage makes (`qlora_kit.scoring.generation`), repeated over as many passes as
reach 100 prompts or more:

- HF, fp32: `hf_generate_ids(..., batch_size=1)` (one `model.generate` per prompt) vs the
  recipe's `eval.generation_batch_size` (left-padded batches, sorted by length);
- each GGUF opened as evaluate opens it (`logits_all=True`):
  `gguf_generate_ids(..., reuse_prefix=False, batch_size=1)` (one prompt at a time, every prompt
  decoded from token 0, llama.cpp's sampler) vs the recipe's `eval.generation_batch_size`
  (parallel sequences of one llama.cpp context, one llama_decode per step). The prefix-reuse path
  (`batch_size=1`, `reuse_prefix=True`, what a sampling recipe runs) is timed alongside as
  `prefix_reuse`. The context is emptied before each pass.

Old and new paths alternate (the order flips each repeat); figures are medians of `--repeats`
runs, in wall seconds and CPU seconds (`time.process_time`, torch and llama.cpp on 1 thread), per
100 prompts, and their ratio old / new. Greedy outputs of the two paths must be identical token
for token for every prompt (the script fails otherwise). Results go to
bench/results/generation_throughput.json and, for a full run, into bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STAGES = ("fetch", "preprocess", "train", "merge", "quantize")
# --quick: a few steps on 64 rows, f16 only (the model is not trained, its answers run long)
QUICK: dict[str, Any] = {"data.limit": 64, "train.max_steps": 3, "train.eval_steps": 0, "train.save_steps": 0,
                         "eval.num_prompts": 8, "eval.max_new_tokens": 8, "quantize.types": ["f16"],
                         "quantize.parity_rows": 2}


def build(root: Path, overrides: dict[str, Any]) -> None:
    """The tiny recipe's stages up to quantize in kit root `root`, unless it already has GGUFs."""
    import importlib

    from qlora_kit.config import load_recipe

    if list((root / "models" / "tiny" / "gguf").glob("model-*.gguf")):
        print(f"generation_throughput: reusing the tiny outputs in {root}", flush=True)
        return
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(REPO / "recipes", root / "recipes")
    recipe = load_recipe("tiny", overrides)
    for stage in STAGES:
        print(f"generation_throughput: building: {stage}", flush=True)
        importlib.import_module(f"qlora_kit.{stage}").run(recipe, overrides)


def held_out(recipe: Any, paths: Any) -> tuple[Any, list[list[int]], int]:
    """The tokenizer, the held-out prompt ids (as evaluate builds them) and the evaluate n_ctx."""
    from qlora_kit.scoring.generation import prompt_ids
    from qlora_kit.text.examples import read_split
    from qlora_kit.text.tokenizer import load_tokenizer

    val = read_split(paths.processed, "val") or read_split(paths.processed, "train")
    tok = load_tokenizer(paths.merged, recipe.template)
    prompts = [prompt_ids(recipe, tok, r) for r in val[: recipe.eval.num_prompts]]
    n_ctx = max([512] + [len(r["input_ids"]) + recipe.eval.max_new_tokens + 8 for r in val])
    return tok, prompts, n_ctx


def timed(fn: Any, passes: int) -> tuple[float, float, list]:
    """(wall s, CPU s, outputs of the last pass) of `passes` calls of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(passes):
        out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def compare(label: str, runs: dict[str, Any], repeats: int, passes: int, n: int) -> dict[str, Any]:
    """Alternate the old and the new path `repeats` times; medians per 100 prompts and ratios."""
    per100 = 100 / (passes * n)
    rows, outs = [], {}
    for r in range(repeats):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        row: dict[str, Any] = {"order": list(order)}
        for path in order:
            wall, cpu, outs[path] = timed(runs[path], passes)
            row[f"{path}_s_per_100"], row[f"{path}_cpu_s_per_100"] = round(wall * per100, 4), round(cpu * per100, 4)
        rows.append(row)
        if outs["old"] != outs["new"]:
            diff = [i for i, (a, b) in enumerate(zip(outs["old"], outs["new"])) if a != b]
            raise SystemExit(f"generation_throughput: {label}: outputs differ on prompts {diff}")
    med = {k: round(statistics.median(row[k] for row in rows), 4) for k in rows[0] if k != "order"}
    res = {**med, "ratio_wall": round(med["old_s_per_100"] / med["new_s_per_100"], 3),
           "ratio_cpu": round(med["old_cpu_s_per_100"] / med["new_cpu_s_per_100"], 3),
           "identical_outputs": True, "answer_tokens_mean": round(sum(len(o[0]) for o in outs["new"]) / n, 2),
           "ended_with_eos": sum(o[1] for o in outs["new"]), "runs": rows}
    print(f"generation_throughput: {label}: " + json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    return res


def measure_hf(recipe: Any, paths: Any, tok: Any, prompts: list, repeats: int, passes: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kit.scoring.generation import hf_generate_ids

    model = AutoModelForCausalLM.from_pretrained(str(paths.merged), dtype=torch.float32).eval()
    bs = recipe.eval.generation_batch_size
    runs = {"old": lambda: hf_generate_ids(model, tok, recipe, prompts, batch_size=1),
            "new": lambda: hf_generate_ids(model, tok, recipe, prompts, batch_size=bs)}
    hf_generate_ids(model, tok, recipe, prompts[:2], batch_size=2)  # warm-up, not timed
    return {"batch_size": bs, **compare("hf", runs, repeats, passes, len(prompts))}


def measure_gguf(recipe: Any, f: Path, tok: Any, prompts: list, n_ctx: int, repeats: int,
                 passes: int) -> dict[str, Any]:
    from qlora_kit.gguf.runtime import open_gguf
    from qlora_kit.scoring.generation import gguf_generate_ids

    bs = recipe.eval.generation_batch_size
    with open_gguf(f, n_ctx=n_ctx, logits_all=True, seed=0, n_threads=1, n_threads_batch=1) as llm:
        def run(reuse: bool, batch: int) -> list:
            llm.reset()  # each pass starts from an empty context
            return gguf_generate_ids(llm, tok, recipe, prompts, reuse_prefix=reuse, batch_size=batch)

        run(True, bs)  # warm-up, not timed
        label = f"gguf-{f.stem.removeprefix('model-')}"
        res = compare(label, {"old": lambda: run(False, 1), "new": lambda: run(True, bs)}, repeats, passes,
                      len(prompts))
        reuse = compare(label + " prefix reuse", {"old": lambda: run(False, 1), "new": lambda: run(True, 1)},
                        repeats, passes, len(prompts))
        return {"batch_size": bs, **res, "prefix_reuse": {k: reuse[k] for k in (
            "new_s_per_100", "new_cpu_s_per_100", "ratio_wall", "ratio_cpu", "identical_outputs")}}


def shared_prefix(prompts: list[list[int]]) -> float:
    """Mean number of leading tokens a prompt shares with the one before it."""
    pairs = list(zip(prompts, prompts[1:]))
    return round(sum(len(os.path.commonprefix([a, b])) for a, b in pairs) / max(len(pairs), 1), 2)


def readme_text(res: dict[str, Any]) -> str:
    from run_all import machine_line

    m, p = res["machine"], res["prompts"]
    rows = ["| model | one at a time: s / 100 prompts (CPU s) | batched: s / 100 prompts (CPU s) | "
            "one at a time / batched, wall (CPU) |", "|---|---|---|---|"]
    old = new = 0.0
    for label, r in res["results"].items():
        how = (f"HF fp32, batch 1 vs {r['batch_size']}" if label == "hf"
               else f"{label.removeprefix('gguf-')} GGUF, 1 vs {r['batch_size']} sequences per llama_decode")
        rows.append(f"| {how} | {r['old_s_per_100']:.2f} ({r['old_cpu_s_per_100']:.2f}) | "
                    f"{r['new_s_per_100']:.2f} ({r['new_cpu_s_per_100']:.2f}) | "
                    f"{r['ratio_wall']:.2f}x ({r['ratio_cpu']:.2f}x) |")
        old, new = old + r["old_s_per_100"], new + r["new_s_per_100"]
    rows.append(f"| all of them (what evaluate generates) | {old:.2f} | {new:.2f} | {old / new:.2f}x |")
    reuse = [f"{label.removeprefix('gguf-')} {r['prefix_reuse']['new_s_per_100']:.2f} s "
             f"({r['prefix_reuse']['ratio_wall']:.2f}x)" for label, r in res["results"].items() if "prefix_reuse" in r]
    reps = next(iter(res["results"].values()))["runs"]
    return "\n".join([
        f"Measured {res['date']} on {machine_line(tuple(m['load_avg_before']), tuple(m['load_avg_after']))}; "
        f"medians of {len(reps)} alternating runs, torch and llama.cpp on 1 thread.",
        "",
        f"Command: `{res['command'].strip()}` (results: `bench/results/generation_throughput.json`). The tiny "
        f"recipe's {p['held_out']} held-out prompts ({p['prompt_tokens_mean']} tokens on average, "
        f"{p['shared_prefix_tokens_mean']} shared with the previous prompt), {p['passes']} passes "
        f"({p['timed_per_pass'] * p['passes']} prompts), greedy, up to {p['max_new_tokens']} new tokens; "
        "outputs identical token for token between the paths.",
        "",
        *rows,
        "",
        "One prompt at a time, a GGUF runs llama_decode once per new token of each prompt; batched, once "
        "per step for all running sequences, so the per-call cost is shared, and the prefix every prompt "
        "shares is decoded once. One prompt at a time with "
        "the shared prefix kept (what a sampling recipe's evaluate runs), per 100 prompts: "
        + ", ".join(reuse) + "; consecutive prompts share only the template header, so that gains little.",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-prompts", type=int, default=100, help="passes over the held-out prompts reach this many")
    ap.add_argument("--types", default="", help="GGUF types to time, comma-separated (default: every one built)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-kit-bench-generation")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "generation_throughput.json")
    ap.add_argument("--quick", action="store_true", help="smoke: a 3-step model, f16, 8 prompts x 2, 1 repeat")
    ap.add_argument("--no-readme", action="store_true", help="do not write the table into bench/README.md")
    a = ap.parse_args(argv)
    overrides = QUICK if a.quick else {}
    if a.quick:
        a.repeats, a.min_prompts = 1, 16
    root = a.workdir / ("quick" if a.quick else "tiny")
    os.environ["QLORA_KIT_ROOT"] = str(root)
    os.environ.setdefault("QLORA_KIT_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from qlora_kit import layout
    from qlora_kit.config import load_recipe

    load_before = os.getloadavg()
    build(root, overrides)
    recipe, paths = load_recipe("tiny", overrides), layout.paths("tiny")
    tok, prompts, n_ctx = held_out(recipe, paths)
    passes = math.ceil(a.min_prompts / len(prompts))
    results = {"hf": measure_hf(recipe, paths, tok, prompts, a.repeats, passes)}
    types = [t for t in a.types.split(",") if t]
    for f in sorted(paths.gguf.glob("model-*.gguf")):
        if not types or f.stem.removeprefix("model-") in types:
            results[f"gguf-{f.stem.removeprefix('model-')}"] = measure_gguf(recipe, f, tok, prompts, n_ctx,
                                                                            a.repeats, passes)
    out = {"benchmark": "generation_throughput", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "command": "python bench/generation_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
           "prompts": {"held_out": len(prompts), "passes": passes, "timed_per_pass": len(prompts),
                       "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
                       "shared_prefix_tokens_mean": shared_prefix(prompts),
                       "max_new_tokens": recipe.eval.max_new_tokens},
           "results": results}
    sys.path.insert(0, str(HERE))
    from run_all import publish

    publish("generation_throughput", "Generation throughput (bench/generation_throughput.py)", out, a.out,
            readme_text, readme=not (a.quick or a.no_readme))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
