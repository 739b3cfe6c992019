"""Strict recipe loader: `recipes/NAME.yaml` -> a frozen, typed `Recipe`.

Every stage reads its recipe through `load_recipe(name, overrides)` and then only the sections
named for it in `STAGE_SECTIONS`; `dvc.yaml` declares exactly those sections as the stage's params
(a test checks the two agree), so editing a value reruns exactly the stages that read it.

An unknown key, a wrong type or an impossible combination raises `RecipeError`, whose message
names the file, the line and the dotted key; the CLI turns it into exit code 2 before any stage
writes anything.

    python -c "from qlora_kit.config import load_recipe; print(load_recipe('tiny'))"
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlora_kit.layout import root

# Which recipe sections each stage reads. dvc.yaml's `params` must list exactly these
# (tests/test_dvc_pipeline.py checks it). `quirks` is listed wherever a quirk switch can change
# what the stage does, because switches are applied to the other sections at load time.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "fetch": ("source", "model", "data", "quirks"),
    "preprocess": ("template", "preprocess", "quirks"),
    "train": ("model", "qlora", "lora", "train", "quirks"),  # model: trust_remote_code, allow_pickle, dtype
    "merge": ("source", "model", "data", "template", "qlora", "merge", "quirks"),  # model card; nf4-roundtrip
    "quantize": ("template", "eval", "quantize", "quirks"),  # chat template, Modelfile generation params
    "evaluate": ("model", "template", "eval", "expected", "quirks"),  # template: the inference prompt form
}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names file, line and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Section):
    """What the recipe reproduces: the public repository and commit, and its files."""

    repo: str = ""
    commit: str = ""
    files: tuple[str, ...] = ()
    readme: str = ""  # the seed README in ../shared/seeds this recipe follows
    notes: str = ""


class TinyModel(_Section):
    """Shape of a model the kit builds itself (no download)."""

    seed: int = 0
    hidden_size: int = 256  # multiple of 256 so llama.cpp K-quants apply to every row
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 1000
    max_position_embeddings: int = 512


class Model(_Section):
    source: Literal["tiny", "hub", "local"]
    name: str  # hub repo id, local folder, or a label for tiny models
    arch: Literal["llama", "gpt_neox"]
    revision: str | None = None  # hub revision; the resolved commit goes into the manifest
    tiny: TinyModel = TinyModel()
    trust_remote_code: bool = False  # off unless the recipe opts in
    allow_pickle: bool = False  # only safetensors are loaded unless the recipe opts in
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class Data(_Section):
    source: Literal["tiny-sample", "hub", "url", "local"]
    path: str = ""  # local file (source=local) or file name inside the download
    url: str = ""  # source=url: pinned raw URL
    sha256: str = ""
    git_blob: str = ""  # git hash-object id, checked when known
    hub_dataset: str = ""
    hub_revision: str | None = None
    split: str = "train"
    format: Literal["json", "jsonl", "parquet"] = "json"
    # Map from the kit's field names to the file's field names (e.g. {input: context}).
    fields: dict[str, str] = Field(default_factory=dict)
    # Extra files merged before preprocessing (Polyglot: v1.0 + v1.1), same keys as above.
    extra: tuple[dict[str, Any], ...] = ()
    skip_rows: int = 0  # drop the first N rows (e.g. the non-KoAlpaca head of a sample)
    limit: int | None = None  # keep at most N rows after skip (tests, smoke runs)


class Template(_Section):
    """Prompt/completion strings. Placeholders: {system} {instruction} {input} {output} {bos} {eos}.

    Placeholders are substituted in one pass, so braces inside the data come out literally.
    """

    system: str = ""
    prompt: str
    prompt_with_input: str | None = None  # None: rows with an input use `prompt` (input unused)
    completion: str = "{output}"
    # Inference forms where the source prompted differently from how it trained (komt, Polyglot).
    inference_prompt: str | None = None
    inference_prompt_with_input: str | None = None
    strip: dict[Literal["instruction", "input", "output"], Literal["both", "left", "right"]] = Field(
        default_factory=dict
    )
    add_bos: bool = True  # prepend the tokenizer's BOS id to the prompt ids (explicitly, never implied)
    special_tokens: dict[Literal["bos", "eos", "unk", "pad"], str] = Field(default_factory=dict)
    pad_token: Literal["eos", "unk", "tokenizer"] = "tokenizer"  # what pad is set to


class Preprocess(_Section):
    loss: Literal["completion", "full"] = "completion"
    tokenize: Literal["separate", "joint"] = "separate"
    max_length: int = 512
    overlength: Literal["truncate", "drop"] = "truncate"
    count_extra_bos: bool = False  # llama2-koalpaca counts length with one more BOS
    mask_pad_in_labels: bool = False  # collator masks every id == pad (so pad == eos masks EOS)
    val_ratio: float = 0.1
    split_seed: int = 0
    filter_after_split: bool = False
    shuffle_seed: int | None = None
    on_bad_row: Literal["error", "drop"] = "error"
    dedupe: bool = False


class QLoRA(_Section):
    """How the frozen base is loaded for training (bitsandbytes): 4-bit NF4/FP4, 8-bit LLM.int8, or 16-bit.

    Not the GGUF export, which is `quantize:`.
    """

    bits: Literal[4, 8, 16] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"

    @model_validator(mode="after")
    def _coherent(self) -> QLoRA:
        if self.bits != 4 and self.double_quant:
            raise ValueError(f"double_quant: true needs bits: 4 (got bits: {self.bits})")
        return self


class Lora(_Section):
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: tuple[str, ...] | Literal["all-linear"] = ("q_proj", "v_proj")
    # trained in full and saved with the adapter (peft `modules_to_save`); none of the sources did
    modules_to_save: tuple[str, ...] = ()


class Train(_Section):
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs (komt)
    per_device_batch: int = 4
    grad_accum: int = 1
    learning_rate: float = 2e-4
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = 0  # > 0 wins over warmup_ratio, as in transformers
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: Literal["adamw_torch", "paged_adamw_8bit", "adamw_8bit", "adafactor"] = "adamw_torch"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 42
    eval_steps: int = 0  # 0: no eval during training
    logging_steps: int = 10
    save_steps: int = 0  # checkpoint cadence; 0: none
    group_by_length: bool = False
    packing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _coherent(self) -> Train:
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")
        if self.per_device_batch < 1 or self.grad_accum < 1:
            raise ValueError("per_device_batch and grad_accum must be >= 1")
        return self


class Merge(_Section):
    base: Literal["original", "nf4-roundtrip"] = "original"
    # shardwise: one safetensors shard at a time (peak ~ one shard + the adapter); peft: the whole
    # model in memory and peft's merge_and_unload (needs ~2 bytes x params of RAM; for checking)
    method: Literal["shardwise", "peft"] = "shardwise"
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    parity_rows: int = 8
    max_rel_error: float = 0.02  # stage fails above this (merged vs base+adapter logits)
    license: str = ""  # model card `license:` (e.g. llama2, apache-2.0); empty -> "other"


# Per-GGUF-type gates of the quantize stage (next-token distributions of the GGUF vs the merged HF
# model on held-out rows). Kit choices, set a few times looser than what llama.cpp's own table
# reports for Llama-2-7B / Llama-3-8B on wikitext (tools/perplexity/README.md in the pinned
# llama.cpp: mean KLD q8_0 0.0004/0.0014, q6_K 0.002/0.005, q4_K_M 0.013/0.031; same top token
# 98.8/97.7 %, 97.5/96.0 %, 94.7/91.9 %; BF16 vs FP16 2.5e-5 and 99.7 %).
QuantType = Literal["f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]
GGUF_MAX_MEAN_KL: dict[str, float] = {"f16": 1e-3, "q8_0": 5e-3, "q6_k": 0.02, "q5_k_m": 0.03,
                                      "q4_k_m": 0.1, "q4_0": 0.15}
GGUF_MIN_TOP1: dict[str, float] = {"f16": 0.98, "q8_0": 0.95, "q6_k": 0.93, "q5_k_m": 0.91,
                                   "q4_k_m": 0.85, "q4_0": 0.82}


class Quantize(_Section):
    types: tuple[QuantType, ...] = ("f16", "q4_k_m")
    parity_rows: int = 8  # validation rows for the GGUF parity report (reports/NAME/gguf_parity.json)
    # Gates per type; a recipe lists only the types it changes, the others keep the kit defaults.
    max_mean_kl: dict[QuantType, float] = Field(default_factory=lambda: dict(GGUF_MAX_MEAN_KL))
    min_top1: dict[QuantType, float] = Field(default_factory=lambda: dict(GGUF_MIN_TOP1))
    stop: tuple[str, ...] = ()  # extra stop strings for the Ollama Modelfile (EOS is always one)

    @field_validator("max_mean_kl", "min_top1", mode="before")
    @classmethod
    def _with_defaults(cls, value: Any, info: Any) -> Any:
        defaults = GGUF_MAX_MEAN_KL if info.field_name == "max_mean_kl" else GGUF_MIN_TOP1
        return {**defaults, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _coherent(self) -> Quantize:
        if self.parity_rows < 1:
            raise ValueError("parity_rows must be >= 1")
        if any(v < 0 for v in self.max_mean_kl.values()) or any(not 0 <= v <= 1 for v in self.min_top1.values()):
            raise ValueError("max_mean_kl must be >= 0 and min_top1 within [0, 1]")
        return self


class EvalFile(_Section):
    """A file the evaluate stage reads from a source repository, pinned by commit and hash.

    Never copied into this repo: evaluate reads `../shared/data/<repo with "/" -> "-">/<path>`
    when present, else `https://raw.githubusercontent.com/<repo>/<commit>/<path>`, and checks
    `sha256` (and `git_blob`) either way.
    """

    repo: str  # owner/name
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    git_blob: str = Field(default="", pattern=r"^([0-9a-f]{40})?$")
    rows: int | None = None
    format: Literal["json", "jsonl", "txt"] = "jsonl"  # txt: one prompt per non-empty line
    # kit name (id, instruction, input, answer) -> key in each record; dotted for nesting
    # ("instances.0.input"). Unmapped kit names are absent from the file.
    fields: dict[str, str] = Field(default_factory=dict)


class PromptSet(_Section):
    """One evaluation prompt set, the way the source used it (or the kit chose it: origin kit)."""

    name: str
    prompts: EvalFile
    judge: Literal["none", "komt", "alpagasus"] = "none"
    # Pairwise judge (alpagasus): the recorded answers of the model compared against.
    baseline: EvalFile | None = None
    origin: Literal["source", "kit"] = "source"
    note: str = ""

    @model_validator(mode="after")
    def _coherent(self) -> PromptSet:
        if self.judge == "alpagasus" and self.baseline is None:
            raise ValueError("judge: alpagasus needs baseline answers")
        return self


class Benchmark(_Section):
    """One lm-evaluation-harness task (or group), run on the merged model through lm-eval's HF backend."""

    task: str  # lm-eval task or group name: arc_challenge, hellaswag, mmlu, truthfulqa_mc2, kobest, kmmlu, haerae
    name: str = ""  # key under `benchmarks.` in metrics.json; default: the task name
    num_fewshot: int | None = None  # None: the task's own default
    metric: str = "acc"  # lm-eval metric reported as the headline number (acc, acc_norm, ...)
    limit: int | None = None  # at most N documents per task (smoke runs); None: all
    origin: Literal["source", "kit"] = "source"
    cite: str = ""


class Eval(_Section):
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_prompts: int = 16  # held-out validation prompts to generate from
    prompt_sets: tuple[PromptSet, ...] = ()  # the source's evaluation inputs, by reference
    # LLM judge (OpenAI-compatible endpoint) for prompt sets with judge komt/alpagasus. The
    # environment variables QLORA_KIT_JUDGE_BASE_URL / QLORA_KIT_JUDGE_MODEL override these; the
    # API key is only ever read from QLORA_KIT_JUDGE_API_KEY (not needed for a 127.0.0.1 judge).
    judge_base_url: str = ""
    judge_model: str = ""
    prompt_set_limit: int = 0  # > 0: only the first N prompts of each set (smoke runs); 0: all
    # lm-evaluation-harness presets; they download their data sets from the Hub and take hours on
    # a 13B model, so they run only when run_benchmarks is true (`--set eval.run_benchmarks=true`)
    benchmarks: tuple[Benchmark, ...] = ()
    run_benchmarks: bool = False
    benchmark_tasks_dir: str = ""  # extra lm-eval task YAMLs, relative to the checkout ("" = none)
    # the source's own training curve (a transformers trainer_state.json), overlaid on ours
    reference_curve: EvalFile | None = None

    @model_validator(mode="after")
    def _coherent(self) -> Eval:
        if self.prompt_set_limit < 0:
            raise ValueError("prompt_set_limit must be >= 0")
        names = [b.name or b.task for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError("benchmarks: two entries share a name (set name: on one of them)")
        return self


class Expected(_Section):
    """Numbers the source reported, checked in the report with their tolerance."""

    metrics: dict[str, dict[str, Any]] = Field(default_factory=dict)


class Quirk(_Section):
    description: str
    cite: str
    fix: bool = False  # the switch: true applies `when_fixed`
    when_fixed: dict[str, Any] = Field(default_factory=dict)  # dotted key -> corrected value


class Recipe(_Section):
    name: str
    description: str = ""
    source: Source = Source()
    model: Model
    data: Data
    template: Template
    preprocess: Preprocess = Preprocess()
    qlora: QLoRA = QLoRA()
    lora: Lora = Lora()
    train: Train = Train()
    merge: Merge = Merge()
    quantize: Quantize = Quantize()
    eval: Eval = Eval()
    expected: Expected = Expected()
    quirks: dict[str, Quirk] = Field(default_factory=dict)

    def sections_for(self, stage: str) -> dict[str, Any]:
        """The resolved sections a stage reads (what goes into its manifest)."""
        return {s: getattr(self, s).model_dump(mode="json") if s != "quirks" else
                {k: q.model_dump(mode="json") for k, q in self.quirks.items()}
                for s in STAGE_SECTIONS[stage]}


# --- loading -------------------------------------------------------------------------------

def _key_lines(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Map every dotted key of a composed YAML document to its 1-based line number."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            out[key] = k.start_mark.line + 1
            _key_lines(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _key_lines(v, f"{prefix}.{i}", out)
    return out


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars/flow collections: 1e-4, true, [a, b], 'text'."""
    return yaml.safe_load(text) if text != "" else ""


def _set_dotted(d: dict, dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"{origin}: {dotted}: '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected section.key=value")
        key, val = item.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)+", key):
            raise RecipeError(f"--set {item}: key must be dotted, like train.learning_rate")
        try:
            out[key] = _parse_scalar(val)
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {item}: value is not valid YAML: {e}") from None
    return out


def recipes_dir() -> Path:
    return root() / "recipes"


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return recipes_dir() / f"{name_or_path}.yaml"


def load_recipe(name_or_path: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load, apply `--set` overrides, validate, then apply fixed quirks; raise RecipeError."""
    path = recipe_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml")))
        raise RecipeError(f"{path}: no such recipe (known: {known})") from None
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: line 1: a recipe is a mapping of sections")
    lines = _key_lines(node) if node is not None else {}
    if "quant" in raw:  # renamed so it cannot be mistaken for the GGUF export's `quantize:`
        raise RecipeError(f"{path}:{lines.get('quant', 1)}: quant: this section is now called qlora: (how the base "
                          "is loaded for training; quantize: is the GGUF export); rename it")
    raw = copy.deepcopy(raw)
    raw.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value, f"{path} (--set)")
    recipe = _validate(raw, path, lines, overrides or {})
    return _apply_quirks(recipe, path, lines)


def _validate(raw: dict, path: Path, lines: dict[str, int], overrides: dict[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = [str(x) for x in err["loc"] if not str(x).startswith("function-")]
            # pydantic appends union-member names to loc; keep the recipe's own keys only
            loc = [x for x in loc if x not in ("tuple[str, ...]", "literal['all-linear']")]
            key = ".".join(loc) or "(top level)"
            where = _where(key, lines, overrides)
            kind = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msgs.append(f"{path}:{where} {key}: {kind}")
        raise RecipeError("\n".join(dict.fromkeys(msgs))) from None


def _where(key: str, lines: dict[str, int], overrides: dict[str, Any]) -> str:
    if key in overrides:
        return " (--set)"
    probe = key
    while probe:
        if probe in lines:
            return f"{lines[probe]}:"
        probe = probe.rpartition(".")[0]
    return ""


def _apply_quirks(recipe: Recipe, path: Path, lines: dict[str, int]) -> Recipe:
    """Switch on a quirk's corrected behaviour: its `when_fixed` values replace the faithful ones."""
    if not any(q.fix for q in recipe.quirks.values()):
        return recipe
    raw = recipe.model_dump(mode="json")
    for name, q in recipe.quirks.items():
        if q.fix:
            for dotted, value in q.when_fixed.items():
                # an unknown dotted key fails validation below (extra="forbid")
                _set_dotted(raw, dotted, value, f"{path}: quirks.{name}.when_fixed")
    return _validate(raw, path, lines, {})
