"""Several processes for one train stage: torchrun / accelerate re-launch, the global batch split."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any
from qlora_kit.config import Recipe, RecipeError, recipe_path


class LaunchError(RuntimeError):
    """The distributed re-launch (torchrun / accelerate launch) failed."""


def fsdp_enabled() -> bool:
    """`accelerate launch` with an FSDP config sets this; the Trainer then wraps the model in FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def rank_batch(per_device_batch: int, grad_accum: int, world: int) -> tuple[int, int]:
    """(per-process micro-batch, per-process grad_accum) that keep the recipe's global batch.

    A recipe's `per_device_batch x grad_accum` is its global (effective) batch, the number the
    sources report, so a run on W processes must not multiply it by W. The kit divides grad_accum
    by W when it can (the micro-batch, and so memory and padding per forward, stay the source's),
    else per_device_batch (same examples per optimizer step, smaller forwards), else stops: a run
    whose global batch differs is a different run, so it is refused, not silently changed.
    """
    if world <= 1:
        return per_device_batch, grad_accum
    if grad_accum % world == 0:
        return per_device_batch, grad_accum // world
    if per_device_batch % world == 0:
        return per_device_batch // world, grad_accum
    raise RecipeError(
        f"train: the global batch per_device_batch {per_device_batch} x grad_accum {grad_accum} = "
        f"{per_device_batch * grad_accum} cannot be split over {world} processes (neither grad_accum nor "
        "per_device_batch is divisible by it); use a world size that divides one of them")


def relaunch_command(recipe: Recipe, overrides: dict[str, Any] | None, nproc: int,
                     accelerate_config: str | None) -> list[str]:
    """This same `qlora-kit train` under torchrun (standalone, one node) or `accelerate launch`."""
    if not recipe_path(recipe.name).exists():
        raise LaunchError(f"train: a distributed re-launch needs recipes/{recipe.name}.yaml (the recipe was "
                          "loaded from elsewhere); run torchrun / accelerate launch yourself")
    # --set values are YAML; JSON is YAML, so json.dumps round-trips every override exactly
    args = ["-m", "qlora_kit.cli", "train", "--recipe", recipe.name]
    for key, value in (overrides or {}).items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    if accelerate_config:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
        if nproc > 1:
            launch += ["--num_processes", str(nproc)]
        return launch + args
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def relaunch(recipe: Recipe, overrides: dict[str, Any] | None, nproc: int,
              accelerate_config: str | None) -> dict[str, Any]:
    from qlora_kit import layout

    if not accelerate_config:  # refuse an unsplittable global batch before starting N processes
        rank_batch(recipe.train.per_device_batch, recipe.train.grad_accum, nproc)
    cmd = relaunch_command(recipe, overrides, nproc, accelerate_config)
    print("train: launching " + " ".join(cmd[1:]), flush=True)
    # the children see RANK, so they train instead of launching again
    rc = subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode
    if rc != 0:
        raise LaunchError(f"train: the distributed run exited with status {rc} ({' '.join(cmd[1:4])} ...)")
    manifest = layout.paths(recipe.name).adapter / "manifest.json"
    return json.loads(manifest.read_text())["facts"]
