"""Fetch stage: put the base model in `models/NAME/base` and the raw data in `data/NAME/raw`.

    qlora-kit fetch --recipe tiny          (dvc: fetch@tiny)

- `model.source: tiny` builds the model and tokenizer from a seed (no network), trained on
  the shipped sample text; `local` copies a folder; `hub` downloads a pinned revision. Before a
  local or Hub base moves, sources/preflight.py checks that this machine can run the recipe (CUDA for a
  large base unless `train.device: cpu`, free disk for every stage's outputs) and stops at once
  with what to do.
- `data.source: tiny-sample` copies the sample that ships in the package; `local` copies a
  file; `url` and `hub` download and verify (see `download.py`).

The raw manifest lists every data file with its sha256 (and git blob id), which preprocess reads.
"""
from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from qlora_kit.sources import model_safety
from qlora_kit.artifacts import StageRun, atomic_dir, write_json
from qlora_kit.sources.download import verify
from qlora_kit.config import Recipe

SAMPLE = "tiny_alpaca.json"


def sample_path() -> Path:
    return Path(str(resources.files("qlora_kit.tiny") / "assets" / SAMPLE))


def fetch_data(recipe: Recipe, dest: Path) -> list[dict[str, Any]]:
    d = recipe.data
    files: list[dict[str, Any]] = []
    if d.source == "tiny-sample":
        src, name = sample_path(), SAMPLE
        shutil.copyfile(src, dest / name)
    else:  # local, url, hub: download.py handles each entry of data and data.extra
        from qlora_kit.sources.download import fetch_remote_data

        return fetch_remote_data(recipe, dest)
    files.append({"name": name, "format": d.format, "fields": d.fields,
                  **verify(dest / name, d.sha256, d.git_blob, str(src))})
    return files


def fetch_model(recipe: Recipe, dest: Path, rows_for_tokenizer: list[dict[str, str]]) -> dict[str, Any]:
    m = recipe.model
    if m.source == "tiny":
        from qlora_kit.tiny.model import build, sample_texts

        build(m.arch, dest, sample_texts(rows_for_tokenizer), m.tiny)
        return {"source": "tiny", "arch": m.arch, "seed": m.tiny.seed}
    if m.source == "local":
        from qlora_kit.sources import preflight

        src = Path(m.name)
        model_safety.check(src, m, what="model.name")  # before copying gigabytes we would refuse
        preflight.require(recipe, sum(p.stat().st_size for p in src.rglob("*") if p.is_file()), dest)
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return {"source": "local", "path": str(src)}
    from qlora_kit.sources.download import fetch_hub_model

    return fetch_hub_model(recipe, dest)


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from qlora_kit import layout

    paths = layout.paths(recipe.name)
    st = StageRun("fetch", recipe, overrides)
    with atomic_dir(paths.raw) as raw_tmp, atomic_dir(paths.base) as base_tmp:
        files = fetch_data(recipe, raw_tmp)
        st.lap("data")
        # the tiny tokenizer is trained on the shipped sample text, whatever data the recipe uses
        sample_rows = json.loads(sample_path().read_text(encoding="utf-8"))
        model_facts = fetch_model(recipe, base_tmp, sample_rows)
        model_facts["safety"] = model_safety.check(base_tmp, recipe.model)  # hub and tiny too
        st.lap("model")
        st.facts.update(files=files, model=model_facts)
        write_json(raw_tmp / "manifest.json", st.manifest())
        write_json(base_tmp / "fetch_manifest.json", st.manifest())
    st.write_run_report(paths.reports)
    return st.facts
