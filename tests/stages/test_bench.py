"""bench/: every benchmark script runs in its smallest mode (so none can rot), the FLOP
accounting the GPU script reports, and `train.packing` (the padding-free batching the
throughput benchmarks measure): packed examples must not see each other.

The script runs need ../shared/data (real Alpaca rows) or the llama.cpp converter and skip
without them; the packing tests need neither.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support.repo import REPO, SHARED_DATA

BENCH = REPO / "bench"
CLAUDE = SHARED_DATA / "gpt4life-alpagasus" / "data" / "filtered" / "claude_t45.json"
needs_claude = pytest.mark.skipif(not CLAUDE.is_file(), reason=f"{CLAUDE} is absent")


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO, env={**__import__("os").environ, "TOKENIZERS_PARALLELISM": "false"})
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


# --- the scripts, smallest modes -------------------------------------------------------------------

def test_gpu_throughput_dry_run(tmp_path):
    """The GPU script end to end on the CPU: tiny shape, one step per variant, same examples."""
    out = tmp_path / "gpu.json"
    # two of the four variants: pad-to-cutoff with accumulation, and padding-free with a bigger micro-batch
    run_script("gpu_throughput.py", "--dry-run", "--variants", "source,kit_padding_free_mb16", "--out", str(out),
               "--workdir", str(tmp_path / "work"))
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["device"].startswith("cpu")
    summary = res["results"]["128"]["summary"]
    assert summary["same_examples_per_step"] is True
    for v in ("source", "kit_padding_free_mb16"):
        assert summary[v]["real_tok_per_s"] > 0, v
    assert summary["kit_padding_free_mb16"]["padding_fraction"] == 0
    assert summary["source"]["padding_fraction"] > 0
    runs = {r["variant"]: r for r in res["results"]["128"]["runs"]}
    assert runs["source"]["positions"] == 16 * 128  # 4 micro-batches of 4, each padded to the cutoff
    assert (runs["source"]["micro_batch"], runs["source"]["grad_accum"]) == (4, 4)
    assert (runs["kit_padding_free_mb16"]["micro_batch"], runs["kit_padding_free_mb16"]["grad_accum"]) == (16, 1)
    assert runs["kit_padding_free_mb16"]["real_tokens"] == runs["source"]["real_tokens"]
    assert runs["kit_padding_free_mb16"]["model_flops_per_s"] > 0


def test_flops_per_token_formula():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_throughput as g
    finally:
        sys.path.remove(str(BENCH))
    cfg = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000}
    n = g.matmul_params(cfg)
    assert n == 6_607_077_376  # Llama-2-7B's 6.738e9 parameters less the 131e6 of the input embedding
    f = g.flops(cfg, tokens=1000, sum_sq=0, checkpointing=True)
    assert f["model"] == 4 * n * 1000 and f["hardware"] == 6 * n * 1000 and f["six_n"] == 6 * n * 1000
    f = g.flops(cfg, tokens=10, sum_sq=100, checkpointing=False)  # one sequence of 10 tokens
    assert f["model"] == 4 * n * 10 + 12 * 32 * 4096 * 100 == f["hardware"]
    assert g.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.4 and g.peak_tflops("Tesla T4", None) is None


@needs_claude
def test_train_throughput_quick(tmp_path, tiny_llama):
    out = tmp_path / "train.json"
    run_script("train_throughput.py", "--quick", "--model", str(tiny_llama), "--limit", "48",
               "--variants", "source_pad_to_cutoff,kit_padding_free,kit_grouped", "--out", str(out))
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["same_examples_per_step"] is True and s["grouped_steps_differ"] is True
    assert s["kit_padding_free"]["padding_fraction"] == 0
    runs = {r["variant"]: r for r in res["runs"]}
    cutoff, batch = res["setup"]["cutoff"], res["setup"]["batch"]
    assert runs["source_pad_to_cutoff"]["positions"] == 2 * batch * cutoff  # 2 timed steps, all at the cutoff
    # the same examples, so the same loss-bearing tokens, whatever the batching
    assert runs["source_pad_to_cutoff"]["supervised_tokens"] == runs["kit_padding_free"]["supervised_tokens"]
    assert runs["kit_padding_free"]["positions"] == runs["kit_padding_free"]["real_tokens"]
    assert all(r["supervised_tok_per_s"] > 0 and r["supervised_tok_per_cpu_s"] > 0 for r in res["runs"])


@needs_claude
def test_train_peers_quick(tmp_path):
    out = tmp_path / "peers.json"
    run_script("train_peers.py", "--quick", "--workdir", str(tmp_path / "work"), "--out", str(out))
    res = json.loads(out.read_text())
    (p,) = res["points"]
    s = p["summary"]
    assert set(s) >= {"sources_dynamic", "hf_seq2seq", "trl_padding_free", "kit"}
    # every peer trained the same examples in every step (fingerprinted in the forward pass)
    assert s["same_examples_per_step"] is True
    assert s["kit"]["packed_attention"] == "per_example" and s["kit"]["padding_fraction"] == 0
    runs = {r["variant"]: r for r in p["runs"]}
    # the same loss-bearing tokens whatever the batching, and the same per-step losses (fp32)
    assert len({r["supervised_tokens"] for r in runs.values()}) == 1
    assert s["max_loss_diff_vs_sources_dynamic"]["kit"] < 1e-4
    assert s["max_loss_diff_vs_sources_dynamic"]["hf_seq2seq"] < 1e-4
    assert s["kit_over_best_peer"] == round(s["kit"]["median"] / s[s["best_peer"]]["median"], 3)


@needs_claude
def test_preprocess_throughput_quick(tmp_path, tiny_llama):
    out = tmp_path / "pre.json"
    run_script("preprocess_throughput.py", "--quick", "--limit", "100", "--tokenizer", str(tiny_llama),
               "--out", str(out))
    r = json.loads(out.read_text())["results"]["claude_t45"]
    assert r["rows"] == 100 and 0 < r["kept"] <= 100
    assert r["cold_rows_per_s"] > 0 and r["kit_warm_rows_per_cpu_s"] > 0
    # the source's own pipeline (alpagasus2: datasets + trl's batched tokenize) ran on the same rows
    assert r["source_pipeline_rows_per_cpu_s"] > 0 and r["bare_batched_rows_per_cpu_s"] > 0
    assert r["kit_over_source"] == round(r["kit_warm_rows_per_cpu_s"] / r["source_pipeline_rows_per_cpu_s"], 2)
    run = r["runs"][0]
    assert run["tokens_batched"] > 0 and set(run["cpu_s"]) == {"kit_warm", "source_pipeline", "bare_batched_tokenize"}
    assert r["median_cold_wall_s"] >= run["since_interpreter_start_s"] > run["phases_s"]["imports"]


def test_gguf_export_quick(tmp_path, tiny_llama):
    from qlora_kit.gguf.converter import ConverterError, locate

    try:
        locate()
    except ConverterError as e:
        pytest.skip(str(e))
    out = tmp_path / "gguf.json"
    run_script("gguf_export.py", "--quick", "--only", "f16,q8_0", "--tokenizer", str(tiny_llama),
               "--workdir", str(tmp_path), "--out", str(out))
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"f16", "q8_0"}
    for r in res["results"].values():
        assert r["wall_s"] > 0 and r["file_mib"] > 0 and r["sampled_tree_peak_mib"] > 0
        assert r["ru_maxrss_mib"] >= r["sampled_tree_peak_mib"] * 0.5
    assert res["results"]["q8_0"]["file_mib"] < res["results"]["f16"]["file_mib"]
    assert not list(tmp_path.glob("qlora-kit-bench-gguf-*"))  # the work folder is removed


def test_generation_throughput_quick(tmp_path):
    from qlora_kit.gguf.converter import ConverterError, locate

    try:
        locate()
    except ConverterError as e:
        pytest.skip(str(e))
    out = tmp_path / "gen.json"
    run_script("generation_throughput.py", "--quick", "--workdir", str(tmp_path), "--out", str(out))
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"hf", "gguf-f16"}
    assert res["prompts"]["held_out"] * res["prompts"]["passes"] >= 16
    for r in res["results"].values():
        assert r["identical_outputs"] and r["ratio_wall"] > 0 and r["ratio_cpu"] > 0
        assert r["old_s_per_100"] > 0 and r["new_s_per_100"] > 0 and len(r["runs"]) == 1
    assert res["results"]["gguf-f16"]["batch_size"] > 1 and res["results"]["gguf-f16"]["prefix_reuse"]["identical_outputs"]


def test_run_all_rejects_unknown_names():
    p = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "nope"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown benchmarks" in p.stderr


# --- train.packing: padding-free batches ---------------------------------------------------------

def _rows(n: int = 3) -> list[dict]:
    rows = []
    for i in range(n):
        ids = [1] + [5 + (7 * i + j) % 200 for j in range(9 + 4 * i)]
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return rows


def test_padding_free_collator_keeps_the_loss_tokens():
    from qlora_kit.training.collate import Collator, PaddingFreeCollator

    rows = _rows()
    flat = PaddingFreeCollator()(rows)
    padded = Collator(0)(rows)
    assert flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert "attention_mask" not in flat  # its absence is what makes transformers build the packed mask
    assert flat["position_ids"][0].tolist() == [p for r in rows for p in range(len(r["input_ids"]))]
    # the loss-bearing targets (labels shifted by one) are exactly those of the padded batch
    assert int((flat["labels"][0, 1:] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())
    starts = [0, len(rows[0]["input_ids"]), len(rows[0]["input_ids"]) + len(rows[1]["input_ids"])]
    assert all(flat["labels"][0, s] == -100 for s in starts)  # never predicted from the previous example


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_packed_logits_equal_separate_logits(arch, tiny_llama, tiny_neox):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kit.training.collate import check_padding_free

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama if arch == "llama" else tiny_neox),
                                                 dtype=torch.float32)
    model.config.use_cache = False  # as train.load_base sets it
    assert check_padding_free(model, _rows(2)) < 1e-4


def test_packing_check_catches_a_cache(tiny_llama):
    """With use_cache on, the model builds a DynamicCache and transformers then skips the packed
    mask: the second example attends to the first. Measured, and refused."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kit.training.collate import check_padding_free

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model.config.use_cache = True
    with pytest.raises(RuntimeError, match="does not keep packed examples apart"):
        check_padding_free(model, _rows(2))


def test_packing_check_catches_cross_attention(tiny_llama):
    """A model that ignores the packed layout (here: position_ids dropped, so one long sequence)
    lets the second example attend to the first; the check must refuse to train."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kit.training.collate import check_padding_free

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model.config.use_cache = False
    forward = model.forward
    model.forward = lambda input_ids=None, position_ids=None, **kw: forward(input_ids=input_ids, **kw)
    with pytest.raises(RuntimeError, match="does not keep packed examples apart"):
        check_padding_free(model, _rows(2))


def test_packing_check_leaves_a_4bit_model_trainable(tiny_llama):
    """bitsandbytes repacks 4-bit weights for inference on an eval-mode CPU forward (AVX512-BF16)
    and that kernel has no backward; the check must not trigger it (it did: grad norm 0)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_kit.training.collate import check_padding_free

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), quantization_config=qc, device_map={"": "cpu"},
                                                 dtype=torch.float32)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    was = model.training
    assert check_padding_free(model, _rows(2)) < 0.05
    assert model.training == was
    model.train()
    ids = torch.tensor([_rows(1)[0]["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and sum(float(g.norm()) for g in grads if g is not None) > 0
