"""The kit against its sources' own code on every real row, with the real Llama-2 tokenizer.

tests/fixtures/golden/summary.json records, per recipe and data set (KoAlpaca sample rows 11+,
gpt4life's claude_t45 and helpfulness_t45, komt's 14 x 37 evaluation pairs), what the source's
preprocessing code produced under its era's libraries (tools/reference/): row and kept counts,
drops by reason, and the sha256 of the canonical per-row stream of keep/drop, input_ids and
labels. The kit, with the recipe as shipped (faithful mode) and the tokenizer folder in the
layout the source loaded, must produce the same stream; a mismatch names the first differing
block of rows. With QLORA_KIT_REFERENCE_OUT=DIR (the full per-row outputs that
tools/reference/make_goldens.sh leaves in WORK_DIR/out) it also counts the identical rows and
names the first differing one. Skips without ../shared/data.

    QLORA_KIT_TEST_DATA=DIR PYTHONPATH=src .venv/bin/python -m pytest -q tests/stages/test_real_rows_parity.py
"""
from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from support.goldens import (EDGE_CASES, GOLDEN, RECIPES, SHARED_DATA, first_difference, kit_results, layout,
                             needs_tokenizer, read_golden, real_rows, reference_module, summary, tokenizer_dir)
from support.repo import REPO

DATASETS = ("koalpaca_sample", "claude_t45", "helpfulness_t45", "komt_eval")
# the era venvs of tools/reference/make_venvs.sh; the harness test skips without them
VENVS = Path(os.environ.get("REFERENCE_VENVS") or Path.home() / ".cache" / "qlora-kit" / "reference-venvs")
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not present at {SHARED_DATA}")


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    return {name: tokenizer_dir(tmp_path_factory.mktemp(name), name) for name in ("hub-layout", "komt-layout")}


def test_summary_covers_every_recipe_and_data_set():
    s = summary()
    assert set(s["recipes"]) == set(RECIPES)
    for name, entry in s["recipes"].items():
        assert (REPO / entry["script"]).is_file(), entry["script"]
        assert set(entry["datasets"]) == set(DATASETS)
        for d, e in entry["datasets"].items():
            assert e["rows"] == e["kept"] + sum(e["dropped_by_reason"].values()), (name, d)
            assert len(e["block_sha256_16"]) == -(-e["rows"] // s["block_rows"])


@needs_data
@pytest.mark.parametrize("dataset", DATASETS)
def test_real_rows_are_the_ones_summarized(dataset):
    """The kit reads as many rows from each data set as the reference run did."""
    rows = real_rows(dataset)
    assert {s["datasets"][dataset]["rows"] for s in summary()["recipes"].values()} == {len(rows)}


@needs_tokenizer
@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_kit_matches_source_on_real_rows(recipe, dataset, tok_dirs):
    common = reference_module("common")
    want = summary()["recipes"][recipe]["datasets"][dataset]
    got, tok = kit_results(recipe, real_rows(dataset), tok_dirs[layout(recipe)])
    counts = {"rows": len(got), "kept": sum(g["kept"] for g in got),
              "dropped_by_reason": dict(sorted(Counter(g["reason"] for g in got if not g["kept"]).items()))}
    want_counts = {k: want[k] for k in counts}
    if counts == want_counts and common.stream_sha256(got) == want["sha256"]:
        return
    size = summary()["block_rows"]
    blocks = common.block_hashes(got, size)
    bad = [i for i, (a, b) in enumerate(zip(want["block_sha256_16"], blocks)) if a != b]
    msg = (f"{recipe} {dataset}: source {want_counts}, kit {counts}; ids/labels/keep differ in {len(bad)} of "
           f"{len(blocks)} blocks of {size} rows, the first at rows {bad[0] * size}-{bad[0] * size + size - 1}")
    full = Path(os.environ.get("QLORA_KIT_REFERENCE_OUT", "/nonexistent")) / f"{recipe}.{dataset}.jsonl"
    if full.is_file():
        ref = read_golden(full)
        keys = ("row", "kept", "reason", "input_ids", "labels")
        diff = [i for i, (a, b) in enumerate(zip(ref, got)) if {k: a[k] for k in keys} != b]
        msg += (f"; {len(got) - len(diff)}/{len(got)} rows identical; first: row {diff[0]}: "
                f"{first_difference(ref[diff[0]], got[diff[0]], tok)}")
    else:
        msg += "; set QLORA_KIT_REFERENCE_OUT to make_goldens.sh's full outputs to compare row by row"
    pytest.fail(msg)


@needs_tokenizer
@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_harness_reproduces_the_committed_edge_goldens(recipe, tok_dirs, tmp_path):
    """The goldens are what the harness makes: rerun the source's code under its era's libraries."""
    entry = summary()["recipes"][recipe]
    python = VENVS / entry["venv"] / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no reference venv at {python} (tools/reference/make_venvs.sh)")
    out = tmp_path / "edge.jsonl"
    subprocess.run([str(python), str(REPO / entry["script"]), "--tokenizer", str(tok_dirs[layout(recipe)]),
                    "--input", str(EDGE_CASES), "--out", str(out)], check=True, capture_output=True, timeout=600)
    keys = ("row", "kept", "reason", "input_ids", "labels")
    made = [{k: r[k] for k in keys} for r in read_golden(out)]
    assert made == [{k: g[k] for k in keys} for g in read_golden(GOLDEN / f"{recipe}.edge.jsonl")]
