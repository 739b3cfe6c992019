"""Preflight: before fetch downloads a base model, can this machine run the recipe at all?

Fetch runs it as soon as it knows the size of what it would download (the Hub's file listing,
one API call, or the local folder), before any weights move, and stops with every problem at
once and what to do (exit 2):

- device: a base model over CPU_LIMIT_BYTES (a real 7B-13B recipe) trains on CUDA. Without a
  visible CUDA device fetch stops, unless the recipe opts in to the CPU (`train.device: cpu`,
  e.g. `--set train.device=cpu`); `train.device: cuda` without a device stops too. Tiny models
  train anywhere.
- disk: free space at the kit root for what the recipe's stages write, estimated from the base
  model's size B: the download itself (unless it is already there), the merged model (B: the
  same dtype), the f16 GGUF (B) and each quantized GGUF (QUANT_SHARE x B), plus MARGIN_BYTES.
  A Hub download lands in the Hugging Face cache and is hard-linked into the kit root, so one
  disk holds it once; a cache on another disk needs room for B there as well (not checked).

`check(...)` returns the problems; `require(...)` raises PreflightError.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from qlora_kit.config import Recipe
from qlora_kit.errors import DataError

CPU_LIMIT_BYTES = 1 << 30  # a base model above 1 GiB of weights trains on CUDA
MARGIN_BYTES = 1 << 30
# bytes of a quantized GGUF per byte of f16 weights (llama.cpp's bits per weight / 16)
QUANT_SHARE = {"f16": 1.0, "q8_0": 8.5 / 16, "q6_k": 6.56 / 16, "q5_k_m": 5.7 / 16, "q4_k_m": 4.9 / 16,
               "q4_0": 4.5 / 16}


class PreflightError(DataError):
    """This machine cannot run the recipe as configured; the message says why and what to do."""


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def disk_need(recipe: Recipe, base_bytes: int, base_present: bool) -> int:
    """Bytes the recipe's stages will write at the kit root (see the module docstring)."""
    ggufs = sum(QUANT_SHARE.get(t, 1.0) for t in set(recipe.quantize.types) | {"f16"})
    return int((0 if base_present else base_bytes) + base_bytes * (1 + ggufs)) + MARGIN_BYTES


def check(recipe: Recipe, base_bytes: int, where: Path, *, base_present: bool = False,
          cuda: bool | None = None) -> list[str]:
    """The problems that stop `recipe` on this machine (empty: it can run). `where` is the folder
    the outputs go to (the kit root); `cuda` defaults to torch's answer."""
    problems = []
    device = recipe.train.device
    if device == "cuda" or (device == "auto" and base_bytes > CPU_LIMIT_BYTES):
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if not cuda:
            size = f"its base model is {_gib(base_bytes)}" if device == "auto" else "train.device is cuda"
            problems.append(
                f"device: no CUDA device is visible and {size}: training it on a CPU takes days. "
                "Run on a CUDA machine (or the kit's CUDA image, docker/README.md), or opt in to "
                "the CPU with --set train.device=cpu.")
    where = Path(where)
    probe = next((p for p in (where, *where.parents) if p.exists()), Path("/"))
    free, need = shutil.disk_usage(probe).free, disk_need(recipe, base_bytes, base_present)
    if free < need:
        problems.append(
            f"disk: {probe} has {_gib(free)} free; the recipe needs about {_gib(need)} (base "
            f"{_gib(base_bytes)}{', already there' if base_present else ''}, merged model, GGUFs "
            f"{', '.join(sorted(set(recipe.quantize.types) | {'f16'}))}, 1 GiB margin). Free space, or "
            "set QLORA_KIT_ROOT to a larger disk.")
    return problems


def require(recipe: Recipe, base_bytes: int, where: Path, *, base_present: bool = False,
            cuda: bool | None = None) -> None:
    problems = check(recipe, base_bytes, where, base_present=base_present, cuda=cuda)
    if problems:
        raise PreflightError(f"preflight for recipe {recipe.name}: " + " | ".join(problems))
