"""`make gpu-smoke` cannot rot: its script runs the same path on the CPU here (2 steps each)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from support.repo import REPO


@pytest.mark.slow
def test_gpu_smoke_script_runs_on_cpu_in_dry_mode():
    res = subprocess.run([sys.executable, str(REPO / "bench/gpu_smoke.py"), "--allow-cpu", "--steps", "2"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("gpu-smoke: ")]
    assert '"bits": 4' in "\n".join(lines) and '"bits": 8' in "\n".join(lines) and lines[-1] == "gpu-smoke: ok"


def test_gpu_smoke_refuses_without_cuda_unless_asked():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    res = subprocess.run([sys.executable, str(REPO / "bench/gpu_smoke.py")], capture_output=True, text=True)
    assert res.returncode == 1 and "no CUDA device" in res.stderr


@pytest.mark.gpu
def test_gpu_smoke_trains_on_cuda_in_4_and_8_bit():
    """On a CUDA machine `make test` runs the real thing: both precisions on the device."""
    res = subprocess.run([sys.executable, str(REPO / "bench/gpu_smoke.py"), "--steps", "4"],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("gpu-smoke: ")]
    text = "\n".join(lines)
    assert '"device": "cpu"' not in text and '"bits": 4' in text and '"bits": 8' in text, lines
    assert lines[-1] == "gpu-smoke: ok"
