"""The `qlora-kit` command: one subcommand per stage, plus `render` and `judge`.

    qlora-kit {fetch,preprocess,train,merge,quantize,evaluate} --recipe NAME [--set section.key=value ...]
    qlora-kit render --recipe NAME [--input FILE] [--limit N] [--show-loss]
    qlora-kit serve --recipe NAME [--gguf TYPE | --merged] [--port N]
    qlora-kit enable NAME [-- COMMAND ...]   (add NAME to params.yaml; with a command, e.g.
        `dvc repro evaluate@NAME`, the addition is undone when the command fails)

Exit codes: 0 ok; 2 bad recipe or bad input (the message names file, line and key; nothing
is written, because the recipe is validated before any stage starts); 1 anything else.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from qlora_kit.config import STAGE_SECTIONS, RecipeError, load_recipe, parse_overrides
from qlora_kit.errors import DataError
from qlora_kit.judge import replay as judge_replay
from qlora_kit import serve

STAGES = tuple(STAGE_SECTIONS)
STAGE_OUTPUTS = {"fetch": ("raw", "base"), "preprocess": ("processed",), "train": ("adapter",),
                 "merge": ("merged",), "quantize": ("gguf",), "evaluate": ("reports",)}
# What a stage reads, and which stage writes it: a stage run before its inputs exist says which
# one to run first, in one line, instead of failing deep inside a library.
STAGE_INPUTS = {"preprocess": ("raw",), "train": ("base", "processed"), "merge": ("base", "adapter"),
                "quantize": ("merged",), "evaluate": ("merged", "gguf")}
MADE_BY = {"raw": "fetch", "base": "fetch", "processed": "preprocess", "adapter": "train", "merged": "merge",
           "gguf": "quantize"}
STAGE_HELP = {
    "fetch": "put the base model and the raw data in place (tiny: build them offline)",
    "preprocess": "render, tokenize, mask labels, split; write the data report",
    "train": "(Q)LoRA training; writes the adapter, the loss log and the manifest",
    "merge": "merge the adapter into the base; a complete HF model folder",
    "quantize": "GGUF export with llama.cpp's converter and quantizer",
    "evaluate": "losses, generations, EOS rates, parity; reports/NAME/{metrics.json,report.md}",
}


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe name (recipes/NAME.yaml) or a path to a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe value for this run (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qlora-kit", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        _recipe_args(sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage]))
    en = sub.add_parser("enable", help="validate a recipe and add it to params.yaml's recipe list (for dvc)")
    en.add_argument("recipe")
    en.add_argument("then", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                    help="run COMMAND after enabling; if it fails, params.yaml is put back as it was")
    en.set_defaults(func=_enable)
    r = sub.add_parser("render", help="print prompt/completion/text of each row as JSON lines")
    _recipe_args(r)
    r.add_argument("--input", help="data file to render (default: the recipe's fetched raw data)")
    r.add_argument("--limit", type=int, default=None)
    r.add_argument("--show-loss", action="store_true", help="also tokenize and mark which tokens carry loss")
    r.add_argument("--tokenizer", help="tokenizer folder for --show-loss (default models/NAME/base)")
    _recipe_args(serve.add_cli(sub))
    judge_replay.add_cli(sub)
    return ap


def _enable(args: argparse.Namespace) -> int:
    """Add a recipe to params.yaml so dvc.yaml's foreach covers it (after strict validation),
    then run `args.then` if given; a failed command (say, fetch offline) undoes the addition, so
    params.yaml lists only recipes that ran."""
    from qlora_kit.layout import root

    params = root() / "params.yaml"
    before = params.read_text(encoding="utf-8")
    _add_recipe(args, params)
    then = args.then[1:] if args.then[:1] == ["--"] else args.then
    if not then:
        return 0
    import subprocess

    rc = subprocess.call(then)
    if rc != 0 and params.read_text(encoding="utf-8") != before:
        params.write_text(before, encoding="utf-8")
        print(f"qlora-kit: `{' '.join(then)}` failed (exit {rc}): removed {args.recipe} from {params.name} again",
              file=sys.stderr)
    return rc


def _add_recipe(args: argparse.Namespace, params) -> None:
    from qlora_kit.config import recipe_path, recipes_dir
    from qlora_kit.config_checks import check_name, load_yaml

    # dvc.yaml runs `qlora-kit STAGE --recipe NAME` for each listed name: only a plain name from recipes/
    name = check_name(args.recipe.rpartition("/")[2].removesuffix(".yaml").removesuffix(".yml"), "enable")
    if recipe_path(args.recipe).resolve() != (recipes_dir() / f"{name}.yaml").resolve():
        raise RecipeError(f"enable: {args.recipe}: only recipes in {recipes_dir()} can be enabled (copy it there)")
    args.recipe = name
    load_recipe(name)
    text = params.read_text(encoding="utf-8")
    names = (load_yaml(text, str(params))[0] or {}).get("recipes") or []
    if args.recipe not in names:
        # append one list item under `recipes:` and keep the file's comments as they are
        lines = text.splitlines()
        at = max(i for i, line in enumerate(lines) if line.startswith("recipes:") or
                 (line.startswith("- ") and any(line.startswith("recipes:") for line in lines[:i])))
        lines.insert(at + 1, f"- {args.recipe}")
        params.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"qlora-kit: added {args.recipe} to {params.name} (recipes: {names + [args.recipe]})")


def _check_inputs(stage: str, name: str, p) -> None:
    for part in STAGE_INPUTS.get(stage, ()):
        path = getattr(p, part)
        if not path.exists():
            first = MADE_BY[part]
            raise DataError(f"{path} does not exist yet: run `qlora-kit {first} --recipe {name}` first (or "
                            f"`make {stage} RECIPE={name}`, which runs every stage {stage} needs)")


def _quiet_library_noise() -> None:
    """Library messages that ask the user for nothing they can or need to do: bitsandbytes' note
    that the optional `kernels` package (not in the lock) is absent, so its own CPU 4-bit kernel
    is used; transformers' deprecation of a name peft calls. Everything else still prints."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda r: not str(r.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_library_noise()
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.command in STAGES or args.command in ("render", "serve"):
            overrides = parse_overrides(args.overrides)
            recipe = load_recipe(args.recipe, overrides)  # validated before anything is written
            if args.command == "render":
                from qlora_kit.text.render import run as render_run
                return render_run(recipe, args)
            if args.command == "serve":
                return serve.run(recipe, args)
            from qlora_kit import artifacts, layout

            artifacts.torch_threads()  # a bad QLORA_KIT_THREADS is refused before anything else
            p = layout.paths(recipe.name)  # a killed run's *.partial-PID folders go first
            artifacts.clear_dead_partials([p.raw.parent, p.base.parent, p.reports])
            for out in STAGE_OUTPUTS.get(args.command, ()):  # symlinked outputs: refused before any work
                artifacts.check_target(getattr(p, out))
            _check_inputs(args.command, recipe.name, p)
            module = importlib.import_module(f"qlora_kit.{args.command}")
            module.run(recipe, overrides)
            return 0
        return args.func(args)
    except (RecipeError, DataError) as e:
        print(f"qlora-kit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the kit's own stage errors carry a complete message: no traceback
        if not type(e).__module__.startswith("qlora_kit."):
            raise
        print(f"qlora-kit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
