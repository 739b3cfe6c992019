"""Refuse model folders that would run code on load, unless the recipe opted in.

    python -c "from qlora_kit.sources.model_safety import check; from qlora_kit.config import load_recipe; \
print(check('models/tiny/base', load_recipe('tiny').model))"

Two ways a model folder can run someone else's code inside the kit:

- pickle weights (`*.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.ckpt`): unpickling can execute arbitrary
  code. torch's `weights_only=True` loader narrows this, but it has had bypasses (CVE-2025-32434,
  torch < 2.6), so the kit loads only safetensors unless the recipe sets `model.allow_pickle: true`.
  A folder that has safetensors is fine even if it also ships pickles: the loaders pass
  `use_safetensors=True` and never open them.
- custom code: `auto_map` in config.json (or tokenizer_config.json) points transformers at Python
  files in the folder. With `trust_remote_code=False` transformers skips them, but where the
  `model_type` is built in it silently loads its own class instead, which may not be the model
  the files describe. The kit refuses instead, unless the recipe sets `model.trust_remote_code: true`.

`check` raises `UnsafeModelError` (a `DataError`, so the CLI prints it and exits 2 before
anything is loaded). Call it on every folder the kit is about to load: fetch (local and hub
models), train, merge and evaluate. It reads only file names and two small JSON files.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from qlora_kit.config import Model
from qlora_kit.errors import DataError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
CODE_CONFIGS = ("config.json", "tokenizer_config.json")


class UnsafeModelError(DataError):
    """A model folder that would run code on load, or that is not a model folder at all."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeModelError(f"{path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UnsafeModelError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _weight_files(folder: Path) -> tuple[list[str], list[str]]:
    """(safetensors files, pickle files) anywhere in the folder, as relative paths."""
    safe, pickled = [], []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if p.name.endswith(".safetensors"):
            safe.append(rel)
        elif p.name.endswith(PICKLE_SUFFIXES) and p.name != "training_args.bin":
            # training_args.bin is a Trainer checkpoint's pickled arguments, not weights; a
            # checkpoint folder with safetensors is loaded without it
            pickled.append(rel)
    return safe, pickled


def check(folder: str | Path, model: Model, *, what: str = "model") -> dict[str, Any]:
    """Raise UnsafeModelError unless `folder` is safe to load under the recipe's `model` section.

    Returns facts for a manifest: the weight format and whether custom code is present.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UnsafeModelError(f"{what}: {folder}: not a model folder (no config.json)")
    safe, pickled = _weight_files(folder)
    # no weights at all is not unsafe (nothing would be unpickled); the loader says what is missing
    if pickled and not safe and not model.allow_pickle:
        raise UnsafeModelError(
            f"{what}: {folder}: the weights are pickle files only ({', '.join(pickled[:5])}"
            f"{', ...' if len(pickled) > 5 else ''}). Loading a pickle executes code chosen by whoever made "
            "the file, so the kit loads safetensors only. Convert the weights to safetensors, or set "
            "model.allow_pickle: true in the recipe if you trust the source.")
    custom: dict[str, Any] = {}
    for name in CODE_CONFIGS:
        path = folder / name
        if path.is_file():
            auto_map = _read_json(path).get("auto_map")
            if auto_map:
                custom[name] = auto_map
    py_files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py"))
    if custom and not model.trust_remote_code:
        where = ", ".join(f"{n} auto_map {sorted(m) if isinstance(m, dict) else m}" for n, m in custom.items())
        files = f" (code in the folder: {', '.join(py_files)})" if py_files else ""
        raise UnsafeModelError(
            f"{what}: {folder}: the model ships custom code ({where}){files}. The kit does not run a "
            "model's own Python unless the recipe sets model.trust_remote_code: true; read that code first. "
            "(transformers without it may quietly load a built-in class that is not this model.)")
    ran = [f"{', '.join(py_files) or 'the code auto_map names'} (trust_remote_code)" if custom else "",
           f"unpickling {', '.join(pickled[:5])} (allow_pickle)" if pickled and not safe else ""]
    if any(ran):  # the recipe opted in: say what will run
        print(f"qlora-kit: warning: {what}: {folder}: will run {' and '.join(r for r in ran if r)}",
              file=sys.stderr, flush=True)
    return {"weights": "safetensors" if safe else "pickle" if pickled else "none", "weight_files": safe or pickled,
            "custom_code": bool(custom), "python_files": py_files}
