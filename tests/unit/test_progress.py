"""What a stage prints while it works: train's one line per logged step (step i/N, loss, lr,
tokens/s, elapsed, ETA from this run's own pace) instead of the Trainer's raw dicts, and no
library message that asks the user to install something the kit does not need."""
from __future__ import annotations

import io
import logging
import time
import warnings
from types import SimpleNamespace

from qlora_kit.training.checkpoints import progress_line


def _run(monkeypatch, begin_step: int, logs: list[tuple[float, int, int, dict]]) -> list[str]:
    clock = {"t": 100.0}
    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])
    out = io.StringIO()
    cb = progress_line(out)
    cb.on_train_begin(None, SimpleNamespace(global_step=begin_step, num_input_tokens_seen=begin_step * 100), None)
    for t, step, seen, entry in logs:
        clock["t"] = 100.0 + t
        cb.on_log(None, SimpleNamespace(global_step=step, max_steps=300, num_input_tokens_seen=seen), None, logs=entry)
    return out.getvalue().splitlines()


def test_one_line_per_logged_step_with_eta(monkeypatch):
    lines = _run(monkeypatch, 0, [(10.0, 50, 5000, {"loss": 3.70123, "learning_rate": 0.0028, "epoch": 1.02}),
                                  (10.5, 50, 5000, {"eval_loss": 3.9391}),
                                  (75.0, 300, 30000, {"loss": 2.6, "learning_rate": 0.0})])
    assert lines == [
        "train: step 50/300 (16 %)  loss 3.7012  lr 0.0028  500 tok/s  elapsed 0:10  ETA 0:50",
        "train: step 50/300  eval_loss 3.9391",
        "train: step 300/300 (100 %)  loss 2.6000  lr 0  400 tok/s  elapsed 1:15",
    ]


def test_a_resumed_run_estimates_from_its_own_steps(monkeypatch):
    # resumed at step 200: 20 steps in 40 s -> 80 steps left take 160 s; tokens counted from the resume
    [line] = _run(monkeypatch, 200, [(40.0, 220, 20000 + 4000, {"loss": 3.0})])
    assert line == "train: step 220/300 (73 %)  loss 3.0000  100 tok/s  elapsed 0:40  ETA 2:40"


def test_cli_drops_the_kernels_install_hint_and_keeps_other_warnings(caplog):
    from qlora_kit import cli

    cli._quiet_library_noise()
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                    "already `pip install kernels`", "No module named 'kernels'")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        cli._quiet_library_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("another deprecation", FutureWarning)
    assert [str(w.message) for w in seen] == ["another deprecation"]


def test_evaluate_ends_with_a_three_line_headline(tmp_path):
    from qlora_kit.evaluate import headline_lines

    h = {"steps": 294, "loss": {"before": 7.024893, "after": 3.194288}, "eos": {"hf": 1.0, "gguf": 0.9375},
         "kl": {"q8_0": 1.6e-05, "f16": 0.0, "q4_k_m": 0.002107}}
    assert headline_lines(h, tmp_path) == [
        "validation loss 7.0249 -> 3.1943 (base -> merged) after 294 training steps",
        "answers ending with EOS: HF 100 %, lowest GGUF 94 %; GGUF vs HF mean KL f16 0.0000, q4_k_m 0.0021, "
        "q8_0 0.0000",
        f"report: {tmp_path / 'report.md'} (numbers: metrics.json, details.json)"]
    assert headline_lines({}, tmp_path)[:2] == ["validation loss: n/a", "answers ending with EOS: HF n/a, lowest GGUF n/a"]
