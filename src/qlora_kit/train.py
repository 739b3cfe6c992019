"""Train stage: (Q)LoRA on the processed set with transformers' Trainer + peft + bitsandbytes.

    qlora-kit train --recipe tiny          (dvc: train@tiny)

Reads `data/NAME/processed` and `models/NAME/base`; writes `models/NAME/adapter` (PEFT adapter +
manifest, the same bytes for the same inputs), `reports/NAME/train_log.csv` (one row per logged
step: loss, lr, grad norm, tokens/s) and `eval_log.csv` (one row per evaluation), two DVC plots,
and `reports/NAME/train_run.json` (timings, host, what was resumed). Checkpoints go to
`models/NAME/checkpoints/<run key>/` (kept by DVC via `persist`), keyed by a hash of everything
that shapes the run (the torch thread count included: QLORA_KIT_THREADS, default 1), so a rerun
after an interruption resumes, a changed config never resumes someone else's optimizer state,
and a finished run is never resumed: its rerun trains from scratch (training/checkpoints.py).

Before step 0 the stage logs and records the numbers it derived: effective batch, steps per
epoch, total steps, warmup steps, trainable parameters, tokens per step.

Batching: each micro-batch is right-padded to its own longest example (`Collator`), never to the
cutoff. `train.packing: true` makes it padding-free (`PaddingFreeCollator`): the same examples per
step, side by side in one row, kept apart by position_ids (checked on the model before step 0),
with attention computed per example (`train.packed_attention`, training/attention.py; the kernel
used is recorded as derived.packed_attention).
bench/train_throughput.py measures both against the sources' pad-to-cutoff batches.

Several processes (GPUs, or CPU processes with gloo):

    QLORA_KIT_GPUS=2 qlora-kit train --recipe tiny         (or: make train RECIPE=tiny GPUS=2)
    QLORA_KIT_ACCELERATE_CONFIG=recipes/accelerate/fsdp-qlora.yaml qlora-kit train --recipe komt
    torchrun --nproc_per_node=2 -m qlora_kit.cli train --recipe tiny   (multi-node: add rendezvous)

The first two re-launch this same command under torchrun / `accelerate launch`, so dvc.yaml's
command is the same with or without them. A recipe's `per_device_batch x grad_accum` is the
*global* batch whatever the world size: with W processes the stage divides grad_accum by W, else
per_device_batch by W, else stops (`rank_batch`), so a distributed run trains the same steps.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from qlora_kit.config import Recipe
from qlora_kit.training.attention import packed_collator, use_packed_attention
from qlora_kit.training.collate import Collator, check_padding_free
from qlora_kit.training.checkpoints import (csv_logger, log_last_step, mean_logged_loss, progress_line, resume_point,
                                            run_key, write_logs)
from qlora_kit.training.launch import relaunch, fsdp_enabled, rank_batch


def resolve_device(want: str) -> str:
    import torch

    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible")
    return want


def quantization_config(recipe: Recipe):
    """The BitsAndBytesConfig the recipe asks for (None for 16-bit LoRA)."""
    import torch
    from transformers import BitsAndBytesConfig

    q = recipe.qlora
    if q.bits == 16:
        return None
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype))


def load_base(recipe: Recipe, path: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kit.sources.model_safety import check

    check(path, recipe.model)  # no pickle weights, no model-shipped code unless the recipe opts in
    qc = quantization_config(recipe)
    kwargs: dict[str, Any] = dict(trust_remote_code=recipe.model.trust_remote_code,
                                  use_safetensors=not recipe.model.allow_pickle or None)
    if qc is not None and fsdp_enabled():
        # FSDP-QLoRA: FSDP flattens all parameters of a unit into one buffer of one dtype, so the
        # packed 4-bit weights are stored in the compute dtype; FSDP places the shards, so no device_map
        # (peft docs, "FSDP + QLoRA"). Untested here (no multi-GPU machine); DDP is tested on the CPU.
        if recipe.qlora.bits == 4:
            qc.bnb_4bit_quant_storage = getattr(torch, recipe.qlora.compute_dtype)
        kwargs.update(quantization_config=qc, dtype=getattr(torch, recipe.qlora.compute_dtype))
    elif qc is not None:
        # one full copy per process: rank r's copy on its own GPU (LOCAL_RANK), not all on GPU 0
        local = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs.update(quantization_config=qc, device_map={"": device if device == "cpu" else local},
                      dtype=getattr(torch, recipe.qlora.compute_dtype))
    else:
        kwargs.update(dtype=getattr(torch, recipe.model.dtype))
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if qc is None:
        model.to(device)
    model.config.use_cache = False
    if qc is not None and device == "cpu":
        keep_4bit_trainable_on_cpu(model)
    return model


def keep_4bit_trainable_on_cpu(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for inference on the first eval forward.

    bitsandbytes 0.50.2's Linear4bit.forward, on an AVX512-BF16 CPU in eval mode under no_grad,
    permanently converts its weight to a CPU inference layout whose kernel has no backward: after
    the first evaluation the gradient through the frozen base shrinks or vanishes (measured: grad
    norm 2.13 -> 0.66; exactly 0 with LoRA on q/v). Turning the fast path off keeps training exact.
    """
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def effective_precision(want: str, device: str) -> tuple[str, str | None]:
    """fp16 AMP needs CUDA; on the CPU the kit trains in fp32 and says so."""
    if device == "cpu" and want == "fp16":
        return "fp32", "fp16 AMP needs CUDA: trained in fp32 on the CPU"
    return want, None


def effective_optimizer(want: str, device: str) -> tuple[str, str | None]:
    if device == "cpu" and want in ("paged_adamw_8bit", "adamw_8bit"):
        return "adamw_torch", f"{want} needs CUDA: used adamw_torch on the CPU"
    return want, None


def derived_numbers(n_train: int, recipe: Recipe, world: int, mean_tokens: float) -> dict[str, Any]:
    """What the Trainer will do, computed up front (transformers 5 Trainer semantics).

    Each process's dataloader has ceil(n / (micro-batch x world)) micro-batches (accelerate's
    even_batches pads the last round with examples from the start), and transformers 5 counts
    a trailing partial accumulation as an optimizer step: steps per epoch =
    ceil(micro-batches / grad_accum) (Trainer.set_initial_training_values). transformers 4.x
    floored it (and carried the remainder's gradient into the next epoch), which is why a source
    trained on 4.x can report a few steps fewer; tests/test_derived_numbers.py checks both.
    """
    t = recipe.train
    pdb, ga = rank_batch(t.per_device_batch, t.grad_accum, world)
    micro_batches = math.ceil(n_train / (pdb * world))
    steps_per_epoch = max(math.ceil(micro_batches / ga), 1)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    if t.warmup_steps > 0:
        warmup = t.warmup_steps
    else:  # TrainingArguments.get_warmup_steps: ceil(total x ratio) for a ratio
        warmup = math.ceil(total * t.warmup_ratio)
    eff = pdb * ga * world
    return {"train_rows": n_train, "world_size": world, "effective_batch": eff,
            "per_device_batch_used": pdb, "grad_accum_used": ga,
            "steps_per_epoch": steps_per_epoch, "total_steps": total, "warmup_steps": warmup,
            "epochs_effective": round(total / steps_per_epoch, 4),
            "tokens_per_step_mean": round(eff * mean_tokens, 1)}


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    lo = recipe.lora
    targets = lo.target_modules if lo.target_modules == "all-linear" else list(lo.target_modules)
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, bias=lo.bias,
                      target_modules=targets, modules_to_save=list(lo.modules_to_save) or None,
                      task_type="CAUSAL_LM")


def distributed_facts(t, world: int) -> dict[str, Any]:
    per_device, grad_accum = rank_batch(t.per_device_batch, t.grad_accum, world)  # before any loading
    return {"world_size": world, "fsdp": fsdp_enabled(),
            "deepspeed": os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true",
            "per_device_batch": per_device, "grad_accum": grad_accum,
            "global_batch": per_device * grad_accum * world,
            "rule": "recipe per_device_batch x grad_accum is the global batch; "
                    "grad_accum (else per_device_batch) divided by the world size"}


def read_rows(processed: Path) -> tuple[list[dict], list[dict], str]:
    """(train rows, val rows, sha256 of the processed folder's file hashes)."""
    from qlora_kit.artifacts import hash_tree
    from qlora_kit.text.examples import read_split

    train_rows, val_rows = ([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_split(processed, s)]
                            for s in ("train", "val"))
    data_hash = hashlib.sha256(json.dumps(hash_tree(processed), sort_keys=True).encode()).hexdigest()
    return train_rows, val_rows, data_hash


def peft_model(recipe: Recipe, base: Path, device: str):
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_base(recipe, base, device)
    if recipe.qlora.bits in (4, 8):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    elif recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(recipe))


def training_args(recipe: Recipe, ckpt_dir: Path, derived: dict[str, Any], dist: dict[str, Any], has_val: bool):
    from transformers import TrainingArguments

    t, device, precision, world = recipe.train, derived["device"], derived["precision"], dist["world_size"]
    return TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=dist["per_device_batch"],
        per_device_eval_batch_size=dist["per_device_batch"], gradient_accumulation_steps=dist["grad_accum"],
        num_train_epochs=t.epochs, max_steps=t.max_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler, warmup_steps=derived["warmup_steps"], weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=derived["optimizer"], fp16=precision == "fp16",
        bf16=precision == "bf16", seed=t.seed, data_seed=t.seed, logging_steps=t.logging_steps,
        logging_first_step=True, eval_strategy="steps" if (t.eval_steps > 0 and has_val) else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        save_strategy="steps" if t.save_steps > 0 else "no", save_steps=t.save_steps or 500,
        report_to="none", use_cpu=device == "cpu", dataloader_num_workers=0, remove_unused_columns=False,
        # a padding-free row has no pad and no attention mask: every token counts
        include_num_input_tokens_seen="all" if t.packing else "non_padding",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        ddp_find_unused_parameters=False if world > 1 else None, disable_tqdm=True,
        # the Trainer would pick nccl from the device it cannot find on a CPU; gloo is torch's CPU backend
        ddp_backend="gloo" if (device == "cpu" and world > 1) else None,
    )


def normalize_adapter(folder: Path, base: Path, model_name: str) -> None:
    """Same run, same bytes. peft writes `target_modules` in set order ("all-linear" resolves to a
    set), which changes from process to process: sorted, with sorted keys. It also names the base
    by this checkout's folder in adapter_config.json: named by the recipe's model instead (peft's
    README.md is replaced by the kit's card, weights/model_card.adapter_card).
    (Set before training, the name would send peft to the Hub for a config at each checkpoint.)"""
    from qlora_kit.artifacts import write_atomic

    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    if cfg.get("base_model_name_or_path") == str(base):
        cfg["base_model_name_or_path"] = model_name
    write_atomic(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_adapter(trainer, model, ckpt_dir: Path, paths, rank: int, st) -> None:
    """Write models/NAME/adapter (rank 0): the PEFT adapter, normalized, and its manifest."""
    import shutil

    from qlora_kit.artifacts import atomic_dir, hash_tree, write_json

    sharded = fsdp_enabled() or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    staged = ckpt_dir / "final-adapter"
    if sharded:
        # FSDP / ZeRO-3 hold only a shard of each weight per rank: every rank joins the gather in
        # Trainer.save_model, which writes the full adapter on rank 0 (untested here: needs GPUs)
        if fsdp_enabled():
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(staged))
    if rank != 0:
        return
    with atomic_dir(paths.adapter) as tmp:
        if sharded:
            for f in staged.iterdir():
                if f.is_file() and f.name != "training_args.bin":
                    shutil.copy2(f, tmp / f.name)
            shutil.rmtree(staged)
        else:  # DDP / one process: rank 0's model holds the whole (replicated) adapter
            model.save_pretrained(str(tmp))
        normalize_adapter(tmp, paths.base, st.recipe.model.name)
        from qlora_kit.weights.model_card import adapter_card

        # peft's README is a template of "[More Information Needed]" lines: the kit's card instead
        lora = json.loads((tmp / "adapter_config.json").read_text(encoding="utf-8"))
        (tmp / "README.md").write_text(adapter_card(st.recipe, lora, st.facts), encoding="utf-8")
        st.facts["files"] = hash_tree(tmp, full=True)  # merge checks the adapter against these before reading it
        write_json(tmp / "manifest.json", st.manifest())


def describe_run(recipe: Recipe, model, train_rows: list[dict], world: int,
                 device: str) -> tuple[dict[str, Any], list[str]]:
    """derived_numbers plus the model's parameter counts and the precision/optimizer used."""
    t = recipe.train
    precision, prec_note = effective_precision(t.precision, device)
    optim, optim_note = effective_optimizer(t.optimizer, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    mean_tokens = sum(len(r["input_ids"]) for r in train_rows) / max(len(train_rows), 1)
    derived = derived_numbers(len(train_rows), recipe, world, mean_tokens)
    derived.update(trainable_params=trainable, total_params=total_params,
                   trainable_pct=round(100 * trainable / total_params, 4), device=device,
                   precision=precision, optimizer=optim)
    return derived, [n for n in (prec_note, optim_note) if n]


def live_logger(log_csv: Path):
    """The live logs start empty; the complete ones are rebuilt from the log history at the end."""
    for f in (log_csv, log_csv.with_name("eval_log.csv")):
        f.unlink(missing_ok=True)
    return csv_logger(log_csv)


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    # QLORA_KIT_GPUS=N (N > 1) / QLORA_KIT_ACCELERATE_CONFIG: re-run this command under a launcher,
    # unless this process is already one of a launched group (RANK is set by torchrun/accelerate)
    nproc = int(os.environ.get("QLORA_KIT_GPUS") or "1")
    accel_cfg = os.environ.get("QLORA_KIT_ACCELERATE_CONFIG") or None
    if (nproc > 1 or accel_cfg) and "RANK" not in os.environ:
        return relaunch(recipe, overrides, nproc, accel_cfg)

    import torch
    from transformers import Trainer, set_seed

    from qlora_kit import layout
    from qlora_kit.artifacts import StageRun
    from qlora_kit.text.tokenizer import load_tokenizer

    paths, st, t = layout.paths(recipe.name), StageRun("train", recipe, overrides), recipe.train
    threads = st.use_threads()
    device = resolve_device(t.device)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    st.facts["distributed"] = dist = distributed_facts(t, world)
    set_seed(t.seed)
    tok = load_tokenizer(paths.base, recipe.template, trust_remote_code=recipe.model.trust_remote_code)
    train_rows, val_rows, data_hash = read_rows(paths.processed)
    st.add_input("processed", paths.processed)
    st.add_input("base", paths.base)
    model = peft_model(recipe, paths.base, device)
    derived, fallbacks = describe_run(recipe, model, train_rows, world, device)
    st.facts.update(derived=derived, fallbacks=fallbacks)
    collator = Collator(tok.pad_id)
    if t.packing:  # packed logits == separate logits, checked on this model before step 0
        derived["packed_attention"] = use_packed_attention(model, device, t.packed_attention, fallbacks)
        collator = packed_collator(derived["packed_attention"])
        derived["padding_free_check_rel_diff"] = check_padding_free(model, train_rows, collator=collator)
    key = run_key(recipe, data_hash, world, threads)
    ckpt_dir = paths.checkpoints / key
    paths.checkpoints.mkdir(parents=True, exist_ok=True)  # a DVC out (persist) even with no checkpoints
    last, note = resume_point(ckpt_dir)
    if rank == 0:
        print("train: derived before step 0: " + json.dumps(derived), flush=True)
        for line in [f"fallback: {f}" for f in fallbacks] + ([note] if note else []):
            print(f"train: {line}", flush=True)
    log_csv = paths.reports / "train_log.csv"
    logger = live_logger(log_csv) if rank == 0 else None
    trainer = Trainer(model=model, args=training_args(recipe, ckpt_dir, derived, dist, bool(val_rows)),
                      train_dataset=train_rows, eval_dataset=val_rows or None,
                      data_collator=collator,
                      callbacks=[log_last_step()] + ([logger, progress_line()] if logger else []))
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its raw dicts: progress_line says the same in one line
    st.lap("load")
    trainer.train(resume_from_checkpoint=last)
    st.lap("train")
    logged = write_logs(trainer.state.log_history, log_csv, logger.timing) if rank == 0 else []
    st.facts.update(run_key=key, final={"global_step": trainer.state.global_step,
                                        "train_loss": mean_logged_loss(logged),
                                        "logged_steps": len(logged), "max_steps_actual": trainer.state.max_steps})
    st.volatile.update(resumed_from=Path(last).name if last else None, note=note)
    save_adapter(trainer, model, ckpt_dir, paths, rank, st)
    if rank == 0:
        st.write_run_report(paths.reports)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank exits (and no launcher reports success) before the adapter exists
    return st.facts
