"""Preprocess throughput: rows per second of `qlora_kit.preprocess.build` on the real data sets.

    .venv/bin/python bench/preprocess_throughput.py            # ~2 min on 2 cores
    .venv/bin/python bench/preprocess_throughput.py --quick    # smoke: one data set, 1 repeat, 200 rows

For each data set (read in place from ../shared/data; one that is absent is skipped and named):
claude_t45 and random_9k with the alpagasus2 recipe (joint tokenization, full-text loss, cutoff
256), the KoAlpaca sample with llama2-koalpaca (separate tokenization, completion loss, drop over
1024) and with polyglot-koalpaca (GPT-NeoX byte-level BPE). The tokenizers are the kit's own tiny
ones (`qlora_kit.tiny.model`, trained on the shipped sample): no download; rows/s depends on the
tokenizer's speed, which is that of the `tokenizers` library whatever the vocabulary.

Three figures per data set, each the median of `--repeats` runs:

- cold: a fresh Python process does everything a `qlora-kit preprocess` run does before writing:
  imports, tokenizer load, reading and checking the rows, rendering, tokenizing, masking, the
  length policy and the split. rows / (the child's wall from interpreter start to the end of that
  first `build`; the phases it runs afterwards are subtracted).
- warm: the same `build` a second time in the same process. The kit has no preprocessing cache
  (DVC skips the stage when nothing changed; within a run nothing is reused), so this is simply
  the second pass: tokenizer loaded, code imported, pages warm.
- sources' way: the rendered texts tokenized in batches of 1000 by the HF tokenizer's batched
  `__call__`, as `datasets.map(batched=True)` did in the sources (no label mask, no per-row
  checks: a lower bound on the work, for scale). Run in the same warm process, right after.

Results go to bench/results/preprocess_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# the source data folder (its SOURCES.md): QLORA_KIT_TEST_DATA, as the tests read it
SHARED_DATA = Path(os.environ.get("QLORA_KIT_TEST_DATA") or REPO.parent / "shared" / "data")
# name: (recipe, file under shared/data, skip_rows)
DATASETS = {
    "claude_t45": ("alpagasus2", "gpt4life-alpagasus/data/filtered/claude_t45.json", 0),
    "random_9k": ("alpagasus2", "gpt4life-alpagasus/data/random/random_9k.json", 0),
    "koalpaca_sample": ("llama2-koalpaca", "samples/Volume21-github_test__ko_alpaca_data.sample.json", 11),
    "koalpaca_sample_neox": ("polyglot-koalpaca", "samples/Volume21-github_test__ko_alpaca_data.sample.json", 11),
}


def tokenizers(workdir: Path, archs: set[str]) -> dict[str, Path]:
    """The kit's tiny llama and gpt_neox folders (tokenizer included), built once into workdir."""
    from qlora_kit.tiny.data import generate
    from qlora_kit.tiny.model import build, sample_texts

    out = {}
    for arch in sorted(archs):
        d = workdir / f"tok-{arch}"
        if not (d / "config.json").is_file():
            build(arch, d, sample_texts(generate(0)))
        out[arch] = d
    return out


def child(name: str, tok_dir: Path, limit: int | None) -> dict[str, Any]:
    """One cold measurement; run in a fresh process. Times are from interpreter start."""
    t_imp0 = time.perf_counter()
    from qlora_kit.config import load_recipe
    from qlora_kit.text.examples import build
    from qlora_kit.text.rows import read_rows
    from qlora_kit.text.templates import render
    from qlora_kit.text.tokenizer import load_tokenizer

    import transformers  # noqa: F401  (load_tokenizer imports it lazily; counted as import time)

    t_imp = time.perf_counter()
    recipe_name, rel, skip = DATASETS[name]
    recipe = load_recipe(recipe_name)
    tok = load_tokenizer(tok_dir, recipe.template)
    t_tok = time.perf_counter()
    rows = list(read_rows(SHARED_DATA / rel, "json"))[skip:]
    rows = rows[:limit] if limit else rows
    t_read = time.perf_counter()
    parts, rep = build(rows, tok, recipe.template, recipe.preprocess)
    t_build = time.perf_counter()
    build(rows, tok, recipe.template, recipe.preprocess)  # warm: the second pass (no cache exists)
    t_warm = time.perf_counter()
    texts = []
    for r in rows:
        if r.fields is not None and not r.problem:
            rend = render(recipe.template, r.fields, bos=tok.bos, eos=tok.eos)
            texts.append(rend.prompt + rend.completion)
    t_render = time.perf_counter()
    n_tok = 0
    for i in range(0, len(texts), 1000):  # datasets.map(batched=True) default batch size
        enc = tok.hf(texts[i:i + 1000], add_special_tokens=False)
        n_tok += sum(len(x) for x in enc["input_ids"])
    t_batched = time.perf_counter()
    kept = sum(len(v) for v in parts.values())
    return {"rows": len(rows), "kept": kept, "tokens_kit": sum(len(e.input_ids) for v in parts.values() for e in v),
            "tokens_batched": n_tok, "since_interpreter_start_s": round(t_build - T_START, 4),
            "phases_s": {"before_imports": round(t_imp0 - T_START, 4), "imports": round(t_imp - t_imp0, 4),
                         "recipe_and_tokenizer": round(t_tok - t_imp, 4), "read_rows": round(t_read - t_tok, 4),
                         "build": round(t_build - t_read, 4), "build_again_warm": round(t_warm - t_build, 4),
                         "render_only": round(t_render - t_warm, 4), "hf_batched_tokenize": round(t_batched - t_render, 4)}}


def measure(name: str, tok_dir: Path, repeats: int, limit: int | None) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--tok", str(tok_dir)]
        if limit:
            cmd += ["--limit", str(limit)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"child {name} failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["process_wall_s"] = round(wall, 4)
        runs.append(r)
    return summarize(runs, repeats)


def summarize(runs: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    n = runs[0]["rows"]
    ph = [r["phases_s"] for r in runs]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    # cold = the child's whole wall (interpreter start included) up to the end of its first build:
    # the phases it runs after that (second build, sources' way) are taken off
    after = ("build_again_warm", "render_only", "hf_batched_tokenize")
    for r in runs:
        r["cold_wall_s"] = round(r["process_wall_s"] - sum(r["phases_s"][k] for k in after), 4)
    cold = med(n / r["cold_wall_s"] for r in runs)
    warm = med(n / p["build_again_warm"] for p in ph)
    batched = med(n / (p["render_only"] + p["hf_batched_tokenize"]) for p in ph)
    return {"rows": n, "kept": runs[0]["kept"], "repeats": repeats,
            "cold_rows_per_s": round(cold, 1), "first_build_rows_per_s": round(med(n / p["build"] for p in ph), 1),
            "warm_rows_per_s": round(warm, 1), "sources_batched_rows_per_s": round(batched, 1),
            "warm_over_cold": round(warm / cold, 2), "sources_batched_over_kit_warm": round(batched / warm, 2),
            "median_cold_wall_s": round(med(r["cold_wall_s"] for r in runs), 3),
            "median_phases_s": {k: round(med(p[k] for p in ph), 4) for k in ph[0]}, "runs": runs}


def readme_text(res: dict[str, Any]) -> str:
    sys.path.insert(0, str(HERE))
    from run_all import machine_line

    m = res["machine"]
    rows = ["| data set (recipe) | rows in / kept | cold rows/s (fresh process) | first `build` rows/s | "
            "warm rows/s (second `build`) | warm / cold | sources' batched tokenize rows/s | ÷ kit warm | "
            "cold: process wall s to the end of the first `build` (of which imports + tokenizer load) |", "|---|---|---|---|---|---|---|---|---|"]
    for n, r in res["results"].items():
        ph = r["median_phases_s"]
        rows.append(f"| {n} ({res['datasets'][n]['recipe']}) | {r['rows']} / {r['kept']} | {r['cold_rows_per_s']:.0f} | "
                    f"{r['first_build_rows_per_s']:.0f} | {r['warm_rows_per_s']:.0f} | {r['warm_over_cold']:.1f}x | "
                    f"{r['sources_batched_rows_per_s']:.0f} | {r['sources_batched_over_kit_warm']:.2f}x | "
                    f"{r['median_cold_wall_s']:.1f} ({ph['imports'] + ph['recipe_and_tokenizer']:.1f}) |")
    reps = next(iter(res["results"].values()))["repeats"]
    return "\n".join([
        f"Measured {res['date']} on {machine_line(tuple(m['load_avg_before']), tuple(m['load_avg_after']))}; "
        "medians of alternating runs.",
        "",
        f"Command: `{res['command'].strip()}` (results: `bench/results/preprocess_throughput.json`). Medians of "
        f"{reps} runs; each cold run is a fresh process. Tokenizers: the kit's tiny ones (no download).",
        "",
        *rows,
        "",
        "There is no preprocessing cache in the kit (DVC skips the whole stage when its inputs are unchanged); "
        "\"warm\" is the second `build` in the same process. \"Sources' batched tokenize\" is render + the HF "
        "tokenizer's batched call over 1000-row chunks (what `datasets.map(batched=True)` ran), without the kit's "
        "per-row checks, label masks, length policy and split: a lower bound on the work, for scale. Cold figures "
        "are dominated by Python imports and the first tokenizer load, not by the rows.",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows of each data set")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-kit-bench")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "preprocess_throughput.json")
    ap.add_argument("--quick", action="store_true", help="smoke: claude_t45 only, 1 repeat, 200 rows")
    ap.add_argument("--no-readme", action="store_true", help="do not write the table into bench/README.md")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a Llama folder written by qlora_kit.tiny.model to use instead of building one")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tok", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.tok, a.limit)))
        return 0
    if a.quick:
        a.datasets, a.repeats, a.limit = "claude_t45", 1, a.limit or 200
    names = [n for n in a.datasets.split(",") if n]
    unknown = set(names) - set(DATASETS)
    if unknown:
        ap.error(f"unknown data sets {sorted(unknown)} (known: {', '.join(DATASETS)})")
    present = [n for n in names if (SHARED_DATA / DATASETS[n][1]).is_file()]
    for n in sorted(set(names) - set(present)):
        print(f"preprocess_throughput: skipped {n}: {SHARED_DATA / DATASETS[n][1]} is absent")
    if not present:
        return 0
    load_before = os.getloadavg()
    a.workdir.mkdir(parents=True, exist_ok=True)
    arch_of = {n: "gpt_neox" if DATASETS[n][0] == "polyglot-koalpaca" else "llama" for n in present}
    toks = {"llama": a.tokenizer} if a.tokenizer else {}
    toks |= tokenizers(a.workdir, set(arch_of.values()) - set(toks))
    results = {}
    for n in present:
        arch = arch_of[n]
        results[n] = measure(n, toks[arch], a.repeats, a.limit)
        summary = {k: v for k, v in results[n].items() if k != "runs"}
        print(f"preprocess_throughput: {n}: " + json.dumps(summary), flush=True)
    out = {"benchmark": "preprocess_throughput", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "command": "python bench/preprocess_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
           "cache": "none: the kit has no preprocessing cache; 'warm' is the second pass in the same process",
           "datasets": {n: {"recipe": DATASETS[n][0], "file": DATASETS[n][1], "skip_rows": DATASETS[n][2]}
                        for n in present},
           "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"preprocess_throughput: wrote {a.out}")
    if not (a.quick or a.no_readme or a.limit):
        from run_all import write_readme_block

        write_readme_block("preprocess_throughput", "Preprocess throughput (bench/preprocess_throughput.py)",
                           readme_text(out))
        print("preprocess_throughput: table written into bench/README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
