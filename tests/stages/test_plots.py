"""The train stage's loss curve as a DVC plot (HTML) and as the PNG embedded in report.md.

Issue 4, done means 3. The CSV is written by the train stage's own logger callback
(`checkpoints.csv_logger`, fed the log events the Trainer sends), so the file has the real columns;
no training is run. `dvc plots show` then renders the plots dvc.yaml declares for the tiny recipe
(x: step, y: loss; x: step, y: eval_loss) in a temporary copy of the repository. Issue 13: the
evaluation rows are in their own file, so the training curve has no empty (zero) points, and the
logs rebuilt from the Trainer's log history match the live ones.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

from support.repo import copy_repo, kit_env
from qlora_kit.config import load_recipe
from qlora_kit.scoring import report as scoring_report
from qlora_kit.training import checkpoints

LOSSES = [7.0394, 6.3416, 5.1966, 4.6339, 4.2512, 3.9871]  # distinctive values to find in the output
EVAL = {5: 4.4021}


def _write_log(csv_path: Path) -> None:
    """Drive the stage's CsvLog callback the way the Trainer does: one on_log per logging step."""
    cb = checkpoints.csv_logger(csv_path)
    for step, loss in enumerate(LOSSES, start=1):
        state = SimpleNamespace(global_step=step, epoch=step / len(LOSSES), num_input_tokens_seen=step * 1000)
        cb.on_log(None, state, None, logs={"loss": loss, "learning_rate": 3e-3, "grad_norm": 1.5})
        if step in EVAL:
            cb.on_log(None, state, None, logs={"eval_loss": EVAL[step]})
        cb.on_log(None, state, None, logs={"train_runtime": 1.0})  # not a loss row: skipped
    cb.on_train_end()


def _layers(spec: dict):
    for layer in spec.get("layer", []):
        yield layer
        yield from _layers(layer)


def test_dvc_plots_show_renders_the_declared_loss_plot(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    csv_path = repo / "reports/tiny/train_log.csv"
    _write_log(csv_path)
    header, *rows = csv_path.read_text().splitlines()
    assert header.split(",")[:3] == ["step", "epoch", "loss"] and len(rows) == len(LOSSES)
    assert csv_path.with_name("eval_log.csv").read_text().splitlines()[1:] == ["5,0.8333,4.4021"]

    env = kit_env(repo)
    # --json: the rendered Vega-Lite spec with its data, to check what is plotted on which axis
    res = subprocess.run(["dvc", "plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    plots = json.loads(res.stdout)["data"]
    key = "reports/tiny/train_log.csv"
    assert key in plots, list(plots)
    spec = plots[key][0]["content"]
    # dvc's linear template draws the curve in layers (raw, smoothed, last point); every x is step, every y loss
    assert spec["encoding"]["x"]["field"] == "step"
    ys = {layer["encoding"]["y"]["field"] for layer in _layers(spec) if "y" in layer.get("encoding", {})}
    assert ys == {"loss"}
    assert spec["title"]["text"] == "tiny training loss"
    values = spec["data"]["values"]
    assert [(int(v["step"]), float(v["loss"])) for v in values] == list(enumerate(LOSSES, start=1))
    evals = plots["reports/tiny/eval_log.csv"][0]["content"]["data"]["values"]
    assert [(int(v["step"]), float(v["eval_loss"])) for v in evals] == list(EVAL.items())

    # the HTML page a user opens
    out = tmp_path / "plots"
    res = subprocess.run(["dvc", "plots", "show", "--out", str(out)], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    html = (out / "index.html").read_text()
    assert "tiny training loss" in html and "vega" in html.lower()
    for loss in LOSSES:
        assert str(loss) in html


def test_logs_rebuilt_from_the_history_match_the_live_ones(tmp_path):
    """A resumed run rewrites its logs from the Trainer's log history (which holds the steps
    before the checkpoint): the same rows the live logger wrote, throughput where measured."""
    live = tmp_path / "live" / "train_log.csv"
    _write_log(live)
    history = [{"step": s, "epoch": s / len(LOSSES), "loss": loss, "learning_rate": 3e-3, "grad_norm": 1.5,
                "num_input_tokens_seen": s * 1000} for s, loss in enumerate(LOSSES, start=1)]
    history.insert(5, {"step": 5, "epoch": 5 / len(LOSSES), "eval_loss": EVAL[5]})
    rebuilt = tmp_path / "rebuilt" / "train_log.csv"
    rows = checkpoints.write_logs(history, rebuilt, timing={})
    cut = lambda p: [",".join(line.split(",")[:6]) for line in p.read_text().splitlines()]  # noqa: E731
    assert cut(rebuilt) == cut(live) and len(rows) == len(LOSSES)
    assert (rebuilt.with_name("eval_log.csv").read_text().splitlines()
            == live.with_name("eval_log.csv").read_text().splitlines())
    assert checkpoints.mean_logged_loss(rows) == sum(LOSSES) / len(LOSSES)
    # logged every 2 steps: each value averages the steps since the previous log row
    assert checkpoints.mean_logged_loss([{"step": 1, "loss": 4.0}, {"step": 3, "loss": 1.0}]) == 2.0


def test_report_embeds_the_loss_png(tmp_path):
    csv_path = tmp_path / "train_log.csv"
    _write_log(csv_path)
    png = tmp_path / "loss_curve.png"
    assert scoring_report.plot_loss(csv_path, png, total_steps=len(LOSSES))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    again = tmp_path / "again.png"
    scoring_report.plot_loss(csv_path, again, total_steps=len(LOSSES))
    assert again.read_bytes() == data  # no timestamp in the PNG: same curve, same bytes
    assert not scoring_report.plot_loss(tmp_path / "missing.csv", tmp_path / "none.png")

    # the report's Training section links the PNG file the evaluate stage writes beside it
    m = {"val_loss_before": 7.0, "val_loss_after": 4.0, "val_ppl_before": 1096.6, "val_ppl_after": 54.6,
         "val_rows": 10, "eval_split": "val", "prompts": 1,
         "hf": {"eos_rate": 1.0, "exact_match": 0.0, "answer_tokens_mean": 5.0, "answer_tokens_max": 5},
         "gguf": {}}
    facts = {"derived": {"total_steps": len(LOSSES)}, "final": {"global_step": len(LOSSES), "train_loss": 5.0}}
    held = [{"instruction": "q", "input": "", "output": "a"}]
    report = scoring_report.render_report(load_recipe("tiny"), m, {}, facts, {"hf": [{"text": "a"}]}, held, png)
    assert "![loss curve](evaluate/loss_curve.png)" in report, report[:2000]
    assert "base64" not in report
