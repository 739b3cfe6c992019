"""Preprocess throughput: rows per CPU-second of the kit's preprocess vs the sources' own pipelines.

    .venv/bin/python bench/preprocess_throughput.py            # ~3 min on 2 cores
    .venv/bin/python bench/preprocess_throughput.py --quick    # smoke: one data set, 1 repeat, 200 rows

For each data set (read in place from the source data folder, QLORA_KIT_TEST_DATA; one that is
absent is skipped and named): claude_t45 and random_9k with the alpagasus2 recipe, the KoAlpaca
sample with llama2-koalpaca and with polyglot-koalpaca. Tokenizer: Meta's Llama-2 tokenizer (the
2023 hub layout, as llama2-koalpaca and alpagasus2 loaded it) where the data folder has it, else
the kit's tiny one; the kit's tiny GPT-NeoX BPE for polyglot-koalpaca. No download.

Per data set, each figure the median over `--repeats` fresh processes (rows / CPU seconds, one
tokenizer thread):

- kit: what a `qlora-kit preprocess` run does before it writes (read and check the rows, render,
  tokenize, mask, length policy, split), the second pass in the process.
- the source's own pipeline (bench/source_preprocess.py): the source's shipped code, from the data
  file to token ids, on today's libraries and the same tokenizer. It and the kit's pass alternate
  which runs first from one process to the next.
- render + one batched HF tokenizer call per 1000 rows: a floor for scale, not a pipeline.
- cold: rows / the process's wall from interpreter start to the end of its first pass.

Results go to bench/results/preprocess_throughput.json; the table into bench/README.md.
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


def real_llama2(workdir: Path) -> Path | None:
    """Meta's Llama-2 tokenizer in the 2023 hub layout (tokenizer.json + tokenizer.model), when
    the source data folder carries it (its tokenizers/llama-2/README.md); None otherwise."""
    import shutil

    src = SHARED_DATA / "tokenizers" / "llama-2"
    if not (src / "hub-layout" / "tokenizer.json").is_file() or not (src / "tokenizer.model").is_file():
        return None
    d = workdir / "tok-llama-2-hub"
    d.mkdir(parents=True, exist_ok=True)
    for f in [*(src / "hub-layout").iterdir(), src / "tokenizer.model"]:
        shutil.copyfile(f, d / f.name)
    return d


def child(name: str, tok_dir: Path, limit: int | None, source_first: bool) -> dict[str, Any]:
    """One cold measurement and the warm ones; run in a fresh process. Wall times are from
    interpreter start; the per-phase figures are CPU seconds of this process (one tokenizer thread)."""
    t_imp0 = time.perf_counter()
    import datasets  # noqa: F401  (the sources' pipelines import it; counted as import time)
    import transformers  # noqa: F401  (load_tokenizer imports it lazily; counted as import time)

    import source_preprocess
    from qlora_kit.config import load_recipe
    from qlora_kit.text.examples import build
    from qlora_kit.text.rows import read_rows
    from qlora_kit.text.templates import render
    from qlora_kit.text.tokenizer import load_tokenizer

    t_imp = time.perf_counter()
    recipe_name, rel, skip = DATASETS[name]
    recipe = load_recipe(recipe_name)
    tok = load_tokenizer(tok_dir, recipe.template)
    t_tok = time.perf_counter()

    def kit() -> tuple[int, int]:  # what `qlora-kit preprocess` does before writing: read + build
        rows = list(read_rows(SHARED_DATA / rel, "json"))[skip:]
        rows = rows[:limit] if limit else rows
        parts, _ = build(rows, tok, recipe.template, recipe.preprocess)
        return len(rows), sum(len(v) for v in parts.values())

    c0 = time.process_time()
    n_rows, kept = kit()
    t_build, cold_cpu = time.perf_counter(), time.process_time() - c0
    cpu: dict[str, float] = {}

    def timed(key: str, fn) -> Any:
        c = time.process_time()
        out = fn()
        cpu[key] = round(time.process_time() - c, 4)
        return out

    src_file, src_skip = SHARED_DATA / rel, skip
    if limit:  # the sources' pipelines read a whole file: give them one of the same rows
        with open(src_file, encoding="utf-8") as f:
            subset = json.load(f)[skip:skip + limit]
        src_file, src_skip = Path(tempfile.mkdtemp(prefix="pre-bench-")) / "rows.json", 0
        src_file.write_text(json.dumps(subset, ensure_ascii=False), encoding="utf-8")
    order = ["source", "kit"] if source_first else ["kit", "source"]
    for key in order:
        if key == "kit":
            timed("kit_warm", kit)
        else:
            n_src = timed("source_pipeline", lambda: source_preprocess.PIPELINES[recipe_name](
                src_file, src_skip, tok_dir, recipe))
            assert n_src <= n_rows, (n_src, n_rows)
    rows = list(read_rows(SHARED_DATA / rel, "json"))[skip:]
    rows = rows[:limit] if limit else rows

    def bare() -> int:  # render + the HF tokenizer's batched call, 1000 rows a call: a floor
        texts = [(lambda x: x.prompt + x.completion)(render(recipe.template, r.fields, bos=tok.bos, eos=tok.eos))
                 for r in rows if r.fields is not None and not r.problem]
        return sum(len(x) for i in range(0, len(texts), 1000)
                   for x in tok.hf(texts[i:i + 1000], add_special_tokens=False)["input_ids"])

    n_tok = timed("bare_batched_tokenize", bare)
    return {"rows": n_rows, "kept": kept, "tokens_batched": n_tok, "order": order,
            "since_interpreter_start_s": round(t_build - T_START, 4), "cold_cpu_s": round(cold_cpu, 4),
            "phases_s": {"before_imports": round(t_imp0 - T_START, 4), "imports": round(t_imp - t_imp0, 4),
                         "recipe_and_tokenizer": round(t_tok - t_imp, 4)},
            "cpu_s": cpu}


def measure(name: str, tok_dir: Path, repeats: int, limit: int | None) -> dict[str, Any]:
    runs = []
    for i in range(repeats):  # a fresh process each; the warm kit and the source's pipeline alternate
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--tok", str(tok_dir)]
        cmd += (["--limit", str(limit)] if limit else []) + (["--source-first"] if i % 2 else [])
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"child {name} failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["process_wall_s"] = round(wall, 4)
        runs.append(r)
    return summarize(runs, repeats)


def summarize(runs: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    n = runs[0]["rows"]
    med = statistics.median

    def rate(key: str) -> float | None:
        xs = [n / r["cpu_s"][key] for r in runs if r["cpu_s"].get(key)]
        return round(med(xs), 1) if xs else None

    warm, src, bare = rate("kit_warm"), rate("source_pipeline"), rate("bare_batched_tokenize")
    return {"rows": n, "kept": runs[0]["kept"], "repeats": repeats,
            "cold_rows_per_s": round(med(n / r["since_interpreter_start_s"] for r in runs), 1),
            "cold_cpu_rows_per_s": round(med(n / r["cold_cpu_s"] for r in runs), 1),
            "kit_warm_rows_per_cpu_s": warm, "source_pipeline_rows_per_cpu_s": src,
            "bare_batched_rows_per_cpu_s": bare,
            "kit_over_source": round(warm / src, 2) if src else None,
            "kit_over_bare": round(warm / bare, 2) if bare else None,
            "min_max_kit_warm": [round(n / max(r["cpu_s"]["kit_warm"] for r in runs), 1),
                                 round(n / min(r["cpu_s"]["kit_warm"] for r in runs), 1)],
            "median_cold_wall_s": round(med(r["since_interpreter_start_s"] for r in runs), 4),
            "median_imports_and_tokenizer_s": round(med(r["phases_s"]["imports"] + r["phases_s"]["recipe_and_tokenizer"]
                                                        for r in runs), 3),
            "runs": runs}


def readme_text(res: dict[str, Any]) -> str:
    sys.path.insert(0, str(HERE))
    import source_preprocess
    from run_all import machine_line

    m = res["machine"]
    rows = ["| data set (recipe) | tokenizer | rows in / kept | kit rows per CPU-s (min-max) | the source's own pipeline "
            "rows per CPU-s | kit ÷ source | render + one batched HF call rows per CPU-s | kit ÷ that | cold: "
            "fresh process rows/s (wall s, of which imports + tokenizer load) |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, spec=".0f": "-" if x is None else format(x, spec)  # noqa: E731
    for n, r in res["results"].items():
        d = res["datasets"][n]
        rows.append(f"| {n} ({d['recipe']}) | {d['tokenizer']} | {r['rows']} / {r['kept']} | "
                    f"{fmt(r['kit_warm_rows_per_cpu_s'])} ({r['min_max_kit_warm'][0]:.0f}-{r['min_max_kit_warm'][1]:.0f}) | "
                    f"{fmt(r['source_pipeline_rows_per_cpu_s'])}: {source_preprocess.DESCRIBE[d['recipe']]} | "
                    f"**{fmt(r['kit_over_source'], '.2f')}x** | {fmt(r['bare_batched_rows_per_cpu_s'])} | "
                    f"{fmt(r['kit_over_bare'], '.2f')}x | {r['cold_rows_per_s']:.0f} ({r['median_cold_wall_s']:.1f}, "
                    f"{r['median_imports_and_tokenizer_s']:.1f}) |")
    reps = next(iter(res["results"].values()))["repeats"]
    return "\n".join([
        f"Measured {res['date']} on {machine_line(tuple(m['load_avg_before']), tuple(m['load_avg_after']))}; "
        "one tokenizer thread (`TOKENIZERS_PARALLELISM=false`), CPU seconds of the process.",
        "",
        f"Command: `{res['command'].strip()}` (results: `bench/results/preprocess_throughput.json`). Medians of "
        f"{reps} fresh processes; in each, the kit's pass and the source's pipeline run one after the other, "
        "the order alternating between processes.",
        "",
        *rows,
        "",
        "\"Kit\" is what `qlora-kit preprocess` does before it writes: read and check the rows, render, tokenize "
        "(one batched call of the `tokenizers` library for the recipes that load `tokenizer.json`), mask the "
        "labels, apply the length policy, split; its second pass in the process (the first one pays for the "
        "page cache and lazy imports; the \"cold\" column shows it). \"The source's own pipeline\" runs the code "
        "each source shipped (`bench/source_preprocess.py`, which imports it from `tools/reference/`, copied "
        "verbatim with file:line) on today's libraries and the same tokenizer, from the data file to token "
        "ids. \"Render + one batched HF call\" is a floor, not a pipeline: no reading, checks, labels or split. "
        "`joint` tokenization with `loss: full` (alpagasus2, llama2-koalpaca) encodes each text once, as the "
        "sources did; `loss: completion` recipes also count the prompt's own tokens (the sources did too).",
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
    ap.add_argument("--source-first", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tok", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        sys.path.insert(0, str(HERE))
        print(json.dumps(child(a.child, a.tok, a.limit, a.source_first)))
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
    real = real_llama2(a.workdir) if not a.tokenizer else None
    if real:
        toks["llama"] = real
    toks |= tokenizers(a.workdir, set(arch_of.values()) - set(toks))
    tok_name = {"llama": "Llama-2 (Meta's, 32000 pieces)" if real else f"{toks['llama'].name} (kit's tiny)",
                "gpt_neox": "kit's tiny GPT-NeoX BPE"}
    results = {}
    for n in present:
        arch = arch_of[n]
        results[n] = measure(n, toks[arch], a.repeats, a.limit)
        summary = {k: v for k, v in results[n].items() if k != "runs"}
        print(f"preprocess_throughput: {n}: " + json.dumps(summary), flush=True)
    out = {"benchmark": "preprocess_throughput", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "command": "python bench/preprocess_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
           "cache": "none: the kit has no preprocessing cache; 'kit' is the second pass in the same process",
           "datasets": {n: {"recipe": DATASETS[n][0], "file": DATASETS[n][1], "skip_rows": DATASETS[n][2],
                            "tokenizer": tok_name[arch_of[n]]} for n in present},
           "results": results}
    sys.path.insert(0, str(HERE))
    from run_all import publish

    publish("preprocess_throughput", "Preprocess throughput (bench/preprocess_throughput.py)", out, a.out,
            readme_text, readme=not (a.quick or a.no_readme or a.limit))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
