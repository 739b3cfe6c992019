"""GPU smoke: the tiny recipe's train stage on CUDA in 4-bit NF4 and 8-bit, with timings.

    make gpu-smoke            # or: python bench/gpu_smoke.py [--steps 30] [--allow-cpu]

Works in the Docker image and on any NVIDIA machine with the lock installed. Prints the device,
the versions that matter (torch/CUDA, bitsandbytes, transformers, peft) and, per precision, the
seconds to load, the seconds per optimizer step and peak GPU memory. Runs in a temporary output
root, so it never touches the checkout's data/ or models/. `--allow-cpu` runs the same path on
the CPU (what the test suite does, so the script cannot rot).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--allow-cpu", action="store_true")
    a = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.allow_cpu:
        print("gpu-smoke: no CUDA device visible (torch.cuda.is_available() is False); "
              "run on an NVIDIA machine, or pass --allow-cpu to exercise the path on the CPU", file=sys.stderr)
        return 1
    device = "cuda" if cuda else "cpu"
    from importlib.metadata import version

    info = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "bitsandbytes": version("bitsandbytes"),
            "transformers": version("transformers"), "peft": version("peft")}
    print("gpu-smoke: " + json.dumps(info))
    with tempfile.TemporaryDirectory(prefix="qlora-kit-gpu-smoke-") as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "recipes", root / "recipes")
        os.environ["QLORA_KIT_ROOT"] = str(root)
        from qlora_kit import fetch, preprocess, train
        from qlora_kit.config import load_recipe

        base = {"train.device": device, "train.max_steps": a.steps, "train.save_steps": 0,
                "train.eval_steps": 0, "train.logging_steps": max(a.steps // 3, 1)}
        r = load_recipe("tiny", base)
        fetch.run(r)
        preprocess.run(r)
        results = []
        for bits in (4, 8):
            rb = load_recipe("tiny", {**base, "qlora.bits": bits, "qlora.double_quant": bits == 4,
                                      "qlora.compute_dtype": "bfloat16" if cuda else "float32"})
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            facts = train.run(rb)
            wall = time.perf_counter() - t0
            row = {"bits": bits, "steps": facts["final"]["global_step"], "train_loss": round(facts["final"]["train_loss"], 4),
                   "wall_s": round(wall, 2), "s_per_step": round(wall / max(facts["final"]["global_step"], 1), 4),
                   "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                   "fallbacks": facts["fallbacks"]}
            print("gpu-smoke: " + json.dumps(row))
            results.append(row)
    ok = all(r["steps"] == a.steps for r in results)
    print("gpu-smoke: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
