"""Write the real data sets the goldens cover as normalized row files (stdlib only).

    python3 tools/reference/real_rows.py --data ../shared/data --out-dir /tmp/real-rows

`--data` is the folder of source data files described in its SOURCES.md (the tests find it as
`support.repo.SHARED_DATA`). Each data set is read as the recipes' fetch stage reads it
(`data.format`, `data.fields`, `data.skip_rows`) and written as `<name>.jsonl` with
`instruction`/`input`/`output` only, in file order; the reference scripts read these files.
The same table (`DATASETS`) tells the tests which files to give the kit.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# name: (files under --data, in order; format; field map kit -> file; rows to skip at the start)
DATASETS: dict[str, tuple[list[str], str, dict[str, str], int]] = {
    # KoAlpaca v1.0 rows of Volume21's copy; its first 11 rows are not KoAlpaca (SOURCES.md "Samples")
    "koalpaca_sample": (["samples/Volume21-github_test__ko_alpaca_data.sample.json"], "json", {}, 11),
    "claude_t45": (["gpt4life-alpagasus/data/filtered/claude_t45.json"], "json", {}, 0),
    "helpfulness_t45": (["gpt4life-alpagasus/data/filtered/helpfulness_t45.json"], "json", {}, 0),
    # komt's 14 answer files x 37 questions, files in file-name order, the recorded answer as output
    "komt_eval": (sorted([f"davidkim205-komt/eval_results/score_result_{m}.jsonl" for m in [
        "Llama-2-13b-chat-hf", "Llama-2-7b-chat-hf", "WizardLM-13B-V1.2", "beomi-KoAlpaca-Polyglot-12.8B",
        "clova", "cue", "gpt-3.5-turbo", "kfkas-Llama-2-ko-7b-Chat", "komt-llama-30b-v1",
        "komt-llama2-13b-v1", "komt-llama2-7b-v1", "komt-mistral-7b-v1-dpo", "komt-mistral-7b-v1",
        "nlpai-lab-kullm-polyglot-12.8b-v2"]]), "jsonl", {"output": "answer"}, 0),
}


def load(data: Path, name: str) -> list[dict[str, str]]:
    files, fmt, fields, skip = DATASETS[name]
    rows: list[dict[str, str]] = []
    for rel in files:
        text = (data / rel).read_text(encoding="utf-8")
        recs = json.loads(text) if fmt == "json" else [json.loads(x) for x in text.split("\n") if x.strip()]
        for r in recs:
            rows.append({f: r.get(fields.get(f, f)) or "" for f in ("instruction", "input", "output")})
    return rows[skip:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out-dir", required=True, type=Path)
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in DATASETS:
        rows = load(args.data, name)
        with open(args.out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
