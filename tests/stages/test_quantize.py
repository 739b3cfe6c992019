"""Quantize stage (GGUF export, parity with the merged model, Modelfile) and the converter install step.

Run: .venv/bin/python -m pytest -q tests/test_quantize.py -p no:cacheprovider
     (add `-m "not slow"` for the unit tests only, ~2 s)

The slow tests merge a random LoRA adapter into the tiny models built by the session fixtures
(conftest.py; helpers from tests/test_merge.py), convert the merged folder with llama.cpp's converter
as installed by `make setup` (`python -m qlora_kit.gguf.converter install`), quantize it with the binding,
load the GGUFs in llama-cpp-python and compare with the Hugging Face model. Everything runs offline.
Tolerances are stated, with their reason, next to each assertion.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from support.repo import BIN, REPO, kit_env, kit_root
from qlora_kit import merge, quantize
from qlora_kit.gguf import converter
from qlora_kit.config import TinyModel, load_recipe
from qlora_kit.text.templates import chat_messages
from qlora_kit.errors import DataError
from support.overrides import TINY_OVERRIDES
from support.stages import stage_root
from qlora_kit.gguf import checks
from qlora_kit.gguf import modelfile
from qlora_kit.weights import hf_folder

# Korean + English, as the recipes' data; template headers, digits, punctuation, newlines, an
# emoji and a rare Hanja that the tiny Llama vocabulary only has as byte-fallback pieces.
SAMPLES = [
    "### Instruction:\n3 더하기 4는 얼마인가요?\n\n### Response:\n7입니다.",
    "The capital of France is Paris.",
    "서울은 한국의 수도입니다. Seoul!",
    "숫자 12345 and 3.14",
    "tabs\tand\nnewlines\n\n",
    "emoji 😀 and rare 龘 chars",
]
PARITY_TEXT = "### Instruction:\n3 더하기 4는 얼마인가요?\n\n### Response:\n7입니다. The capital of France is Paris."


# --- helpers ------------------------------------------------------------------------------------

def gguf_model(path: Path, **kw):
    """The kit's own loader (see qlora_kit.gguf.runtime for why extra buffer types are off)."""
    from qlora_kit.gguf.runtime import open_gguf

    return open_gguf(path, **kw)


def hf_ids(folder: Path, text: str, bos: bool) -> list[int]:
    """Token ids from the HF tokenizer, BOS prepended explicitly (never implied by the tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok.encode(text, add_special_tokens=False)
    return ([tok.bos_token_id] if bos else []) + ids


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    with gguf_model(path, logits_all=True, n_ctx=128) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])


def assert_f16_logits_match(hf: np.ndarray, gg: np.ndarray) -> dict[str, float]:
    """f16 GGUF vs the fp32 HF model, every position.

    Tolerance: max |diff| <= 1% of the std of the HF logits. f16 keeps 11 significant bits, so each
    weight is rounded by up to 2^-11 (5e-4) relative, and ggml's CPU f16 matmul also rounds the
    activations to f16; over 2 layers and the LM head this measured 0.28-0.35% of the logit std on
    these models. A real conversion bug is far larger: converting the GPT-NeoX model with the wrong
    rotary_pct (0.25 instead of 0.5) gave 9%; a transposed or misordered matrix gives ~100%.
    Top-1: llama.cpp's argmax equals HF's at every position whose HF top-2 margin exceeds twice the
    tolerance (a near-tie may flip within tolerance and means nothing); such positions must be at
    least 80% of all, so the check cannot pass vacuously.
    """
    assert gg.shape == hf.shape
    scale = float(hf.std())
    tol = 0.01 * scale
    diff = float(np.abs(gg - hf).max())
    top2 = np.sort(hf, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * tol
    agree = gg.argmax(-1) == hf.argmax(-1)
    assert diff <= tol, f"max |logit diff| {diff:.5f} > {tol:.5f} (1% of HF logit std {scale:.4f})"
    assert decisive.mean() >= 0.8, f"only {decisive.sum()}/{len(decisive)} positions have a clear top-1"
    assert agree[decisive].all(), f"top-1 differs at positions {np.flatnonzero(decisive & ~agree).tolist()}"
    return {"max_abs_diff": diff, "rel_to_std": diff / scale, "top1_all": float(agree.mean())}


# The tiny models are untrained and the adapter random: next-token distributions are close to
# uniform (perplexity ~ 1000 over a 1000-token vocabulary), so the top token is mostly a near-tie
# that any rounding flips. Measured on these models: top-1 agreement f16 0.998-1.0, q8_0 0.96,
# q4_k_m 0.62-0.78, while the mean KL stays far under its gate (q8_0 2e-5 vs 5e-3, q4_k_m 1e-3 to
# 2e-3 vs 0.1). The kit's min_top1 defaults (set for real models) are lowered for the two lossy
# types only, so the top-1 gate still runs; the KL gates are the defaults. (The tiny recipe trained
# end to end passes every default: q4_k_m top-1 0.974, mean KL 2.2e-3.)
TINY_GATES = {"quantize.min_top1": {"q8_0": 0.9, "q4_k_m": 0.5}}


def run_stage(root: Path, types: list[str], name: str = "tiny", extra: dict | None = None):
    overrides = {**TINY_OVERRIDES.get(name, {}), **(extra or {}), "quantize.types": types}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_KIT_ROOT", str(root))
        recipe = load_recipe(name, overrides)
        return quantize.run(recipe, overrides)


def merged_root(tmp: Path, base: Path, name: str = "tiny", extra: dict | None = None) -> Path:
    """A kit root where the merge stage has run: models/NAME/merged, data/NAME/processed."""
    overrides = {**TINY_OVERRIDES.get(name, {}), **(extra or {})}
    root, recipe = stage_root(tmp, name, base, overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_KIT_ROOT", str(root))
        merge.run(recipe, overrides)
    return root


def partials(root: Path, name: str = "tiny") -> list[Path]:
    return sorted((root / "models" / name).glob("gguf.partial-*"))


GO_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.S)


def parse_modelfile(text: str) -> dict:
    """FROM, SYSTEM, TEMPLATE and PARAMETERs of a Modelfile as Ollama's parser reads them."""
    out: dict = {"PARAMETER": []}
    for m in re.finditer(r'^(FROM|SYSTEM|TEMPLATE|PARAMETER) (?:"""(.*?)"""|([^\n]*))$', text, re.M | re.S):
        key, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        if key == "PARAMETER":
            k, v = value.split(" ", 1)
            out["PARAMETER"].append((k, v[1:-1] if v.startswith('"') else v))
        else:
            out[key] = value
    return out


def render_go(template: str, prompt: str, system: str = "") -> str:
    """The subset of Go's text/template the kit writes: literal text, {{ .Prompt }}, {{ .System }},
    {{ "string" }}. Anything else fails the test: Ollama would have to be checked for it."""
    def action(m: re.Match) -> str:
        body = m.group(1)
        if body == ".Prompt":
            return prompt
        if body == ".System":
            return system
        if body.startswith('"'):
            return json.loads(body)
        raise AssertionError(f"unexpected Go template action {{{{ {body} }}}}")
    return GO_ACTION.sub(action, template)


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_mod():
    return converter.import_gguf()  # the sdist's gguf-py; fails with `make setup` advice if absent


def _kill_mid_quantize(root: Path, types: list[str]) -> dict:
    """`qlora-kit quantize` in a subprocess, SIGKILLed once it has started writing its output (the
    partial folder exists; the converter is running into it)."""
    cmd = [str(BIN / "qlora-kit"), "quantize", "--recipe", "tiny", "--set", f"quantize.types=[{','.join(types)}]",
           "--set", f"quantize.min_top1={json.dumps(TINY_GATES['quantize.min_top1'])}"]
    proc = subprocess.Popen(cmd, env=kit_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            found = partials(root)
            if found:
                seen = [found[0].name]
                time.sleep(1.0)  # into the conversion
                break
            time.sleep(0.01)
        finished_early = proc.poll() is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        after = {"gguf_exists": (root / "models/tiny/gguf").exists(), "partials": [p.name for p in partials(root)],
                 "returncode": proc.returncode, "finished_early": finished_early, "seen": seen}
    finally:
        # the converter child gets SIGKILL with its parent (PR_SET_PDEATHSIG, converter.py);
        # ending the group as well is a safety net on systems without it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return after


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_llama):
    """The tiny recipe: merge, then `qlora-kit quantize` killed mid-run, then the stage run again."""
    root = merged_root(tmp_path_factory.mktemp("q-llama"), tiny_llama)
    types = ["f16", "q8_0", "q4_k_m"]
    killed = _kill_mid_quantize(root, types)
    facts = run_stage(root, types, extra=TINY_GATES)
    return root, facts, killed


@pytest.fixture(scope="module")
def neox_run(tmp_path_factory, tiny_neox):
    """polyglot-koalpaca on the tiny GPT-NeoX (nf4-roundtrip merge, no BOS, val_ratio 0)."""
    name = "polyglot-koalpaca"
    root = merged_root(tmp_path_factory.mktemp("q-neox"), tiny_neox, name)
    return root, run_stage(root, ["f16", "q4_k_m"], name, TINY_GATES)


# --- the converter: install, locate, environment (fast, offline) ---------------------------------

def _fake_sdist(path: Path, version: str, *, extra: dict[str, bytes] | None = None) -> Path:
    root = f"llama_cpp_python-{version}"
    members = {
        f"{root}/PKG-INFO": f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {version}\n".encode(),
        f"{root}/.git/modules/vendor/llama.cpp/HEAD": b"0123456789abcdef0123456789abcdef01234567\n",
        **{f"{root}/vendor/llama.cpp/{f}": f"# {f}\n".encode() for f in converter.REQUIRED},
        f"{root}/vendor/llama.cpp/conversion/gpt2.py": b"# extra model module\n",
        f"{root}/vendor/llama.cpp/models/templates/x.jinja": b"{{ x }}\n",
        f"{root}/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf": b"big test vocab, not needed",
        f"{root}/vendor/llama.cpp/src/llama.cpp": b"// C++, not needed",
        f"{root}/vendor/llama.cpp/conversion/../../evil.py": b"path traversal",
        **(extra or {}),
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def prefix(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    return tmp_path / "venv"


def test_install_extracts_only_the_converter_tree_and_records_the_sdist(tmp_path, prefix, monkeypatch):
    version = converter.binding_version()
    sdist = _fake_sdist(tmp_path / f"llama_cpp_python-{version}.tar.gz", version)
    with pytest.raises(converter.ConverterError, match="make setup"):
        converter.locate()
    d = converter.install(sdist)
    assert d == prefix / "share" / "qlora-kit" / f"llama.cpp-{version}" == converter.locate()
    got = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert got == sorted([*converter.REQUIRED, "conversion/gpt2.py", "models/templates/x.jinja", "SOURCE.json"])
    assert not (tmp_path / "evil.py").exists() and not (prefix / "share" / "evil.py").exists()
    src = json.loads((d / "SOURCE.json").read_text())
    assert src["sdist_sha256"] == hashlib.sha256(sdist.read_bytes()).hexdigest()
    assert src["version"] == version and src["llama_cpp_commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert not list(d.parent.glob("*.partial-*"))

    # idempotent: present -> no download, no rewrite
    monkeypatch.setattr(converter, "download_sdist", lambda *a: pytest.fail("downloaded although installed"))
    before = (d / "SOURCE.json").stat().st_mtime_ns
    assert converter.install(None) == d
    assert (d / "SOURCE.json").stat().st_mtime_ns == before


def test_install_refuses_an_sdist_of_another_version(tmp_path, prefix):
    sdist = _fake_sdist(tmp_path / "llama_cpp_python-0.0.1.tar.gz", "0.0.1")
    with pytest.raises(converter.ConverterError, match="0.0.1 but the installed binding is"):
        converter.install(sdist)
    assert not converter.install_dir().exists()
    assert not list((prefix / "share" / "qlora-kit").glob("*"))


def test_install_without_sdist_pip_downloads_the_pinned_sdist(tmp_path, prefix, monkeypatch):
    version = converter.binding_version()
    seen = []

    def fake_run(cmd, **kw):  # no network in tests: stand in for pip, check what it was asked
        seen.append(cmd)
        _fake_sdist(Path(cmd[cmd.index("-d") + 1]) / f"llama_cpp_python-{version}.tar.gz", version)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(converter.subprocess, "run", fake_run)
    converter.install(None)
    (cmd,) = seen
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and cmd[cmd.index("--no-binary") + 1] == ":all:"
    assert f"llama-cpp-python=={version}" in cmd
    assert converter.locate()


def test_child_env_puts_the_sdist_gguf_before_any_installed_gguf(tmp_path, monkeypatch):
    d = converter.locate()
    decoy = tmp_path / "site" / "gguf"  # stands in for a PyPI `gguf` the user has on the path
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('decoy gguf, not the sdist copy')\n")
    monkeypatch.setenv("PYTHONPATH", str(decoy.parent))
    monkeypatch.setenv("NO_LOCAL_GGUF", "1")  # would make the converter skip its own copy
    env = converter.child_env(d)
    assert "NO_LOCAL_GGUF" not in env and env["PYTHONPATH"].endswith(str(decoy.parent))
    out = subprocess.run([sys.executable, "-c", "import gguf; print(gguf.__file__)"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).is_relative_to(d / "gguf-py")
    assert Path(converter.import_gguf().__file__).is_relative_to(d / "gguf-py")


def test_hparams_shim_adds_rotary_pct_only_where_missing():
    neox5 = {"architectures": ["GPTNeoXForCausalLM"],
             "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0}}
    assert converter.hparams_patches(neox5) == {"rotary_pct": 0.5}
    assert converter.hparams_patches({**neox5, "rotary_pct": 0.25}) == {}
    assert converter.hparams_patches({"architectures": ["LlamaForCausalLM"], "rope_parameters": {}}) == {}


def test_pre_tokenizer_registration_requires_the_declared_gpt2_pre_tokenizer(tmp_path, tiny_neox, tiny_llama):
    assert converter.pre_tokenizer_for(tiny_neox) == "gpt-2"
    assert converter.pre_tokenizer_for(tiny_llama) is None  # sentencepiece: Metaspace, not byte-level
    tj = json.loads((tiny_neox / "tokenizer.json").read_text())
    for change in ({"pre_tokenizer": {**tj["pre_tokenizer"], "add_prefix_space": True}},
                   {"normalizer": {"type": "NFKC"}},
                   {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [tj["pre_tokenizer"]]}}):
        (tmp_path / "tokenizer.json").write_text(json.dumps({**tj, **change}))
        assert converter.pre_tokenizer_for(tmp_path) is None, change


# --- the stage's own checks (fast) ---------------------------------------------------------------

def test_check_types_rejects_missing_type_and_fallbacks():
    ok = {"file": "m.gguf", "tensor_types": {"F32": 5, "Q4_K": 13, "Q6_K": 3},
          "matrices": {"blk.0.attn_q.weight": {"type": "Q4_K", "ncols": 256},
                       "output.weight": {"type": "Q6_K", "ncols": 256}}}
    assert checks.check_types("q4_k_m", ok)["ok"]
    # a Q8_0 that llama.cpp picks on purpose (rows a multiple of 256) is not a fallback
    on_purpose = {**ok, "matrices": {**ok["matrices"], "blk.0.attn_v.weight": {"type": "Q8_0", "ncols": 4096}}}
    assert checks.check_types("q4_k_m", on_purpose)["fallback_tensors"] == {}
    fell = {**ok, "tensor_types": {"F32": 5, "Q4_K": 1, "Q5_0": 12},
            "matrices": {"blk.0.attn_q.weight": {"type": "Q5_0", "ncols": 128},
                         "output.weight": {"type": "Q8_0", "ncols": 128},
                         "token_embd.weight": {"type": "Q4_K", "ncols": 256}}}
    with pytest.raises(checks.QuantizeError, match=r"2 matrices fell back.*blk\.0\.attn_q\.weight=Q5_0"):
        checks.check_types("q4_k_m", fell)
    with pytest.raises(checks.QuantizeError, match="no Q8_0 tensor"):
        checks.check_types("q8_0", {**ok, "tensor_types": {"F16": 16}})


def test_missing_merged_model_is_a_clear_error(tmp_path):
    root = kit_root(tmp_path / "root")
    with pytest.raises(DataError, match=r"merged.*run `qlora-kit merge --recipe tiny`"):
        run_stage(root, ["f16"])
    assert not (root / "models" / "tiny" / "gguf").exists()


def test_modelfile_for_a_sampling_recipe_with_a_system_prompt():
    """komt set to sample, with an extra stop string and no system prompt; llama2-koalpaca set to
    decode greedily, with its fixed Korean system prompt and a stripped instruction, which the
    Modelfile says it cannot express."""
    komt = load_recipe(str(REPO / "recipes/komt.yaml"), {**TINY_OVERRIDES["komt"], "eval.do_sample": True,
                                                         "eval.temperature": 0.7, "quantize.stop": ["###"]})
    mf = parse_modelfile(modelfile.modelfile(komt, "model-q4_0.gguf", True, "</s>", "</s>"))
    params = dict(mf["PARAMETER"])
    assert mf["FROM"] == "./model-q4_0.gguf" and "SYSTEM" not in mf
    assert [v for k, v in mf["PARAMETER"] if k == "stop"] == ["</s>", "###"]
    assert (params["temperature"], params["top_p"], params["top_k"]) == ("0.7", str(komt.eval.top_p),
                                                                       str(komt.eval.top_k))
    assert params["num_predict"] == str(komt.eval.max_new_tokens)
    l2k = load_recipe(str(REPO / "recipes/llama2-koalpaca.yaml"), {**TINY_OVERRIDES["llama2-koalpaca"],
                                                                   "eval.do_sample": False})
    text = modelfile.modelfile(l2k, "model-f16.gguf", True, "<s>", "</s>")
    mf = parse_modelfile(text)
    assert mf["SYSTEM"] == l2k.template.system and "{{ .System }}" in mf["TEMPLATE"]
    assert "# Note: the recipe strips the instruction (right_joined)" in text
    assert dict(mf["PARAMETER"])["temperature"] == "0" and "top_p" not in dict(mf["PARAMETER"])


# --- end to end: Llama (sentencepiece), tiny recipe -------------------------------------------------

def fake_merged_root(tmp: Path, base: Path) -> Path:
    """A root whose `merged` folder is `base` with the merge stage's tokenizer (as if merged with a
    zero adapter) and processed data: for tests that fail before any parity is computed."""
    from support.stages import write_processed

    root = kit_root(tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_KIT_ROOT", str(root))
        recipe = load_recipe("tiny")
    shutil.copytree(base, root / "models/tiny/merged")
    hf_folder.write_tokenizer(recipe, base, root / "models/tiny/merged")
    write_processed(root, recipe, base)
    return root


@pytest.mark.slow
def test_sigkill_mid_quantize_leaves_no_gguf_folder_and_a_rerun_finishes(llama_run):
    root, facts, killed = llama_run
    # killed while running, its partial output folder in place
    assert not killed["finished_early"] and killed["seen"] and killed["returncode"] == -signal.SIGKILL
    assert not killed["gguf_exists"] and killed["partials"]  # nothing final: only a folder named partial
    # the rerun (the fixture's in-process stage run) finished and cleared the stale partial folder
    assert (root / "models/tiny/gguf/manifest.json").is_file() and not partials(root)
    assert set(facts["files"]) == {"f16", "q8_0", "q4_k_m"}


@pytest.mark.slow
def test_llama_f16_logits_match_hf(llama_run):
    root = llama_run[0]
    merged = root / "models/tiny/merged"
    ids = hf_ids(merged, PARITY_TEXT, bos=True)
    assert ids[0] == 1 and len(ids) > 30
    gg = gguf_logits(root / "models" / "tiny" / "gguf" / "model-f16.gguf", ids)
    stats = assert_f16_logits_match(hf_logits(merged, ids), gg)
    print(f"llama f16 vs HF: {stats}")


@pytest.mark.slow
def test_llama_quantized_files_manifest_and_k_quants(llama_run, gguf_mod):
    root, facts, _ = llama_run
    out = root / "models" / "tiny" / "gguf"
    merged = root / "models/tiny/merged"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "model-f16.Modelfile", "model-f16.gguf", "model-q4_k_m.Modelfile", "model-q4_k_m.gguf",
        "model-q8_0.Modelfile", "model-q8_0.gguf"]
    man = json.loads((out / "manifest.json").read_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_KIT_ROOT", str(root))
        recipe = load_recipe("tiny", {**TINY_GATES, "quantize.types": ["f16", "q8_0", "q4_k_m"]})
    assert man["stage"] == "quantize" and man["config"] == recipe.sections_for("quantize")
    # when the converter was installed is a fact of the machine: in the run report, not the manifest
    assert man["facts"]["converter"] == {k: v for k, v in converter.source_info().items() if k != "installed_at"}
    assert man["inputs"]["merged"]["model.safetensors"] == hashlib.sha256(
        (merged / "model.safetensors").read_bytes()).hexdigest()
    assert set(man["inputs"]["processed"]) >= {"train.jsonl", "val.jsonl"}
    assert man["facts"]["shims"] == {}  # a sentencepiece Llama needs none
    for qtype, info in man["facts"]["files"].items():
        path = out / f"model-{qtype}.gguf"
        assert info["size_bytes"] == path.stat().st_size
        assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        # read back independently of the stage
        reader = gguf_mod.GGUFReader(str(path))
        assert info["tensor_types"] == dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))
        assert info["check"]["ok"] and info["check"]["fallback_tensors"] == {}
        assert info["architecture"] == "llama" and info["tokenizer_model"] == "llama"
    q4 = man["facts"]["files"]["q4_k_m"]["tensor_types"]
    assert q4["Q4_K"] >= 10 and set(q4) <= {"Q4_K", "Q6_K", "F32"}, q4  # every matrix a K type
    assert set(man["facts"]["files"]["q8_0"]["tensor_types"]) == {"Q8_0", "F32"}

    # quantizing is deterministic (DVC caches by content): the same f16 gives the same bytes
    again = root / "again-q4_k_m.gguf"
    quantize.quantize_file(out / "model-f16.gguf", again, "q4_k_m")
    assert hashlib.sha256(again.read_bytes()).hexdigest() == man["facts"]["files"]["q4_k_m"]["sha256"]


@pytest.mark.slow
def test_gguf_metadata_carries_chat_template_and_special_tokens(llama_run, neox_run, gguf_mod):
    """The pinned converter copies chat_template.jinja and add_bos_token itself (checked here on
    every file, the quantized ones included: llama_model_quantize copies the metadata)."""
    for root, name, add_bos in ((llama_run[0], "tiny", True), (neox_run[0], "polyglot-koalpaca", False)):
        merged = root / "models" / name / "merged"
        template = (merged / "chat_template.jinja").read_text()
        assert template.startswith("{{ '<s>' }}") == add_bos
        gen = json.loads((merged / "generation_config.json").read_text())
        for path in sorted((root / "models" / name / "gguf").glob("*.gguf")):
            reader = gguf_mod.GGUFReader(str(path))
            field = lambda k: reader.get_field(k).contents() if reader.get_field(k) is not None else None  # noqa: E731
            assert field("tokenizer.chat_template") == template, path.name
            assert field("tokenizer.ggml.add_bos_token") is add_bos and field("tokenizer.ggml.add_eos_token") is False
            assert field("tokenizer.ggml.eos_token_id") == gen["eos_token_id"]
            if add_bos:
                assert field("tokenizer.ggml.bos_token_id") == gen["bos_token_id"]


@pytest.mark.slow
def test_gguf_parity_report_per_type(llama_run, neox_run):
    for root, name, split in ((llama_run[0], "tiny", "val"), (neox_run[0], "polyglot-koalpaca", "train")):
        rep = json.loads((root / "reports" / name / "gguf_parity.json").read_text())
        assert rep["passed"] and rep["reference"] == "merged HF model (fp32)" and rep["rows"] == 8
        assert rep["split"].startswith(split)
        for qtype, r in rep["types"].items():
            t = r["tokenization"]
            assert t["ok"] and t["mismatches"] == 0 and t["rows"] == 8 and t["eos_ok"] and t["bos_ok"], (name, qtype, t)
            assert r["passed"] and r["mean_kl"] <= r["max_mean_kl"] and r["top1_agreement"] >= r["min_top1"]
            assert r["positions"] > 100
            print(f"{name} {qtype}: mean KL {r['mean_kl']:.2e}, max KL {r['max_kl']:.2e}, top-1 "
                  f"{r['top1_agreement']:.3f}, ppl {r['ppl']:.2f} vs {r['ppl_reference']:.2f}")
        f16 = rep["types"]["f16"]
        # f16 vs fp32 HF: measured mean KL 1e-8 to 5e-8 and the same top token at all positions but
        # a near-tie or two (0.998); a conversion bug (wrong rope dims, transposed matrix) gives KL > 1e-2
        assert f16["mean_kl"] < 1e-6 and f16["top1_agreement"] >= 0.99 and abs(f16["ppl_ratio"] - 1) < 1e-3
        q4 = rep["types"]["q4_k_m"]
        assert q4["mean_kl"] > 10 * f16["mean_kl"] and abs(q4["ppl_ratio"] - 1) < 0.1  # q4 is lossy, not broken


@pytest.mark.slow
def test_parity_gates_fail_on_a_strict_threshold(llama_run):
    """The same files and rows against a threshold no 4-bit file meets: the report says failed and
    the stage's message names the type, the number and the recipe key."""
    from qlora_kit.text.examples import parity_rows
    from qlora_kit.text.tokenizer import load_tokenizer

    root = llama_run[0]
    strict = load_recipe(str(REPO / "recipes/tiny.yaml"), {"quantize.max_mean_kl": {"q4_k_m": 1e-9}})
    merged, out = root / "models/tiny/merged", root / "models/tiny/gguf"
    rows, _ = parity_rows(root / "data/tiny/processed", 8)
    tok = load_tokenizer(merged, strict.template)
    ref, _ = quantize.hf_reference(strict, merged, rows)
    rep = quantize.gguf_parity(strict, {"q4_k_m": out / "model-q4_k_m.gguf"}, rows, tok, ref, out / "model-f16.gguf")
    assert rep["passed"] is False and rep["types"]["q4_k_m"]["tokenization"]["ok"]
    assert re.fullmatch(r"q4_k_m: mean KL \S+ > quantize\.max_mean_kl\.q4_k_m 1e-09; q4_k_m: top-1 agreement "
                        r"\S+ < quantize\.min_top1\.q4_k_m 0\.85", quantize._failures(rep))
    # without the HF model (as when it does not fit in RAM) the f16 GGUF is the reference
    rep = quantize.gguf_parity(strict, {"f16": out / "model-f16.gguf", "q8_0": out / "model-q8_0.gguf"}, rows, tok,
                               None, out / "model-f16.gguf")
    assert rep["reference"].startswith("model-f16.gguf") and rep["types"]["f16"]["mean_kl"] == 0.0
    assert rep["types"]["q8_0"]["passed"] and rep["types"]["f16"]["note"].startswith("the reference itself")


@pytest.mark.slow
def test_tiny_modelfiles_render_the_recipe_prompt(llama_run):
    from qlora_kit.text.templates import render_inference

    root = llama_run[0]
    recipe = load_recipe(str(REPO / "recipes/tiny.yaml"))
    for qtype in ("f16", "q8_0", "q4_k_m"):
        text = (root / f"models/tiny/gguf/model-{qtype}.Modelfile").read_text()
        mf = parse_modelfile(text)
        assert mf["FROM"] == f"./model-{qtype}.gguf" and "SYSTEM" not in mf
        for row in ({"instruction": "3 더하기 4는?", "input": ""}, {"instruction": "What is {input}?", "input": ""}):
            assert render_go(mf["TEMPLATE"], row["instruction"]) == render_inference(recipe.template, row)
        assert mf["PARAMETER"] == [("stop", "</s>"), ("temperature", "0"), ("repeat_penalty", "1"),
                                   ("num_predict", str(recipe.eval.max_new_tokens))]
        assert "llama.cpp adds it (tokenizer.ggml.add_bos_token = true)" in text
        assert "the Alpaca `input` has no slot" in text  # tiny has a with-input form Ollama cannot take


@pytest.mark.slow
def test_k_quant_fallback_fails_the_stage(tmp_path_factory, sample_rows):
    """hidden 128: no matrix row is a multiple of 256, llama.cpp falls back to Q5_0/Q8_0 (warning only)."""
    from qlora_kit.tiny.model import build, sample_texts

    narrow = build("llama", tmp_path_factory.mktemp("tiny-llama-128"), sample_texts(sample_rows),
                   TinyModel(hidden_size=128, intermediate_size=384))
    root = fake_merged_root(tmp_path_factory.mktemp("q-narrow"), narrow)
    with pytest.raises(checks.QuantizeError, match=r"model-q4_k_m\.gguf: asked for q4_k_m.*fell back.*=Q5_0"):
        run_stage(root, ["f16", "q4_k_m"])
    assert not (root / "models" / "tiny" / "gguf").exists() and not partials(root)


@pytest.mark.slow
def test_failed_conversion_leaves_no_output(tmp_path_factory, tiny_llama):
    root = fake_merged_root(tmp_path_factory.mktemp("q-broken"), tiny_llama)
    cfg_path = root / "models" / "tiny" / "merged" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(converter.ConverterError, match=r"(?s)llama\.cpp converter failed.*NoSuchModelForCausalLM"):
        run_stage(root, ["f16", "q8_0"])
    assert not (root / "models" / "tiny" / "gguf").exists() and not partials(root)
    assert not (root / "reports/tiny/gguf_parity.json").exists()


# --- end to end: GPT-NeoX (byte-level BPE), polyglot-koalpaca ---------------------------------------

@pytest.mark.slow
def test_neox_converts_with_both_shims_and_f16_matches_hf(neox_run, gguf_mod):
    root, facts = neox_run
    shims = facts["shims"]
    assert shims["hparams_patches"]["rotary_pct"]["value"] == 0.5
    reg = shims["pre_tokenizer_registration"]
    assert reg["registered_as"] == "gpt-2" and len(reg["chkhsh"]) == 64
    f16 = root / "models" / "polyglot-koalpaca" / "gguf" / "model-f16.gguf"
    reader = gguf_mod.GGUFReader(str(f16))
    # rotary_pct made it into the file: 0.5 x head_dim (256 / 4 heads = 64)
    assert reader.get_field("gptneox.rope.dimension_count").contents() == 32
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert facts["files"]["q4_k_m"]["tensor_types"].get("Q4_K", 0) > 0
    merged = root / "models/polyglot-koalpaca/merged"
    ids = hf_ids(merged, PARITY_TEXT, bos=False)  # Polyglot layout: no BOS
    stats = assert_f16_logits_match(hf_logits(merged, ids), gguf_logits(f16, ids))
    print(f"neox f16 vs HF: {stats}")


# --- tokenization parity ----------------------------------------------------------------------------

def _run_folder(arch: str, llama_run, neox_run) -> tuple[Path, Path, bool]:
    if arch == "llama":
        return llama_run[0] / "models/tiny/gguf/model-f16.gguf", llama_run[0] / "models/tiny/merged", True
    root = neox_run[0] / "models/polyglot-koalpaca"
    return root / "gguf/model-f16.gguf", root / "merged", False


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_llama_cpp_tokenizes_like_hf(arch, llama_run, neox_run):
    """BOS is explicit on both sides: the Llama tokenizer has BOS <s>=1 and the kit prepends it
    itself (transformers 5 adds none); the GPT-NeoX (Polyglot) tokenizer has no BOS."""
    gguf_path, folder, bos = _run_folder(arch, llama_run, neox_run)
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(str(folder)).eos_token
    texts = SAMPLES + [f"답변입니다.{eos}"]  # an EOS written as text, as templates do: special=True parses it
    with gguf_model(gguf_path, vocab_only=True) as llm:
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=bos, special=True) == hf_ids(folder, text, bos), text


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known llama.cpp vs HF divergences for sentencepiece Llama; see docstring")
@pytest.mark.parametrize("text", ["  two leading spaces", "before</s>after"])
def test_llama_spm_known_tokenization_divergences(text, llama_run, tiny_llama):
    """Documented, not fixed: (1) a run of leading spaces: HF's Metaspace gives one '▁' fewer than
    llama.cpp; (2) text right after a special token: llama.cpp adds the '▁' dummy prefix again,
    HF does not. Neither occurs in the kit's templates (no leading spaces; EOS ends the text).
    Strict: if a future pin makes them agree, this fails and the note must go."""
    with gguf_model(llama_run[0] / "models/tiny/gguf/model-f16.gguf", vocab_only=True) as llm:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf_ids(tiny_llama, text, True)


# --- one prompt everywhere, for every recipe ---------------------------------------------------------

RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
PROMPT_ROWS = [  # with and without input, Korean and English, braces and a trailing space
    {"instruction": "3 더하기 4는 얼마인가요?", "input": "", "output": "7"},
    {"instruction": "Translate to Korean", "input": "Good morning", "output": "좋은 아침"},
    {"instruction": "What does {input} mean here? ", "input": "", "output": "-"},
]


@pytest.fixture(scope="module")
def recipe_ggufs(tmp_path_factory, tiny_llama, tiny_neox):
    """For every recipe on the tiny model of its architecture: the merge stage's tokenizer folder
    and a vocab-only GGUF converted from it by the pinned converter (all in one subprocess)."""
    out = tmp_path_factory.mktemp("recipe-ggufs")
    jobs, made = [], {}
    for name in RECIPES:
        recipe = load_recipe(str(REPO / "recipes" / f"{name}.yaml"), TINY_OVERRIDES.get(name, {}))
        base = tiny_llama if recipe.model.arch == "llama" else tiny_neox
        folder = out / name
        folder.mkdir()
        shutil.copy2(base / "config.json", folder / "config.json")
        hf_folder.write_tokenizer(recipe, base, folder)
        jobs.append([str(folder), str(out / f"{name}.gguf")])
        made[name] = (recipe, folder, out / f"{name}.gguf")
    script = ("import json, sys\nfrom pathlib import Path\nfrom qlora_kit.gguf import converter\n"
              "for src, dst in json.loads(sys.argv[1]):\n"
              "    converter._run(Path(dst + '.json'), [src, '--outfile', dst, '--outtype', 'f16', '--vocab-only'])\n")
    res = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], env=converter.child_env(converter.locate()),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return made


def _cli_render(name: str, rows_file: Path, capsys) -> list[dict]:
    from qlora_kit import cli
    from support.overrides import as_set_args

    args = ["render", "--recipe", str(REPO / "recipes" / f"{name}.yaml"), "--input", str(rows_file)]
    args += as_set_args(name) if name in TINY_OVERRIDES else []
    capsys.readouterr()
    assert cli.main(args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_one_prompt_everywhere(name, recipe_ggufs, tmp_path, capsys):
    """HF apply_chat_template on the merged tokenizer, the GGUF's embedded template (as
    llama-cpp-python renders it from the file's metadata), `qlora-kit render` /
    templates.render_inference and the Ollama Modelfile give the same prompt, and the same ids."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from qlora_kit.text.templates import render_inference
    from qlora_kit.text.tokenizer import load_tokenizer

    recipe, folder, gguf_path = recipe_ggufs[name]
    hf = AutoTokenizer.from_pretrained(str(folder))
    tok = load_tokenizer(folder, recipe.template)
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(PROMPT_ROWS, ensure_ascii=False))
    rendered = _cli_render(name, rows_file, capsys)
    assert len(rendered) == len(PROMPT_ROWS)
    bos_text = tok.bos if recipe.template.add_bos else ""
    mf = parse_modelfile(modelfile.modelfile(recipe, "model-f16.gguf", recipe.template.add_bos, tok.bos, tok.eos))
    with gguf_model(gguf_path, vocab_only=True) as llm:
        assert llm.metadata["tokenizer.ggml.add_bos_token"] == str(recipe.template.add_bos).lower()
        fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=tok.eos,
                                  bos_token=tok.bos)
        for row, cli_row in zip(PROMPT_ROWS, rendered):
            prompt = render_inference(recipe.template, row, bos=tok.bos, eos=tok.eos)
            assert cli_row["inference_prompt"] == prompt
            msg = chat_messages(row)  # the chat convention: a second user message is the input
            via_hf = hf.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
            via_gguf = fmt(messages=msg).prompt
            assert via_hf == via_gguf == bos_text + prompt, name
            ids = ([tok.bos_id] if recipe.template.add_bos else []) + tok.encode(prompt)
            hf_ids_ = hf.apply_chat_template(msg, tokenize=True, add_generation_prompt=True)
            hf_ids_ = list(hf_ids_["input_ids"] if hasattr(hf_ids_, "keys") else hf_ids_)
            # transformers' own ids only where the recipe uses them (template.tokenizer auto); the
            # sources' tokenizers (hub-fast, sentencepiece-slow) and llama.cpp must agree always
            assert ids == llm.tokenize(via_gguf.encode(), add_bos=False, special=True), name
            assert tok.kind != "auto" or hf_ids_ == ids, name
            # Ollama: TEMPLATE with the message as .Prompt, SYSTEM as .System, BOS added by llama.cpp
            # as the GGUF says. Its template has only the no-input form and cannot strip: rows are
            # compared where that holds (an input the recipe would drop at inference counts as none).
            uses_input = row["input"] and (recipe.template.inference_prompt_with_input if
                                           recipe.template.inference_prompt is not None
                                           else recipe.template.prompt_with_input) is not None
            strip = recipe.template.strip.get("instruction")
            if not uses_input and not (strip and row["instruction"] != row["instruction"].strip()):
                go = render_go(mf["TEMPLATE"], row["instruction"], mf.get("SYSTEM", ""))
                assert go == prompt, name
                assert llm.tokenize(go.encode(), add_bos=True, special=True) == ids, name
