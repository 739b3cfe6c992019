"""The kit's preprocess, row by row, in the form of the reference goldens (tools/reference/).

The goldens in tests/fixtures/golden/ were made by running each source's own preprocessing code
under its era's libraries (tools/reference/README.md). `kit_results` runs the kit's own path on
the same rows - the recipe as shipped (its default, faithful mode), the tokenizer loaded by the
kit's loader from a folder in the layout the source loaded - and returns one record per row:
{"row", "kept", "reason", "input_ids", "labels"}, directly comparable with a golden line.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from support.repo import FIXTURES, REPO, SHARED_DATA

GOLDEN = FIXTURES / "golden"
EDGE_CASES = GOLDEN / "edge_cases.jsonl"
SUMMARY = GOLDEN / "summary.json"
REFERENCE = REPO / "tools" / "reference"
TOKENIZERS = SHARED_DATA / "tokenizers" / "llama-2"
RECIPES = ("llama2-koalpaca", "komt", "alpagasus2")

needs_tokenizer = pytest.mark.skipif(not (TOKENIZERS / "tokenizer.model").is_file(),
                                     reason=f"the real Llama-2 tokenizer is absent ({TOKENIZERS})")


def reference_module(name: str):
    """A stdlib-only module of tools/reference (common, real_rows), loaded by path."""
    spec = importlib.util.spec_from_file_location(f"reference_{name}", REFERENCE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@cache
def summary() -> dict[str, Any]:
    return json.loads(SUMMARY.read_text(encoding="utf-8"))


def layout(recipe: str) -> str:
    """The tokenizer layout the recipe's source loaded (hub-layout or komt-layout)."""
    return summary()["recipes"][recipe]["tokenizer"]


def tokenizer_dir(dest: Path, layout_name: str) -> Path:
    """A loadable folder: the layout's files + Meta's tokenizer.model (tokenizers/llama-2/README.md)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in (TOKENIZERS / layout_name).iterdir():
        shutil.copyfile(f, dest / f.name)
    shutil.copyfile(TOKENIZERS / "tokenizer.model", dest / "tokenizer.model")
    return dest


def read_golden(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def edge_rows():
    from qlora_kit.text.rows import read_rows

    return list(read_rows(EDGE_CASES, "jsonl"))


def real_rows(dataset: str):
    """The data set's rows as the kit's fetch + preprocess read them (files, format, fields, skip)."""
    from qlora_kit.text.rows import read_rows

    files, fmt, fields, skip = reference_module("real_rows").DATASETS[dataset]
    rows = []
    for rel in files:
        rows.extend(read_rows(SHARED_DATA / rel, fmt, fields))
    return rows[skip:]


def kit_recipe(name: str):
    from qlora_kit.config import load_recipe

    # every row lands in one part, in input order: the goldens decide per row, not per split.
    # By name: the kit's own recipes folder (this checkout, or QLORA_KIT_ROOT's)
    r = load_recipe(name, {"preprocess.val_ratio": 0.0})
    assert not r.preprocess.dedupe and r.preprocess.shuffle_seed is None, "per-row comparison needs both off"
    return r


def kit_results(name: str, rows: list, tok_dir: Path) -> tuple[list[dict[str, Any]], Any]:
    """One golden-form record per row (each row preprocessed on its own by the kit's `build`), and
    the kit's tokenizer."""
    from qlora_kit.errors import DataError
    from qlora_kit.text.examples import build
    from qlora_kit.text.tokenizer import load_tokenizer

    r = kit_recipe(name)
    tok = load_tokenizer(tok_dir, r.template, trust_remote_code=r.model.trust_remote_code)
    out = []
    for i, row in enumerate(rows):
        try:
            parts, rep = build([row], tok, r.template, r.preprocess)
        except DataError as e:  # on_bad_row: error refuses the row; the sources trained on it
            out.append({"row": i, "kept": False, "reason": f"error: {e}", "input_ids": None, "labels": None})
            continue
        kept = parts["train"] + parts["val"]
        if kept:
            out.append({"row": i, "kept": True, "reason": None, "input_ids": kept[0].input_ids,
                        "labels": kept[0].labels})
        else:
            (reason,) = rep.dropped
            out.append({"row": i, "kept": False, "reason": reason, "input_ids": None, "labels": None})
    return out, tok


def first_difference(want: dict[str, Any], got: dict[str, Any], tok) -> str:
    """One line: what differs in a row (keep/drop, or the first differing ids/labels, decoded)."""
    if (want["kept"], want["reason"]) != (got["kept"], got["reason"]):
        return f"kept/reason: source {want['kept']}/{want['reason']}, kit {got['kept']}/{got['reason']}"
    for key in ("input_ids", "labels"):
        a, b = want[key], got[key]
        if a == b:
            continue
        j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        ids = want["input_ids"]
        pieces = getattr(getattr(tok, "hf", None), "convert_ids_to_tokens", None) or (lambda x: x)
        if key == "input_ids":
            ctx = f"source {pieces(a[j:j + 4])} vs kit {pieces(b[j:j + 4])}"
        else:
            ctx = f"source {a[j:j + 4]} vs kit {b[j:j + 4]} (ids {ids[j:j + 4]})"
        return f"{key} differ at {j} (lengths {len(a)}/{len(b)}): {ctx}"
    return "identical"
