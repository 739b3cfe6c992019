"""Run every benchmark in bench/, one after another; each writes its own results.

    make bench                          # = .venv/bin/python bench/run_all.py
    .venv/bin/python bench/run_all.py --quick      # every script's smoke mode (minutes, not tens)
    .venv/bin/python bench/run_all.py --only train_throughput,gguf_export

In sequence, never in parallel: they measure time and memory, and on a small machine one would
slow the other. A script whose inputs are absent (../shared/data, the llama.cpp converter, a
CUDA device) says so and is counted as skipped, not failed. bench/gpu_smoke.py is not run here
(`make gpu-smoke` is its own target). Exit status: 1 if any script failed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name: (script, full-run args, quick args). merge_memory writes bench/README.md itself.
BENCHES = {
    "train_peers": ("train_peers.py", [], ["--quick"]),
    "preprocess_throughput": ("preprocess_throughput.py", [], ["--quick"]),
    "generation_throughput": ("generation_throughput.py", [], ["--quick"]),
    "gguf_export": ("gguf_export.py", ["--no-lazy"], ["--quick"]),
    "merge_memory": ("merge_memory.py", [], ["--layers", "2", "--no-readme"]),
    "gpu_throughput": ("gpu_throughput.py", [], ["--dry-run"]),
}


README = HERE / "README.md"


def write_readme_block(name: str, title: str, text: str) -> None:
    """Replace this benchmark's block in bench/README.md (between its own markers), or append it.

    Each script owns only its block; the rest of the file (other benchmarks' blocks, prose) is
    left byte for byte as it was.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = README.read_text(encoding="utf-8") if README.exists() else "# Benchmarks\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + f"\n\n## {title}\n\n" + block + "\n"
    README.write_text(new, encoding="utf-8")


def publish(name: str, title: str, result: dict, out: Path, text, readme: bool) -> None:
    """Write a benchmark's raw results to `out` and, when `readme`, its table (`text(result)`)
    into its block of bench/README.md."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}: wrote {out}")
    if readme:
        write_readme_block(name, title, text(result))
        print(f"{name}: table written into bench/README.md")


def machine_line(load_before: tuple, load_after: tuple) -> str:
    """Date-independent description of this machine for the result tables."""
    import os
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        mem = "?"
    gpu = "no GPU" if not cuda_visible() else "CUDA GPU"
    fmt = lambda la: " / ".join(f"{x:.1f}" for x in la)  # noqa: E731
    del load_before, load_after, fmt  # recorded in bench/results/*.json, not in the table text
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem} RAM, {gpu}"


def cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="each script's smoke mode")
    ap.add_argument("--only", default="", help="comma-separated names: " + ", ".join(BENCHES))
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        ap.error(f"unknown benchmarks {sorted(unknown)} (known: {', '.join(BENCHES)})")
    status: dict[str, str] = {}
    for name in names:
        script, full, quick = BENCHES[name]
        if not (HERE / script).is_file():
            status[name] = "skipped (script absent)"
            continue
        if name == "gpu_throughput" and not a.quick and not cuda_visible():
            status[name] = "skipped (no CUDA device; `--quick` runs its CPU dry run)"
            print(f"run_all: {name}: {status[name]}", flush=True)
            continue
        cmd = [sys.executable, str(HERE / script), *(quick if a.quick else full)]
        print(f"run_all: {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        status[name] = f"{'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f}s"
        print(f"run_all: {name}: {status[name]}", flush=True)
    print("run_all: " + "; ".join(f"{k}: {v}" for k, v in status.items()))
    return 1 if any(v.startswith("FAILED") for v in status.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
