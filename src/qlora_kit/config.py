"""Strict recipe loader: `recipes/NAME.yaml` -> a frozen, typed `Recipe`.

Every stage reads its recipe through `load_recipe(name, overrides)` and then only the sections
named for it in `STAGE_SECTIONS`; `dvc.yaml` declares exactly those sections as the stage's params
(a test checks the two agree), so editing a value reruns exactly the stages that read it.

An unknown key, a wrong type, a value out of its range or an impossible combination raises
`RecipeError`, whose one-line message names the file, the line and the dotted key; the CLI turns
it into exit code 2 before any stage writes anything. The checks around the schema (safe YAML,
names, `--set`, which keys a quirk may set) live in `config_checks.py`.

    python -c "from qlora_kit.config import load_recipe; print(load_recipe('tiny'))"
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlora_kit import config_checks as checks
from qlora_kit.config_checks import RecipeError  # noqa: F401  (re-exported: stages import it from here)
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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Section):
    """What the recipe reproduces: the public repository and commit, and its files."""

    repo: str = ""
    commit: str = ""
    files: tuple[str, ...] = ()
    readme: str = ""  # the source's README this recipe follows
    notes: str = ""


class TinyModel(_Section):
    """Shape of a model the kit builds itself (no download)."""

    seed: int = Field(0, ge=0)
    hidden_size: int = Field(256, ge=1)  # multiple of 256 so llama.cpp K-quants apply to every row
    intermediate_size: int = Field(512, ge=1)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    vocab_size: int = Field(1000, ge=8)
    max_position_embeddings: int = Field(512, ge=2)


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
    skip_rows: int = Field(0, ge=0)  # drop the first N rows (e.g. the non-KoAlpaca head of a sample)
    limit: int | None = Field(None, ge=1)  # keep at most N rows after skip (tests, smoke runs)


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
    # "right_joined": rstrip the value together with the template text before it, as one string
    # (llama2-koalpaca strips "<<SYS>>...{instruction}" whole: an empty instruction loses the "\n\n")
    strip: dict[Literal["instruction", "input", "output"], Literal["both", "left", "right", "right_joined"]] = Field(
        default_factory=dict
    )
    # the tokenizer code the source ran (text/tokenizer.py): hub-fast | sentencepiece-slow | auto
    tokenizer: Literal["auto", "hub-fast", "sentencepiece-slow"] = "auto"
    add_bos: bool = True  # prepend the tokenizer's BOS id to the prompt ids (explicitly, never implied)
    special_tokens: dict[Literal["bos", "eos", "unk", "pad"], str] = Field(default_factory=dict)
    pad_token: Literal["eos", "unk", "tokenizer"] = "tokenizer"  # what pad is set to


class Preprocess(_Section):
    loss: Literal["completion", "full"] = "completion"
    tokenize: Literal["separate", "joint"] = "separate"
    max_length: int = Field(512, ge=2)
    overlength: Literal["truncate", "drop"] = "truncate"
    count_extra_bos: bool = False  # llama2-koalpaca counts length with one more BOS
    mask_pad_in_labels: bool = False  # collator masks every id == pad (so pad == eos masks EOS)
    val_ratio: float = Field(0.1, ge=0, lt=1)
    split_seed: int = Field(0, ge=0)
    filter_after_split: bool = False
    shuffle_seed: int | None = Field(None, ge=0)
    on_bad_row: Literal["error", "drop"] = "error"
    dedupe: bool = False
    # drop rows the kit finds unusable though readable (empty or whitespace-only instruction or
    # output, C0 control characters, no loss token left), counted by reason. false: keep them,
    # as the sources' code did
    clean_rows: bool = True


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
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: tuple[str, ...] | Literal["all-linear"] = ("q_proj", "v_proj")
    # trained in full and saved with the adapter (peft `modules_to_save`); none of the sources did
    modules_to_save: tuple[str, ...] = ()


class Train(_Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)  # > 0 overrides epochs (komt)
    per_device_batch: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)  # > 0 wins over warmup_ratio, as in transformers
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optimizer: Literal["adamw_torch", "paged_adamw_8bit", "adamw_8bit", "adafactor"] = "adamw_torch"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    seed: int = Field(42, ge=0)
    eval_steps: int = Field(0, ge=0)  # 0: no eval during training
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(0, ge=0)  # checkpoint cadence; 0: none
    group_by_length: bool = False
    packing: bool = False
    # attention over packed rows (packing: true only): per_example runs causal attention on each
    # example alone (cost: sum of the examples' squared lengths); block_mask is the model's sdpa
    # with a block-diagonal mask over the whole row (squared row length); flash_attention_2 is the
    # flash-attn varlen kernel (CUDA). auto: flash_attention_2 on CUDA when installed, else per_example
    packed_attention: Literal["auto", "per_example", "block_mask", "flash_attention_2"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"



class Merge(_Section):
    base: Literal["original", "nf4-roundtrip"] = "original"
    # shardwise: one safetensors shard at a time (peak ~ one shard + the adapter); peft: the whole
    # model in memory and peft's merge_and_unload (needs ~2 bytes x params of RAM; for checking)
    method: Literal["shardwise", "peft"] = "shardwise"
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    parity_rows: int = Field(8, ge=1)
    max_rel_error: float = Field(0.02, gt=0)  # stage fails above this (merged vs base+adapter logits)
    license: str = ""  # model card `license:` (e.g. llama2, apache-2.0); empty -> "other"
    # model cards' `language:` (ISO 639-1 codes of the training data's languages, e.g. [ko, en])
    language: tuple[str, ...] = ()


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
    parity_rows: int = Field(8, ge=1)  # validation rows for the GGUF parity report (reports/NAME/gguf_parity.json)
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

    Never copied into this repo: evaluate reads `$QLORA_KIT_SHARED_DATA/<repo with "/" -> "-">/<path>`
    (a local mirror) when present, else `https://raw.githubusercontent.com/<repo>/<commit>/<path>`, and checks
    `sha256` (and `git_blob`) either way.
    """

    repo: str  # owner/name
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    git_blob: str = Field(default="", pattern=r"^([0-9a-f]{40})?$")
    rows: int | None = Field(None, ge=0)
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
    num_fewshot: int | None = Field(None, ge=0)  # None: the task's own default
    metric: str = "acc"  # lm-eval metric reported as the headline number (acc, acc_norm, ...)
    limit: int | None = Field(None, ge=1)  # at most N documents per task (smoke runs); None: all
    origin: Literal["source", "kit"] = "source"
    cite: str = ""


class Eval(_Section):
    max_new_tokens: int = Field(32, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    num_prompts: int = Field(16, ge=0)  # held-out validation prompts to generate from
    # prompts generated together: HF, per model.generate call (left-padded, sorted by length); a
    # greedy recipe's GGUF, as parallel sequences of one llama.cpp context (its KV cache holds
    # this many answers); 1 = one at a time. Greedy output does not depend on it up to kernel
    # near-ties; sampled HF output does (the batch shares the RNG).
    generation_batch_size: int = Field(8, ge=1, le=256)
    prompt_sets: tuple[PromptSet, ...] = ()  # the source's evaluation inputs, by reference
    # LLM judge (OpenAI-compatible endpoint) for prompt sets with judge komt/alpagasus. The
    # environment variables QLORA_KIT_JUDGE_BASE_URL / QLORA_KIT_JUDGE_MODEL override these; the
    # API key is only ever read from QLORA_KIT_JUDGE_API_KEY (not needed for a 127.0.0.1 judge).
    judge_base_url: str = ""
    judge_model: str = ""
    prompt_set_limit: int = Field(0, ge=0)  # > 0: only the first N prompts of each set (smoke runs); 0: all
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


# --- loading (the checks themselves live in config_checks.py) -------------------------------

SECTION_KEYS = {name: set(f.annotation.model_fields) for name, f in Recipe.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    return checks.parse_overrides(items, SECTION_KEYS)


def recipes_dir() -> Path:
    return root() / "recipes"


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return recipes_dir() / f"{checks.check_name(name_or_path, '--recipe')}.yaml"


def load_recipe(name_or_path: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load, apply `--set` overrides, validate, then apply fixed quirks; raise RecipeError."""
    path, overrides = recipe_path(name_or_path), overrides or {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml")))
        raise RecipeError(f"{path}: no such recipe (known: {known})") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 (byte offset {e.start})") from None
    raw, lines = checks.load_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}:1: a recipe is a mapping of sections")
    if "quant" in raw:  # renamed so it cannot be mistaken for the GGUF export's `quantize:`
        raise RecipeError(f"{path}:{lines.get('quant', 1)}: quant: this section is now called qlora: (how the base "
                          "is loaded for training; quantize: is the GGUF export); rename it")
    checks.check_name(path.stem, str(path))
    raw.setdefault("name", path.stem)
    checks.check_name(raw["name"], f"{path}:{lines.get('name', 1)}: name")
    checks.apply_overrides(raw, overrides, path)
    recipe = checks.validate(Recipe, raw, path, lines, overrides)
    fixed = checks.quirk_values(recipe.model_dump(mode="json"), path, lines, overrides)
    if fixed:  # a switched-on quirk's `when_fixed` values replace the faithful ones
        dumped = recipe.model_dump(mode="json")
        for dotted, value in fixed.items():
            # an unknown dotted key fails validation below (extra="forbid")
            checks.set_dotted(dumped, dotted, value, f"{path}: quirks when_fixed")
        recipe = checks.validate(Recipe, dumped, path, lines, {})
    checks.warn_code_switches(recipe.model, str(path))
    return recipe
