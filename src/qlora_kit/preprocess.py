"""Preprocess stage: raw rows -> rendered, tokenized, label-masked train/val sets + a data report.

    qlora-kit preprocess --recipe tiny        (dvc: preprocess@tiny)

Reads `data/NAME/raw` (as listed in its manifest) and the tokenizer in `models/NAME/base`;
writes `data/NAME/processed/{train,val}.jsonl` and `reports/NAME/data_report.json`
(rows in / kept / dropped by reason; in == kept + dropped is asserted).

The row -> example logic (`tokenize_example`, `build`) is pure: the tokenizer is a parameter.
"""
from __future__ import annotations

import json
from typing import Any

from qlora_kit.config import Recipe
from qlora_kit.errors import DataError
from qlora_kit.text.examples import build
from qlora_kit.text.rows import load_rows


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from qlora_kit import layout
    from qlora_kit.artifacts import StageRun, atomic_dir, write_json
    from qlora_kit.text.tokenizer import load_tokenizer

    paths = layout.paths(recipe.name)
    st = StageRun("preprocess", recipe, overrides)
    st.add_input("raw", paths.raw)
    tok = load_tokenizer(paths.base, recipe.template, trust_remote_code=recipe.model.trust_remote_code)
    rows = load_rows(paths.raw, recipe)
    st.lap("read")
    parts, rep = build(rows, tok, recipe.template, recipe.preprocess)
    st.lap("tokenize")
    report = {"recipe": recipe.name, **rep.to_json()}
    if not parts["train"]:
        raise DataError(f"{paths.raw}: no training rows left after preprocessing: {report}")
    with atomic_dir(paths.processed) as tmp:
        for name, exs in parts.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for e in exs:
                    f.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")
        st.facts.update(report=report, special_ids={"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id})
        write_json(tmp / "manifest.json", st.manifest())
    write_json(paths.reports / "data_report.json", report)
    st.write_run_report(paths.reports)
    return report


