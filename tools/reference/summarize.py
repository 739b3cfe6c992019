"""Turn reference-script outputs into the committed goldens (stdlib only).

    python3 tools/reference/summarize.py edge --results DIR [--out-dir tests/fixtures/golden]
    python3 tools/reference/summarize.py real --results DIR [--out tests/fixtures/golden/summary.json]

`edge`: DIR/<recipe>.edge.jsonl -> tests/fixtures/golden/<recipe>.edge.jsonl, one line per edge
case: {"row", "case", "kept", "reason", "input_ids", "labels"}.
`real`: DIR/<recipe>.<dataset>.jsonl -> summary.json: per recipe and data set the row count, kept
count, drops by reason, token and loss-token totals, and the sha256 of the canonical stream
(common.canonical_line per row, in row order) plus one short hash per block of BLOCK rows, so a
mismatch can be located without the MBs of ids.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from common import block_hashes, iter_results, stream_sha256, write_results

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "fixtures" / "golden"
RECIPES = {  # recipe: (reference script, tokenizer layout it loads, venv)
    "llama2-koalpaca": ("tools/reference/llama2_koalpaca.py", "hub-layout", "l2k"),
    "komt": ("tools/reference/komt.py", "komt-layout", "komt"),
    "alpagasus2": ("tools/reference/alpagasus2.py", "hub-layout", "ag2"),
}
DATASETS = ("koalpaca_sample", "claude_t45", "helpfulness_t45", "komt_eval")
BLOCK = 256


def entry(results: list[dict]) -> dict:
    kept = [r for r in results if r["kept"]]
    return {
        "rows": len(results), "kept": len(kept),
        "dropped_by_reason": dict(sorted(Counter(r["reason"] for r in results if not r["kept"]).items())),
        "tokens": sum(len(r["input_ids"]) for r in kept),
        "loss_tokens": sum(x != -100 for r in kept for x in r["labels"]),
        "sha256": stream_sha256(results), "block_sha256_16": block_hashes(results, BLOCK),
    }


def summarize_real(results_dir: Path, out: Path) -> None:
    summary = {
        "about": "Reference ids of each recipe's source code under its era's libraries on the real rows "
                 "(tools/reference/README.md). Canonical stream: per row, in row order, "
                 "json.dumps([row, kept, reason, input_ids, labels], separators=(',', ':')) + '\\n' "
                 "(input_ids/labels null for dropped rows); block_sha256_16: the first 16 hex digits "
                 f"of the same hash over each block of {BLOCK} rows.",
        "block_rows": BLOCK,
        "recipes": {},
    }
    for recipe, (script, layout, venv) in RECIPES.items():
        per = {d: entry(list(iter_results(results_dir / f"{recipe}.{d}.jsonl"))) for d in DATASETS}
        summary["recipes"][recipe] = {"script": script, "venv": venv, "tokenizer": layout, "datasets": per}
    out.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{out}: {sum(len(v['datasets']) for v in summary['recipes'].values())} entries")


def summarize_edge(results_dir: Path, out_dir: Path) -> None:
    cases = [json.loads(x)["case"] for x in (out_dir / "edge_cases.jsonl").read_text(encoding="utf-8").splitlines()]
    for recipe in RECIPES:
        results = list(iter_results(results_dir / f"{recipe}.edge.jsonl"))
        assert len(results) == len(cases), (recipe, len(results), len(cases))
        slim = ({"row": r["row"], "case": cases[r["row"]], "kept": r["kept"], "reason": r["reason"],
                 "input_ids": r["input_ids"], "labels": r["labels"]} for r in results)
        n = write_results(out_dir / f"{recipe}.edge.jsonl", slim)
        print(f"{out_dir / f'{recipe}.edge.jsonl'}: {n} rows")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["edge", "real"])
    p.add_argument("--results", required=True, type=Path)
    p.add_argument("--out-dir", type=Path, default=GOLDEN)
    p.add_argument("--out", type=Path, default=GOLDEN / "summary.json")
    a = p.parse_args()
    if a.what == "edge":
        summarize_edge(a.results, a.out_dir)
    else:
        summarize_real(a.results, a.out)


if __name__ == "__main__":
    main()
