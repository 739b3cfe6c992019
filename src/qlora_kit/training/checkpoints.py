"""Checkpoints of the train stage: the run key, which checkpoint is complete, the loss log."""
from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path
from qlora_kit.config import Recipe


CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing, or None.

    The Trainer writes a checkpoint file by file, trainer_state.json among the last; a SIGKILL
    in the middle leaves a folder that `get_last_checkpoint` would pick and `train()` then fails
    to resume from. Incomplete folders are removed so they cannot be picked later either.
    """
    import shutil

    if not Path(ckpt_dir).is_dir():
        return None
    found = sorted((int(p.name.split("-")[1]), p) for p in Path(ckpt_dir).glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, p in reversed(found):
        if all((p / f).is_file() for f in CHECKPOINT_FILES) and any(p.glob("rng_state*.pth")):
            return str(p)
        shutil.rmtree(p, ignore_errors=True)  # incomplete: written when the run was killed
    return None


def run_key(recipe: Recipe, data_hash: str, world: int) -> str:
    blob = json.dumps({"qlora": recipe.qlora.model_dump(mode="json"), "lora": recipe.lora.model_dump(mode="json"),
                       "train": recipe.train.model_dump(mode="json"), "data": data_hash, "world": world},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def csv_logger(path: Path):
    from transformers import TrainerCallback

    class CsvLog(TrainerCallback):
        fields = ["step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "elapsed_s"]

        def __init__(self):
            self.t0 = time.perf_counter()
            self.last_t, self.last_tokens = self.t0, 0
            path.parent.mkdir(parents=True, exist_ok=True)
            exists = path.exists() and path.stat().st_size > 0
            self.f = open(path, "a" if exists else "w", newline="")
            self.w = csv.DictWriter(self.f, fieldnames=self.fields)
            if not exists:
                self.w.writeheader()

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if not any(k in logs for k in ("loss", "eval_loss")):
                return
            now = time.perf_counter()
            seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            tps = (seen - self.last_tokens) / max(now - self.last_t, 1e-9) if "loss" in logs else ""
            if "loss" in logs:
                self.last_t, self.last_tokens = now, seen
            self.w.writerow({"step": state.global_step, "epoch": round(state.epoch or 0, 4),
                             "loss": logs.get("loss", ""), "eval_loss": logs.get("eval_loss", ""),
                             "learning_rate": logs.get("learning_rate", ""), "grad_norm": logs.get("grad_norm", ""),
                             "tokens_per_s": round(tps, 1) if tps != "" else "", "elapsed_s": round(now - self.t0, 2)})
            self.f.flush()

        def on_train_end(self, *a, **kw):
            self.f.close()

    return CsvLog()
