"""Per-recipe `--set` overrides that run a real recipe on the kit's tiny model and shipped sample.

`TINY_OVERRIDES[name]` swaps only three things: the model (a tiny one of the recipe's own
architecture, built offline), the data (the shipped sample, a few dozen rows) and the step
counts (steps, warm-up, logging/eval/save cadence, generated tokens). Template, special tokens,
masking, tokenization, loss and length *policy* stay the recipe's own; `preprocess.max_length` is
lowered only where the recipe's limit exceeds the tiny model's 512 positions.
tests/test_recipes.py checks that no override touches anything else.

    from tests.recipe_overrides import TINY_OVERRIDES, as_set_args
    load_recipe("komt", TINY_OVERRIDES["komt"])                      # in-process
    ["qlora-kit", "train", "--recipe", "komt", *as_set_args("komt")]    # subprocess
"""
from __future__ import annotations

from typing import Any

import yaml

TINY_POSITIONS = 512  # qlora_kit.config.TinyModel.max_position_embeddings
SAMPLE_ROWS = 64

# Keys an override may touch: whole sections `model` and `data`, and these counts.
ALLOWED_KEYS = ("model.", "data.", "train.max_steps", "train.warmup_steps", "train.logging_steps",
                "train.eval_steps", "train.save_steps", "eval.max_new_tokens", "preprocess.max_length",
                # a property of the model, not of the recipe: a tiny 2-step model's next-token
                # distributions are near-uniform, so top-1 under 4-bit is a near-tie (mean KL
                # gates stay at the recipe's values)
                "quantize.min_top1")


def _tiny(arch: str, **counts: Any) -> dict[str, Any]:
    return {
        # model: a tiny model of the recipe's architecture, built from a seed by the fetch stage
        "model.source": "tiny", "model.name": f"tiny-{arch}", "model.arch": arch, "model.revision": None,
        # data: the shipped sample instead of the pinned download (no hashes to check)
        "data.source": "tiny-sample", "data.format": "json", "data.url": "", "data.path": "",
        "data.git_blob": "", "data.sha256": "", "data.hub_dataset": "", "data.hub_revision": None,
        "data.fields": {}, "data.extra": [], "data.skip_rows": 0, "data.limit": SAMPLE_ROWS,
        # step counts
        "train.max_steps": 2, "train.logging_steps": 1, "train.save_steps": 0, "eval.max_new_tokens": 16,
        "quantize.min_top1": {"q8_0": 0.9, "q4_0": 0.4, "q4_k_m": 0.4},
        **counts,
    }


TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    # max_length 1023 > 512 positions; eval every step instead of every 10
    "llama2-koalpaca": _tiny("llama", **{"preprocess.max_length": TINY_POSITIONS, "train.eval_steps": 1}),
    "llama2-koalpaca-7b": _tiny("llama", **{"preprocess.max_length": TINY_POSITIONS, "train.eval_steps": 1}),
    "komt": _tiny("llama", **{"preprocess.max_length": TINY_POSITIONS, "train.warmup_steps": 1}),
    "alpagasus2": _tiny("llama"),  # max_length 256 fits
    "alpagasus2-13b": _tiny("llama"),
    # 7077 warm-up steps -> 1
    "polyglot-koalpaca": _tiny("gpt_neox", **{"preprocess.max_length": TINY_POSITIONS, "train.warmup_steps": 1}),
}


def as_set_args(name: str) -> list[str]:
    """The same overrides as CLI arguments: ["--set", "key=value", ...] (values as YAML)."""
    out: list[str] = []
    for key, value in TINY_OVERRIDES[name].items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        if text.endswith("\n..."):
            text = text[: -len("\n...")]
        out += ["--set", f"{key}={text}"]
    return out
