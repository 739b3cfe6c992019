"""Peak memory of the merge: shard-wise (the kit's default) vs peft's merge_and_unload.

    .venv/bin/python bench/merge_memory.py                 # TinyLlama-1.1B shape, fp16, ~2.2 GB
    .venv/bin/python bench/merge_memory.py --layers 8      # smaller, quicker
    .venv/bin/python bench/merge_memory.py --no-readme     # print the table only

Builds a Llama-shaped model with random fp16 weights in several safetensors shards (with an
index, as hub checkpoints come) and a random rank-8 LoRA adapter on q/k/v/o_proj, then merges it
twice, each merge in its own fresh subprocess so the figures do not mix:

- `shardwise`: `qlora_kit.lora_merge.merge_shardwise`, the code the merge stage runs by default;
- `peft`: `qlora_kit.lora_merge.merge_peft` (`merge.method: peft`): the whole model loaded, peft's
  `merge_and_unload()`, written in the base's sharding.

Both write fp16 (`merge.dtype: float16`) from the `original` base. Peak RSS is the child's own
high-water mark, `VmHWM` in /proc/self/status (resident pages at the worst moment, file-backed
mmap pages included), cross-checked by sampling the child's RSS with psutil every 20 ms; the
child's `ru_maxrss` is recorded too. (`ru_maxrss` starts at the RSS of the process that spawned
the child: Linux carries the old address space's high-water mark over exec. That is why the
model is built in a third process and this parent never imports torch.) `after_imports` is the
child's RSS once torch, transformers and peft are imported, before any weights are touched. The
result table is written into bench/README.md between the `merge_memory` markers (date, machine,
command, figures, ratio), the raw figures into bench/results/merge_memory.json. Not part of
`make test`: it writes ~3x the model size to disk and takes minutes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from qlora_kit.weights import lora_merge

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
BEGIN, END = "<!-- merge_memory:begin -->", "<!-- merge_memory:end -->"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


# --- the synthetic model and adapter ---------------------------------------------------------------

def build_base(out: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
               shard_mb: int, seed: int = 0) -> dict:
    """A LlamaForCausalLM checkpoint with random fp16 weights, written shard by shard."""
    from transformers import LlamaConfig

    from random_checkpoint import write_random_llama

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
                      max_position_embeddings=2048, dtype="float16")
    out.mkdir(parents=True)
    return write_random_llama(out, cfg, shard_mb, seed)


def build_adapter(out: Path, base: Path, r: int = 8, alpha: int = 16, seed: int = 1) -> None:
    """A PEFT LoRA adapter folder (rank r on q/k/v/o_proj of every layer) with random A and B."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"])
    dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}  # (out, in)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for p, (o, n) in dims.items():
            pre = f"base_model.model.model.layers.{i}.self_attn.{p}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(r, n, generator=gen) * 0.02
            tensors[f"{pre}.lora_B.weight"] = torch.randn(o, r, generator=gen) * 0.02
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0,
               task_type="CAUSAL_LM").save_pretrained(str(out))


# --- one merge, in a child process -------------------------------------------------------------------

def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(method: str, base: Path, adapter: Path, out: Path) -> None:
    import resource

    import peft  # noqa: F401  (both methods import it: the shard-wise one cross-checks with peft's layer)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from qlora_kit.config import load_recipe

    after_imports = vm_kib("VmRSS") / 1024
    recipe = load_recipe("tiny", {"merge.dtype": "float16", "merge.base": "original", "merge.method": method})
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    if method == "shardwise":
        lora_merge.merge_shardwise(recipe, base, lora_merge.read_adapter(adapter), out)
    else:
        lora_merge.merge_peft(recipe, base, adapter, out)
    seconds = time.perf_counter() - t0
    peak = vm_kib("VmHWM") / 1024
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"method": method, "peak_rss_mib": round(peak, 1), "ru_maxrss_mib": round(ru_maxrss, 1),
                      "after_imports_mib": round(after_imports, 1), "seconds": round(seconds, 1)}))


def measure(method: str, base: Path, adapter: Path, out: Path) -> dict:
    import psutil

    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", method, str(base), str(adapter), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    sampled = [0]

    def sample() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                sampled[0] = max(sampled[0], p.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{method} merge failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["sampled_peak_rss_mib"] = round(sampled[0] / 2**20, 1)
    return res


# --- report ------------------------------------------------------------------------------------------

def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def table(model: dict, shape: str, results: dict, command: str, load: tuple[float, float], embedding: str) -> str:
    s, p = results["shardwise"], results["peft"]
    ratio = s["peak_rss_mib"] / p["peak_rss_mib"]
    shard_mib = model["bytes"] / model["shards"] / 2**20
    lines = [
        f"Measured {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}; "
        "memory figures are exact; times are wall clock.",
        "",
        f"Command: `{command}`",
        "",
        f"Model: Llama-shaped, {shape}, {model['params'] / 1e9:.2f} B parameters, fp16, "
        f"{model['bytes'] / 2**30:.2f} GiB in {model['shards']} safetensors shards (~{shard_mib:.0f} MiB each) "
        "with an index; adapter: LoRA r=8, alpha=16 on q/k/v/o_proj of every layer, random A and B. "
        "Output: fp16, the base's sharding.",
        "",
        "| merge | peak RSS (VmHWM) | peak RSS (psutil, 20 ms samples) | ru_maxrss | RSS after imports | time |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (("shardwise", "shard-wise (`merge.method: shardwise`, default)"),
                        ("peft", "peft `merge_and_unload` (`merge.method: peft`)")):
        r = results[name]
        lines.append(f"| {label} | {r['peak_rss_mib'] / 1024:.2f} GiB | {r['sampled_peak_rss_mib'] / 1024:.2f} GiB | "
                     f"{r['ru_maxrss_mib'] / 1024:.2f} GiB | {r['after_imports_mib'] / 1024:.2f} GiB | "
                     f"{r['seconds']:.0f} s |")
    lines += ["", f"Ratio shard-wise / peft peak RSS: **{ratio:.2f}** (goal: at most 0.33). Above the import "
              f"floor: {s['peak_rss_mib'] - s['after_imports_mib']:.0f} MiB vs "
              f"{p['peak_rss_mib'] - p['after_imports_mib']:.0f} MiB "
              f"({(s['peak_rss_mib'] - s['after_imports_mib']) / shard_mib:.1f} vs "
              f"{(p['peak_rss_mib'] - p['after_imports_mib']) / shard_mib:.1f} shards): the shard-wise merge holds "
              f"about its largest tensor (the {embedding} fp16 embedding) at a time, peft the whole model. "
              "Both children import torch, transformers and peft (the merge stage cross-checks one LoRA delta "
              "per shard with peft's own layer), so the import floor is the same.", "",
              "Peak RSS is the child's VmHWM; `ru_maxrss` agrees here because the children are spawned by a "
              "parent that never imported torch (Linux carries the spawning process's RSS high-water mark "
              "into the child's `ru_maxrss`)."]
    return "\n".join(lines)


def write_readme(text: str) -> None:
    block = f"{BEGIN}\n{text}\n{END}"
    old = README.read_text(encoding="utf-8") if README.exists() else "# Benchmarks\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n## Merge memory (bench/merge_memory.py)\n\n" + block + "\n"
    README.write_text(new, encoding="utf-8")


def child_env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent / "src")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        child(argv[1], Path(argv[2]), Path(argv[3]), Path(argv[4]))
        return 0
    if argv[:1] == ["_build"]:  # in its own process, so the parent stays small (see the docstring)
        spec = json.loads(argv[2])
        model = build_base(Path(argv[1]) / "base", **spec)
        build_adapter(Path(argv[1]) / "adapter", Path(argv[1]) / "base")
        print(json.dumps(model))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # default: the shape of TinyLlama-1.1B (Llama-2 architecture, grouped-query attention)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=400, help="shard size of the synthetic base (MiB)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp folder, removed)")
    ap.add_argument("--no-readme", action="store_true", help="print the table, do not write bench/README.md")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qlora-kit-merge-bench-", dir=a.workdir))
    try:
        base, adapter = work / "base", work / "adapter"
        print(f"building the base in {base} ...", flush=True)
        spec = dict(layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, heads=a.heads,
                    kv_heads=a.kv_heads, vocab=a.vocab, shard_mb=a.shard_mb)
        built = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_build", str(work), json.dumps(spec)],
                               capture_output=True, text=True, env=child_env())
        if built.returncode != 0:
            raise SystemExit(f"building the model failed:\n{built.stderr[-3000:]}")
        model = json.loads(built.stdout.strip().splitlines()[-1])
        results = {}
        load_before = os.getloadavg()[0]
        for method in ("shardwise", "peft"):
            print(f"merging ({method}) ...", flush=True)
            results[method] = measure(method, base, adapter, work / f"merged-{method}")
            print(json.dumps(results[method]), flush=True)
            shutil.rmtree(work / f"merged-{method}")
        shape = (f"{a.layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, {a.heads} heads "
                 f"({a.kv_heads} KV), vocab {a.vocab}")
        command = ".venv/bin/python bench/merge_memory.py " + " ".join(argv)
        text = table(model, shape, results, command.strip(), (load_before, os.getloadavg()[0]),
                     f"{a.vocab} x {a.hidden}")
        print(text)
        if not a.no_readme:
            write_readme(text)
            results_dir = HERE / "results"
            results_dir.mkdir(exist_ok=True)
            (results_dir / "merge_memory.json").write_text(json.dumps(
                {"command": command.strip(), "machine": machine(), "model": {**model, "shape": shape},
                 "results": results, "ratio": results["shardwise"]["peak_rss_mib"] / results["peft"]["peak_rss_mib"],
                 "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}, indent=2) + "\n")
            print(f"written to {README} and {results_dir / 'merge_memory.json'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
