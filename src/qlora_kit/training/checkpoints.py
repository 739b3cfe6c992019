"""Checkpoints of the train stage: the run key, which checkpoint to resume, the loss logs.

A run resumes only when it is unfinished: a checkpoint at the run's last step means the run is
complete, and a rerun of a complete run (a forced `dvc repro`, or one after DVC removed the
adapter) trains again from scratch, so it measures every step itself.

The loss logs are rebuilt from the Trainer's log history when the run ends (a resumed run's
history includes the steps before the checkpoint), so the curve and the mean loss cover every
step: `reports/NAME/train_log.csv` has one row per logged training step, `eval_log.csv` one per
evaluation (separate files, so neither plot has rows with an empty loss).
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from qlora_kit.config import Recipe

TRAIN_FIELDS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_seen", "tokens_per_s", "elapsed_s"]
EVAL_FIELDS = ["step", "epoch", "eval_loss"]


CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing, or None.

    The Trainer writes a checkpoint file by file, trainer_state.json among the last; a SIGKILL
    in the middle leaves a folder that `get_last_checkpoint` would pick and `train()` then fails
    to resume from. Incomplete folders are removed so they cannot be picked later either.
    """
    if not Path(ckpt_dir).is_dir():
        return None
    found = sorted((int(p.name.split("-")[1]), p) for p in Path(ckpt_dir).glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, p in reversed(found):
        if all((p / f).is_file() for f in CHECKPOINT_FILES) and any(p.glob("rng_state*.pth")):
            return str(p)
        shutil.rmtree(p, ignore_errors=True)  # incomplete: written when the run was killed
    return None


def finished(checkpoint: str | Path) -> bool:
    """A checkpoint the Trainer saved at the run's last step (global_step == max_steps)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def resume_point(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """(checkpoint to resume, note): the newest complete checkpoint of an unfinished run, else None.

    A finished run's checkpoints are removed: resuming from its last step would train nothing and
    report no loss, so the rerun trains from scratch (same seed, same data: the same adapter)."""
    last = last_complete_checkpoint(ckpt_dir)
    if last is None or not finished(last):
        return last, None
    shutil.rmtree(ckpt_dir)
    return None, f"{Path(last).name} ends a finished run: trained again from scratch"


def run_key(recipe: Recipe, data_hash: str, world: int, threads: int) -> str:
    blob = json.dumps({"qlora": recipe.qlora.model_dump(mode="json"), "lora": recipe.lora.model_dump(mode="json"),
                       "train": recipe.train.model_dump(mode="json"), "data": data_hash, "world": world,
                       "threads": threads}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _writer(path: Path, fields: list[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = path.exists() and path.stat().st_size > 0
    f = open(path, "a" if exists else "w", newline="")
    w = csv.DictWriter(f, fieldnames=fields)
    if not exists:
        w.writeheader()
    return f, w


def csv_logger(path: Path, eval_path: Path | None = None):
    """The live logs while the run trains (a user can watch them), and each step's throughput,
    which `write_logs` keeps when it rewrites the files from the log history."""
    from transformers import TrainerCallback

    eval_path = eval_path or path.with_name("eval_log.csv")

    class CsvLog(TrainerCallback):
        def __init__(self):
            self.t0 = time.perf_counter()
            self.last_t, self.last_tokens = self.t0, 0
            self.timing: dict[int, dict[str, float]] = {}
            self.f, self.w = _writer(path, TRAIN_FIELDS)
            self.ef, self.ew = _writer(eval_path, EVAL_FIELDS)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
            if "eval_loss" in logs:
                self.ew.writerow({**row, "eval_loss": logs["eval_loss"]})
                self.ef.flush()
            if "loss" not in logs:
                return
            now = time.perf_counter()
            seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            timing = {"tokens_per_s": round((seen - self.last_tokens) / max(now - self.last_t, 1e-9), 1),
                      "elapsed_s": round(now - self.t0, 2)}
            self.last_t, self.last_tokens = now, seen
            self.timing[state.global_step] = timing
            self.w.writerow({**row, "loss": logs["loss"], "learning_rate": logs.get("learning_rate", ""),
                             "grad_norm": logs.get("grad_norm", ""), "tokens_seen": seen, **timing})
            self.f.flush()

        def on_train_end(self, *a, **kw):
            self.f.close()
            self.ef.close()

    return CsvLog()


def _clock(seconds: float) -> str:
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def progress_line(out=None):
    """One line per logged step instead of the Trainer's raw dicts: `train: step i/N (p %)  loss
    L  lr R  T tok/s  elapsed E  ETA S` (the ETA from this run's own pace, so a resumed run is not
    credited with the steps it skipped), and `train: step i/N  eval_loss L` for evaluations."""
    import sys
    import time

    from transformers import TrainerCallback

    class ProgressLine(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.step0 = time.perf_counter(), state.global_step
            self.tokens0 = int(getattr(state, "num_input_tokens_seen", 0) or 0)

        def on_log(self, args, state, control, logs=None, **kw):
            logs, n = logs or {}, state.max_steps
            at = f"train: step {state.global_step}/{n}"
            if "eval_loss" in logs:
                print(f"{at}  eval_loss {logs['eval_loss']:.4f}", file=out or sys.stdout, flush=True)
            if "loss" not in logs:
                return
            spent, done = time.perf_counter() - self.t0, state.global_step - self.step0
            seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            parts = [f"{at} ({100 * state.global_step // max(n, 1)} %)", f"loss {logs['loss']:.4f}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.3g}")
            if seen > self.tokens0 and spent > 0:
                parts.append(f"{(seen - self.tokens0) / spent:,.0f} tok/s")
            parts.append(f"elapsed {_clock(spent)}")
            if done > 0 and n > state.global_step:
                parts.append(f"ETA {_clock(spent / done * (n - state.global_step))}")
            print("  ".join(parts), file=out or sys.stdout, flush=True)

    return ProgressLine()


def log_last_step():
    """Log the last step too (logging_steps need not divide the run), so the logs cover every
    step. On every rank: logging gathers the loss across processes."""
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True

    return LogLastStep()


def log_rows(history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, evaluation rows) of a Trainer log history, in step order."""
    train, evals = [], []
    for h in history:
        row = {"step": h.get("step"), "epoch": round(h.get("epoch") or 0, 4)}
        if "loss" in h:
            train.append({**row, "loss": h["loss"], "learning_rate": h.get("learning_rate", ""),
                          "grad_norm": h.get("grad_norm", ""), "tokens_seen": h.get("num_input_tokens_seen", "")})
        if "eval_loss" in h:
            evals.append({**row, "eval_loss": h["eval_loss"]})
    return train, evals


def mean_logged_loss(train_rows: list[dict[str, Any]]) -> float | None:
    """Mean training loss over the logged steps, each logged value weighted by the steps it covers
    (a log row averages the steps since the previous one); None when no step was logged."""
    total, steps, prev = 0.0, 0, 0
    for r in train_rows:
        n = max(int(r["step"]) - prev, 1)
        total, steps, prev = total + float(r["loss"]) * n, steps + n, int(r["step"])
    return total / steps if steps else None


def write_logs(history: list[dict[str, Any]], path: Path, timing: dict[int, dict[str, float]],
               eval_path: Path | None = None) -> list[dict[str, Any]]:
    """Rewrite train_log.csv and eval_log.csv from the whole log history; return the training rows.
    Throughput is known only for the steps this process ran (blank for the resumed-over ones)."""
    from qlora_kit.artifacts import write_atomic

    train, evals = log_rows(history)
    for fields, rows, p in ((TRAIN_FIELDS, [{**r, **timing.get(r["step"], {})} for r in train], path),
                            (EVAL_FIELDS, evals, eval_path or path.with_name("eval_log.csv"))):
        lines = [",".join(fields)] + [",".join(str(r.get(k, "")) for k in fields) for r in rows]
        write_atomic(p, "\n".join(lines) + "\n")
    return train
