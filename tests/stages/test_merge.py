"""Merge stage: shard-wise LoRA merge into the original or the NF4-round-tripped base, parity with
base + adapter, the complete HF folder (shards as the base, config, tokenizer + chat template,
generation_config, model card), clear refusals, and an interrupted run that leaves nothing.

Run: .venv/bin/python -m pytest -q tests/test_merge.py -p no:cacheprovider

Every merge here runs the real stage (`merge.run`, or `qlora-kit merge` in a subprocess) on the
session's tiny models (conftest.py) with a random LoRA adapter whose B matrices are non-zero (peft
initialises B to zero, which would make every parity check pass trivially). The helpers at the top
build such a stage root; tests/test_quantize.py uses them too.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from support.repo import BIN, kit_env, kit_root
from qlora_kit import merge
from qlora_kit.config import load_recipe
from qlora_kit.text.templates import chat_messages
from qlora_kit.errors import DataError
from qlora_kit import errors
from qlora_kit.weights import lora_merge
from support.stages import NEOX, stage_root


# --- helpers (also used by tests/test_quantize.py) ----------------------------------------------


def run_stage(root: Path, name: str, overrides: dict | None = None):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_KIT_ROOT", str(root))
        return merge.run(load_recipe(name, overrides or {}), overrides or {})


def merged_dir(root: Path, name: str = "tiny") -> Path:
    return root / "models" / name / "merged"


def parity_report(root: Path, name: str = "tiny") -> dict:
    return json.loads((root / "reports" / name / "merge_parity.json").read_text())


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


def load_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny Llama re-saved in ten shards with an index, as hub checkpoints come."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("llama-sharded")
    AutoModelForCausalLM.from_pretrained(str(tiny_llama)).save_pretrained(str(out), max_shard_size="1MB")
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)
    assert len(list(out.glob("model-*.safetensors"))) > 3 and (out / "model.safetensors.index.json").is_file()
    return out


def _bases(arch, sharded_llama, tiny_neox):
    return (sharded_llama, {}) if arch == "llama" else (tiny_neox, dict(NEOX))


# --- parity: both bases, both architectures ------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("base_choice", ["original", "nf4-roundtrip"])
def test_shardwise_merge_matches_base_plus_adapter(arch, base_choice, tmp_path, sharded_llama, tiny_neox):
    base, extra = _bases(arch, sharded_llama, tiny_neox)
    overrides = {**extra, "merge.base": base_choice}
    root, recipe = stage_root(tmp_path, "tiny", base, overrides)
    facts = run_stage(root, "tiny", overrides)
    par = parity_report(root)
    # tiny merges in fp32: the only difference left is summation order, ~1e-6 of the largest logit.
    # The gate is the recipe's merge.max_rel_error (1e-3); a missed or wrong delta is ~1e-1 (below).
    assert par["logits"]["checked"] and par["rows"] == 8 and par["split"] == "val"
    assert par["max_rel_error"] <= recipe.merge.max_rel_error and par["top1_agreement"] == 1.0, par
    assert par["passed"] and par["base"] == base_choice and par["method"] == "shardwise"
    assert par["modules"]["checked"] >= 1 and par["modules"]["max_rel_diff"] < 1e-6  # peft's own delta
    man = json.loads((merged_dir(root) / "manifest.json").read_text())
    assert man["facts"]["merge"]["base"] == base_choice and man["facts"]["parity"]["passed"]
    n_roundtrip = sum(s["nf4_roundtrip"] for s in facts["merge"]["shards"])
    assert (n_roundtrip > 0) == (base_choice == "nf4-roundtrip")
    print(f"{arch} {base_choice}: max rel {par['max_rel_error']:.2e}, mean rel {par['mean_rel_error']:.2e}")

    if base_choice == "nf4-roundtrip" and arch == "llama":
        # the choice matters: against the original weights + adapter, this merge is far off
        from qlora_kit.merge import logit_parity
        from qlora_kit.text.examples import read_split

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("QLORA_KIT_ROOT", str(root))
            wrong = logit_parity(load_recipe("tiny", {**overrides, "merge.base": "original"}),
                                 root / "models/tiny/base", root / "models/tiny/adapter", merged_dir(root),
                                 read_split(root / "data/tiny/processed", "val")[:8])
        assert wrong["max_rel_error"] > 20 * recipe.merge.max_rel_error, wrong
        print(f"  the same merge vs original base + adapter: max rel {wrong['max_rel_error']:.2e}")


def test_nf4_roundtrip_is_what_bitsandbytes_loading_gives(tiny_llama, tiny_neox):
    """The shard-wise round trip picks the same weights as transformers' 4-bit loading and gives
    bit-identical values to its dequantized model (fp32 and bf16 compute dtypes)."""
    import bitsandbytes as bnb
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    for folder, compute in ((tiny_llama, "float32"), (tiny_neox, "bfloat16")):
        recipe = load_recipe("tiny", {"qlora.compute_dtype": compute})
        dt = getattr(torch, compute)
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dt)
        m4 = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=qc, device_map={"": "cpu"}, dtype=dt)
        want = {f"{n}.weight" for n, mod in m4.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}
        assert lora_merge.nf4_quantized_weights(folder) == want and len(want) >= 8
        deq = m4.dequantize().state_dict()
        sd = load_file(str(folder / "model.safetensors"))
        for key in sorted(want):
            assert torch.equal(lora_merge.nf4_roundtrip(sd[key], recipe).to(deq[key].dtype), deq[key]), key


def test_shardwise_equals_peft_merge_and_unload_and_keeps_the_sharding(tmp_path, sharded_llama):
    root, _ = stage_root(tmp_path / "a", "tiny", sharded_llama)
    run_stage(root, "tiny")
    peft_root = tmp_path / "b"
    shutil.copytree(root, peft_root)
    shutil.rmtree(merged_dir(peft_root))
    run_stage(peft_root, "tiny", {"merge.method": "peft"})
    a, b = merged_dir(root), merged_dir(peft_root)
    base_files = sorted(p.name for p in sharded_llama.glob("*.safetensors"))
    for folder in (a, b):
        assert sorted(p.name for p in folder.glob("*.safetensors")) == base_files
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((sharded_llama / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == json.loads((b / "model.safetensors.index.json").read_text())
    ta, tb = load_tensors(a), load_tensors(b)
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    assert worst < 1e-6, worst  # fp32 both ways; peft adds the same delta in another order
    assert parity_report(peft_root)["method"] == "peft" and parity_report(peft_root)["passed"]


def test_modules_to_save_trained_biases_and_embedding_lora(tmp_path, tiny_neox):
    """bias: all (every bias trained, saved with the adapter), modules_to_save (the output layer,
    replaced whole; `lm_head` in the transformers 5 model, `embed_out.weight` in the checkpoint) and
    a LoRA on the input embedding (transposed delta) merge exactly as peft does."""
    overrides = {**NEOX, "lora.bias": "all", "lora.modules_to_save": ["lm_head"],
                 "lora.target_modules": ["query_key_value", "dense", "embed_in"]}
    root, recipe = stage_root(tmp_path / "a", "tiny", tiny_neox, overrides)
    facts = run_stage(root, "tiny", overrides)
    ad = facts["merge"]["adapter"]
    assert "embed_out.weight" in ad["replaced_tensors"] and any(t.endswith(".bias") for t in ad["replaced_tensors"])
    assert parity_report(root)["passed"] and parity_report(root)["max_rel_error"] <= recipe.merge.max_rel_error
    peft_root = tmp_path / "b"
    shutil.copytree(root, peft_root)
    shutil.rmtree(merged_dir(peft_root))
    run_stage(peft_root, "tiny", {**overrides, "merge.method": "peft"})
    ta, tb = load_tensors(merged_dir(root)), load_tensors(merged_dir(peft_root))
    assert max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta) < 1e-6


# --- refusals and failures leave nothing ---------------------------------------------------------

@pytest.mark.parametrize("option,value,says", [("use_dora", True, "DoRA"), ("use_rslora", True, "rsLoRA"),
                                               ("rank_pattern", {"q_proj": 4}, "rank_pattern")])
def test_unsupported_adapter_options_are_refused(tmp_path, tiny_llama, option, value, says):
    root, _ = stage_root(tmp_path, "tiny", tiny_llama)
    cfg_path = root / "models/tiny/adapter/adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), option: value}))
    with pytest.raises(errors.MergeError, match=rf"adapter_config\.json: .*{says}.* not supported"):
        run_stage(root, "tiny")
    assert not merged_dir(root).exists() and not list((root / "models/tiny").glob("merged.partial-*"))


def test_parity_above_threshold_fails_and_writes_no_model(tmp_path, tiny_llama):
    # fp16 rounding of the merged weights is ~1e-4 of the largest logit: above a 1e-7 gate
    overrides = {"merge.dtype": "float16", "merge.max_rel_error": 1e-7}
    root, _ = stage_root(tmp_path, "tiny", tiny_llama, overrides)
    with pytest.raises(merge.MergeParityError, match=r"max relative logit error .* > merge\.max_rel_error 1e-07"):
        run_stage(root, "tiny", overrides)
    par = parity_report(root)
    assert par["passed"] is False and 1e-7 < par["max_rel_error"] < 1e-2
    assert not merged_dir(root).exists() and not list((root / "models/tiny").glob("merged.partial-*"))


def test_logit_check_is_skipped_with_a_reason_when_the_model_does_not_fit(tmp_path, tiny_llama, monkeypatch):
    root, _ = stage_root(tmp_path, "tiny", tiny_llama)
    monkeypatch.setattr(merge, "fits_in_memory", lambda n, *a, **k: (False, {"need_bytes": 64 << 30,
                                                                             "available_bytes": 24 << 30}))
    run_stage(root, "tiny")
    par = parity_report(root)
    assert par["logits"] == {"checked": False, "skipped": "the fp32 model needs ~64.0 GiB, 24.0 GiB available",
                             "need_bytes": 64 << 30, "available_bytes": 24 << 30}
    assert par["passed"] and par["modules"]["checked"] == 1 and par["modules"]["max_rel_diff"] < 1e-6
    assert "logits not compared (the fp32 model needs" in (merged_dir(root) / "README.md").read_text()


def test_missing_inputs_are_clear_errors(tmp_path, tiny_llama):
    root = kit_root(tmp_path)
    with pytest.raises(DataError, match=r"base: not a model folder"):
        run_stage(root, "tiny")
    shutil.copytree(tiny_llama, root / "models/tiny/base")
    with pytest.raises(DataError, match=r"adapter: no adapter; run `qlora-kit train --recipe tiny`"):
        run_stage(root, "tiny")
    assert not merged_dir(root).exists()


# --- the merged folder is a complete model ------------------------------------------------------

def test_tiny_merged_folder_is_a_complete_hf_model(tmp_path, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.text.templates import render_inference

    root, recipe = stage_root(tmp_path, "tiny", tiny_llama)
    run_stage(root, "tiny")
    out = merged_dir(root)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model", "chat_template.jinja", "README.md", "manifest.json"} <= names
    assert json.loads((out / "config.json").read_text())["dtype"] == recipe.merge.dtype
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                         "pad_token_id": 0}  # pad: unk (recipe)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is True and tc["add_eos_token"] is False
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.architectures == ["LlamaForCausalLM"]

    tok = AutoTokenizer.from_pretrained(str(out))
    for row in ({"instruction": "3 더하기 4는?", "input": ""}, {"instruction": "Translate", "input": "안녕"}):
        msg = chat_messages(row)  # the chat convention: a second user message is the input
        want = "<s>" + render_inference(recipe.template, row, bos="<s>", eos="</s>")
        assert tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) == want
        ids = tok.apply_chat_template(msg, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == [1] + tok.encode(want[len("<s>"):], add_special_tokens=False)

    readme = (out / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["base_model"] == "tiny-llama" and meta["datasets"] == [] and meta["license"] == "apache-2.0"
    assert {"qlora-kit", "qlora", "merged", "llama", "tiny"} <= set(meta["tags"])
    for text in ("Source reproduced: none (kit smoke recipe)", "None: this recipe reproduces no source.",
                 "merged vs base + adapter: max relative logit error", "`shardwise` into the `original`"):
        assert text in readme, text
    assert "<s>Q: <instruction>\nA: " in readme  # the prompt format, BOS first


def test_source_recipe_card_names_source_and_quirks_and_license(tmp_path, tiny_neox):
    """polyglot-koalpaca on the tiny GPT-NeoX: nf4-roundtrip by its merge_into_4bit quirk; no
    validation rows (val_ratio 0), so parity runs on training rows and says so."""
    from support.overrides import TINY_OVERRIDES

    name = "polyglot-koalpaca"
    overrides = {**TINY_OVERRIDES[name], "merge.license": "apache-2.0"}
    root, recipe = stage_root(tmp_path, name, tiny_neox, overrides)
    run_stage(root, name, overrides)
    par = parity_report(root, name)
    assert par["base"] == "nf4-roundtrip" and par["passed"] and par["split"].startswith("train")
    assert par["rows"] == recipe.merge.parity_rows and par["max_rel_error"] <= recipe.merge.max_rel_error
    out = merged_dir(root, name)
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 2, "pad_token_id": 2}
    readme = (out / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "tiny-gpt_neox"
    assert f"`{recipe.source.repo}@{recipe.source.commit}`" in readme
    for quirk in recipe.quirks:
        assert f"| `{quirk}` | reproduced (as the source did) |" in readme
    assert "BOS none" in readme or "no BOS" in readme


# --- an interrupted merge leaves nothing that looks complete -------------------------------------

@pytest.mark.slow
def test_sigkill_mid_merge_leaves_no_merged_folder_and_a_rerun_finishes(tmp_path, sharded_llama):
    root, _ = stage_root(tmp_path, "tiny", sharded_llama)
    env = kit_env(root)
    cmd = [str(BIN / "qlora-kit"), "merge", "--recipe", "tiny", "--set", "merge.parity_rows=12"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        partial = []
        # kill once the stage has written part of its output: the first shards of the partial folder
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list((root / "models/tiny").glob("merged.partial-*"))
            if partial and list(partial[0].glob("model-*.safetensors")):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the merge finished before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert partial and not merged_dir(root).exists()  # only the partial folder, named as such
    run_stage(root, "tiny", {"merge.parity_rows": 12})  # the rerun, in this process
    assert (merged_dir(root) / "manifest.json").is_file() and parity_report(root)["passed"]
    assert not list((root / "models/tiny").glob("merged.partial-*"))  # the stale one was cleared
