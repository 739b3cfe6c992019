"""GGUF export: wall time and peak memory of llama.cpp's convert + quantize on a >1 GB model.

    .venv/bin/python bench/gguf_export.py                  # TinyLlama-1.1B shape, fp16 (~2.2 GB), ~5 min
    .venv/bin/python bench/gguf_export.py --quick          # smoke: a tiny model, every step once

Builds a Llama-shaped checkpoint with random fp16 weights (the shape bench/merge_memory.py uses:
22 layers, hidden 2048, intermediate 5632, 32 heads / 4 KV heads, vocab 32000; sharded
safetensors with an index) and puts the kit's tiny sentencepiece tokenizer beside it
(`qlora_kit.tiny.model`; llama.cpp's converter pads the vocabulary up to the model's with
[PAD] tokens, as it does for any checkpoint whose tokenizer is smaller than its embedding).
Then runs, each step in its own fresh process, in the order the quantize stage runs them:

- `f16`: `convert_hf_to_gguf.py --outtype f16` (lazy, the default), through the kit's wrapper
  child (`python -m qlora_kit.gguf.converter _run`, exactly what `converter.convert` starts);
- `q8_0`, `q4_k_m`: `qlora_kit.quantize.quantize_file` from that f16 file (the binding's
  `llama_model_quantize`, the code behind `llama-quantize`);
- `q8_0_direct`: the alternative route to q8_0 that skips the f16 file: the converter's own
  pure-Python `--outtype q8_0`. Its time is compared with f16 convert + q8_0 quantize.
- with `--no-lazy`, also `f16_no_lazy`: the converter's `--no-lazy` (everything computed in RAM
  before writing), to show what the lazy default saves.

Peak memory per step: the sum of the RSS of the step's process and its children sampled every
20 ms with psutil (the headline figure), and `ru_maxrss` from `os.wait4` (the largest single
process; Linux also keeps the pre-exec high-water mark of the forked launcher, so this script
keeps its own process small, builds the checkpoint in a child, and records its RSS as
`launcher_rss_mib`: ru_maxrss below that figure cannot be read). The page cache is not dropped between
steps (that needs root): the first step reads the checkpoint cold or warm depending on what ran
before, which the table says. Results go to bench/results/gguf_export.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def build_checkpoint(out: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                     shard_mb: int = 400, seed: int = 0, tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """Random fp16 LlamaForCausalLM weights in safetensors shards + a kit-built Llama tokenizer
    (`tokenizer_dir`, a folder written by `qlora_kit.tiny_model.build`; built here when None).
    The model's vocabulary is max(vocab, the tokenizer's)."""
    from random_checkpoint import write_random_llama
    from transformers import LlamaConfig

    from qlora_kit.tiny.data import generate
    from qlora_kit.tiny.model import build, sample_texts

    tiny = Path(tokenizer_dir) if tokenizer_dir else out.parent / (out.name + "-tok")
    if tokenizer_dir is None:
        build("llama", tiny, sample_texts(generate(0)))  # tokenizer files only are used
    out.mkdir(parents=True)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny / f, out / f)
    tok_cfg = json.loads((tiny / "config.json").read_text())
    if tokenizer_dir is None:
        shutil.rmtree(tiny)
    vocab = max(vocab, tok_cfg["vocab_size"])
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
                      max_position_embeddings=2048, bos_token_id=tok_cfg["bos_token_id"],
                      eos_token_id=tok_cfg["eos_token_id"], dtype="float16")
    cfg.architectures = ["LlamaForCausalLM"]  # the converter picks its model class from this
    info = write_random_llama(out, cfg, shard_mb, seed)
    return {**info, "vocab": vocab, "tokenizer_vocab": tok_cfg["vocab_size"]}


def run_measured(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run cmd; wall time, ru_maxrss (from wait4) and the sampled RSS peak of its process tree."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    done = threading.Event()
    out: list[bytes] = []

    def drain():
        out.append(proc.stdout.read())  # type: ignore[union-attr]

    def sample():
        nonlocal peak
        try:
            p = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.02)

    threads = [threading.Thread(target=drain), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = b"".join(out).decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}):\n{text[-3000:]}")
    return {"wall_s": round(wall, 2), "ru_maxrss_mib": round(usage.ru_maxrss / 1024, 1),
            "sampled_tree_peak_mib": round(peak / 2**20, 1)}


def steps(model: Path, work: Path, no_lazy: bool) -> list[tuple[str, list[str], Path]]:
    from qlora_kit.gguf.converter import locate

    locate()  # a clear error now if the converter is not installed
    conv = [sys.executable, "-m", "qlora_kit.gguf.converter", "_run", "--report", str(work / "report.json"), "--",
            str(model), "--outfile"]
    quant = [sys.executable, "-c",
             "import sys; from pathlib import Path; from qlora_kit.quantize import quantize_file; "
             "quantize_file(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])"]
    f16 = work / "model-f16.gguf"
    out = [("f16", conv + [str(f16), "--outtype", "f16"], f16),
           ("q8_0", quant + [str(f16), str(work / "model-q8_0.gguf"), "q8_0"], work / "model-q8_0.gguf"),
           ("q4_k_m", quant + [str(f16), str(work / "model-q4_k_m.gguf"), "q4_k_m"], work / "model-q4_k_m.gguf"),
           ("q8_0_direct", conv + [str(work / "direct-q8_0.gguf"), "--outtype", "q8_0"], work / "direct-q8_0.gguf")]
    if no_lazy:
        out.append(("f16_no_lazy", conv + [str(work / "nolazy-f16.gguf"), "--outtype", "f16", "--no-lazy"],
                    work / "nolazy-f16.gguf"))
    return out


def readme_text(res: dict[str, Any]) -> str:
    sys.path.insert(0, str(HERE))
    from run_all import machine_line

    m, mo, c = res["machine"], res["model"], res["compare"]
    what = {"f16": "convert_hf_to_gguf.py --outtype f16 (lazy)", "q8_0": "llama_model_quantize f16 -> q8_0",
            "q4_k_m": "llama_model_quantize f16 -> q4_k_m",
            "q8_0_direct": "convert_hf_to_gguf.py --outtype q8_0 (pure Python)",
            "f16_no_lazy": "convert_hf_to_gguf.py --outtype f16 --no-lazy"}
    rows = ["| step | what runs | wall s | peak RSS MiB (sampled, process tree) | ru_maxrss MiB | output MiB |",
            "|---|---|---|---|---|---|"]
    for k, r in res["results"].items():
        rows.append(f"| `{k}` | {what[k]} | {r['wall_s']:.1f} | {r['sampled_tree_peak_mib']:.0f} | "
                    f"{r['ru_maxrss_mib']:.0f} | {r['file_mib']:.0f} |")
    notes = []
    if "all_three_types_wall_s" in c:
        notes.append(f"f16 + q8_0 + q4_k_m, the quantize stage's route: {c['all_three_types_wall_s']:.0f} s in all.")
    if "direct_over_via_f16_time" in c:
        notes.append(f"q8_0 straight from the converter took {c['q8_0_direct_wall_s']:.0f} s vs {c['q8_0_via_f16_wall_s']:.0f} s "
                     f"for f16 convert + C++ quantize ({c['direct_over_via_f16_time']:.2f}x the time).")
    if "no_lazy_over_lazy_peak_rss" in c:
        notes.append(f"--no-lazy peak RSS / lazy: {c['no_lazy_over_lazy_peak_rss']:.2f}x.")
    sh = mo["shape"]
    return "\n".join([
        f"Measured {res['date']} on {machine_line(tuple(m['load_avg_before']), tuple(m['load_avg_after']))}; "
        "one run per step (each minutes of I/O).",
        "",
        f"Command: `{res['command'].strip()}` (results: `bench/results/gguf_export.json`). Model: random fp16 "
        f"Llama, {sh['layers']} layers, hidden {sh['hidden']}, intermediate {sh['intermediate']}, {sh['heads']} heads / "
        f"{sh['kv_heads']} KV heads, vocab {mo['vocab']}: {mo['params'] / 1e9:.2f}B parameters, "
        f"{mo['bytes'] / 2**30:.2f} GiB in {mo['shards']} safetensors shards (the shape of bench/merge_memory.py). "
        "Each step is a fresh process; the page cache was not dropped between steps.",
        "",
        *rows,
        "",
        *notes,
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--no-lazy", action="store_true", help="also convert with --no-lazy (more RAM and disk)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp folder, removed)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gguf_export.json")
    ap.add_argument("--quick", action="store_true", help="smoke: 2 layers, hidden 256, every step once")
    ap.add_argument("--only", default="", help="comma-separated steps to run (f16 first if others need it)")
    ap.add_argument("--no-readme", action="store_true", help="do not write the table into bench/README.md")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a folder written by qlora_kit.tiny.model (its tokenizer is used; default: build one)")
    ap.add_argument("--build-only", nargs=7, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.build_only:
        out, *dims = a.build_only
        print(json.dumps(build_checkpoint(Path(out), *map(int, dims), tokenizer_dir=a.tokenizer)))
        return 0
    if a.quick:
        a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab = 2, 256, 512, 4, 4, 0

    from qlora_kit.gguf.converter import ConverterError, child_env, locate

    try:
        conv_dir = locate()
    except ConverterError as e:
        print(f"gguf_export: skipped: {e}")
        return 0
    import psutil

    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="qlora-kit-bench-gguf-", dir=a.workdir)
    try:
        work = Path(tmp)
        t0 = time.perf_counter()
        # built in a child so that this process stays small: a child's ru_maxrss starts from the
        # image of the process that forked it (Linux keeps the pre-exec high-water mark)
        shape = [str(x) for x in (a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab)]
        built = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build-only", str(work / "base"),
                                *shape, *(["--tokenizer", str(a.tokenizer)] if a.tokenizer else [])],
                               capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"building the checkpoint failed:\n{built.stderr[-3000:]}")
        model = json.loads(built.stdout.strip().splitlines()[-1])
        model["build_s"] = round(time.perf_counter() - t0, 1)
        model["launcher_rss_mib"] = round(psutil.Process().memory_info().rss / 2**20, 1)
        print("gguf_export: checkpoint " + json.dumps(model), flush=True)
        env = child_env(conv_dir)
        results: dict[str, Any] = {}
        for name, cmd, path in steps(work / "base", work, a.no_lazy):
            if a.only and name not in a.only.split(","):
                continue
            r = run_measured(cmd, env)
            r["file_mib"] = round(path.stat().st_size / 2**20, 1)
            results[name] = r
            print(f"gguf_export: {name}: " + json.dumps(r), flush=True)
            if name == "q8_0_direct":
                path.unlink()  # keep disk use bounded; only its size and time matter
        compare: dict[str, Any] = {}
        if {"f16", "q8_0", "q8_0_direct"} <= set(results):
            two_step = results["f16"]["wall_s"] + results["q8_0"]["wall_s"]
            compare.update(q8_0_via_f16_wall_s=round(two_step, 2), q8_0_direct_wall_s=results["q8_0_direct"]["wall_s"],
                           direct_over_via_f16_time=round(results["q8_0_direct"]["wall_s"] / two_step, 3))
        if {"f16", "q8_0", "q4_k_m"} <= set(results):
            compare["all_three_types_wall_s"] = round(sum(results[k]["wall_s"] for k in ("f16", "q8_0", "q4_k_m")), 2)
        if {"f16", "f16_no_lazy"} <= set(results):
            compare["no_lazy_over_lazy_peak_rss"] = round(
                results["f16_no_lazy"]["ru_maxrss_mib"] / results["f16"]["ru_maxrss_mib"], 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"benchmark": "gguf_export", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "command": "python bench/gguf_export.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
                       "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
           "converter": str(conv_dir), "model": model | {
               "shape": {"layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate, "heads": a.heads,
                         "kv_heads": a.kv_heads}},
           "results": results, "compare": compare}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print("gguf_export: " + json.dumps(compare))
    print(f"gguf_export: wrote {a.out}")
    if not (a.quick or a.no_readme or a.only):
        from run_all import write_readme_block

        write_readme_block("gguf_export", "GGUF export (bench/gguf_export.py)", readme_text(out))
        print("gguf_export: table written into bench/README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
