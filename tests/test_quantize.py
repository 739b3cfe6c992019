"""Quantize stage (GGUF export) and the converter install step.

Run: .venv/bin/python -m pytest -q tests/test_quantize.py -p no:cacheprovider
     (add `-m "not slow"` for the unit tests only, ~2 s)

The slow tests convert tiny models built by the session fixtures (conftest.py) with llama.cpp's
converter as installed by `make setup` (`python -m qlora_kit.converter install`), quantize them
with the binding, load the GGUFs in llama-cpp-python and compare with the Hugging Face model.
Everything runs offline. Tolerances are stated, with their reason, next to each assertion.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import kit_root
from qlora_kit import converter, quantize
from qlora_kit.config import TinyModel, load_recipe
from qlora_kit.rows import DataError

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
    """The kit's own loader (see qlora_kit.gguf_runtime for why extra buffer types are off)."""
    from qlora_kit.gguf_runtime import open_gguf

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


def run_stage(root: Path, types: list[str]):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_KIT_ROOT", str(root))
        recipe = load_recipe("tiny", {"quantize.types": types})
        return quantize.run(recipe, {"quantize.types": types})


def stage_root(tmp_path_factory, name: str, merged_from: Path) -> Path:
    root = kit_root(tmp_path_factory.mktemp(name))
    shutil.copytree(merged_from, root / "models" / "tiny" / "merged")
    return root


def partials(root: Path) -> list[Path]:
    return sorted((root / "models" / "tiny").glob("gguf.partial-*"))


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_mod():
    return converter.import_gguf()  # the sdist's gguf-py; fails with `make setup` advice if absent


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_llama):
    root = stage_root(tmp_path_factory, "q-llama", tiny_llama)
    # a leftover of an interrupted run: the stage must clear it, not leave it beside gguf/
    stale = root / "models" / "tiny" / "gguf.partial-999999"
    stale.mkdir()
    (stale / "model-f16.gguf").write_bytes(b"half a file")
    facts = run_stage(root, ["f16", "q8_0", "q4_k_m"])
    return root, facts


@pytest.fixture(scope="module")
def neox_run(tmp_path_factory, tiny_neox):
    root = stage_root(tmp_path_factory, "q-neox", tiny_neox)
    return root, run_stage(root, ["f16", "q4_k_m"])


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
    assert quantize.check_types("q4_k_m", ok)["ok"]
    # a Q8_0 that llama.cpp picks on purpose (rows a multiple of 256) is not a fallback
    on_purpose = {**ok, "matrices": {**ok["matrices"], "blk.0.attn_v.weight": {"type": "Q8_0", "ncols": 4096}}}
    assert quantize.check_types("q4_k_m", on_purpose)["fallback_tensors"] == {}
    fell = {**ok, "tensor_types": {"F32": 5, "Q4_K": 1, "Q5_0": 12},
            "matrices": {"blk.0.attn_q.weight": {"type": "Q5_0", "ncols": 128},
                         "output.weight": {"type": "Q8_0", "ncols": 128},
                         "token_embd.weight": {"type": "Q4_K", "ncols": 256}}}
    with pytest.raises(quantize.QuantizeError, match=r"2 matrices fell back.*blk\.0\.attn_q\.weight=Q5_0"):
        quantize.check_types("q4_k_m", fell)
    with pytest.raises(quantize.QuantizeError, match="no Q8_0 tensor"):
        quantize.check_types("q8_0", {**ok, "tensor_types": {"F16": 16}})


def test_missing_merged_model_is_a_clear_error(tmp_path):
    root = kit_root(tmp_path / "root")
    with pytest.raises(DataError, match=r"merged.*run `qlora-kit merge --recipe tiny`"):
        run_stage(root, ["f16"])
    assert not (root / "models" / "tiny" / "gguf").exists()


# --- end to end: Llama (sentencepiece) ------------------------------------------------------------

@pytest.mark.slow
def test_llama_f16_logits_match_hf(llama_run, tiny_llama):
    root, _ = llama_run
    ids = hf_ids(tiny_llama, PARITY_TEXT, bos=True)
    assert ids[0] == 1 and len(ids) > 30
    gg = gguf_logits(root / "models" / "tiny" / "gguf" / "model-f16.gguf", ids)
    stats = assert_f16_logits_match(hf_logits(tiny_llama, ids), gg)
    print(f"llama f16 vs HF: {stats}")


@pytest.mark.slow
def test_llama_quantized_files_manifest_and_k_quants(llama_run, tiny_llama, gguf_mod):
    root, facts = llama_run
    out = root / "models" / "tiny" / "gguf"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model-f16.gguf", "model-q4_k_m.gguf",
                                                     "model-q8_0.gguf"]
    assert not partials(root)  # the stale one from before the run is gone, and no new one is left
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "quantize" and man["config"] == {"quantize": {"types": ["f16", "q8_0", "q4_k_m"]}}
    assert man["facts"]["converter"] == converter.source_info()
    assert man["inputs"]["merged"]["model.safetensors"] == hashlib.sha256(
        (tiny_llama / "model.safetensors").read_bytes()).hexdigest()
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

    # the quantized files are still this model. Bounds: correlation of all logits with HF's;
    # measured 0.9999 (q8_0) and 0.988 (q4_k_m) on this untrained model, whose logits are small
    # (std 0.3) so quantization noise is large relative to them; unrelated weights give ~0.
    ids = hf_ids(tiny_llama, PARITY_TEXT, bos=True)
    hf = hf_logits(tiny_llama, ids)
    for qtype, floor in (("q8_0", 0.999), ("q4_k_m", 0.95)):
        corr = float(np.corrcoef(gguf_logits(out / f"model-{qtype}.gguf", ids).ravel(), hf.ravel())[0, 1])
        print(f"llama {qtype} vs HF: logit correlation {corr:.5f}")
        assert corr >= floor, (qtype, corr)


@pytest.mark.slow
def test_k_quant_fallback_fails_the_stage(tmp_path_factory, sample_rows):
    """hidden 128: no matrix row is a multiple of 256, llama.cpp falls back to Q5_0/Q8_0 (warning only)."""
    from qlora_kit.tiny_model import build, sample_texts

    narrow = build("llama", tmp_path_factory.mktemp("tiny-llama-128"), sample_texts(sample_rows),
                   TinyModel(hidden_size=128, intermediate_size=384))
    root = stage_root(tmp_path_factory, "q-narrow", narrow)
    with pytest.raises(quantize.QuantizeError, match=r"model-q4_k_m\.gguf: asked for q4_k_m.*fell back.*=Q5_0"):
        run_stage(root, ["f16", "q4_k_m"])
    assert not (root / "models" / "tiny" / "gguf").exists() and not partials(root)


@pytest.mark.slow
def test_failed_conversion_leaves_no_output(tmp_path_factory, tiny_llama):
    root = stage_root(tmp_path_factory, "q-broken", tiny_llama)
    cfg_path = root / "models" / "tiny" / "merged" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(converter.ConverterError, match=r"(?s)llama\.cpp converter failed.*NoSuchModelForCausalLM"):
        run_stage(root, ["f16", "q8_0"])
    assert not (root / "models" / "tiny" / "gguf").exists() and not partials(root)


# --- end to end: GPT-NeoX (byte-level BPE) ---------------------------------------------------------

@pytest.mark.slow
def test_neox_converts_with_both_shims_and_f16_matches_hf(neox_run, tiny_neox, gguf_mod):
    root, facts = neox_run
    shims = facts["shims"]
    assert shims["hparams_patches"]["rotary_pct"]["value"] == 0.5
    reg = shims["pre_tokenizer_registration"]
    assert reg["registered_as"] == "gpt-2" and len(reg["chkhsh"]) == 64
    f16 = root / "models" / "tiny" / "gguf" / "model-f16.gguf"
    reader = gguf_mod.GGUFReader(str(f16))
    # rotary_pct made it into the file: 0.5 x head_dim (256 / 4 heads = 64)
    assert reader.get_field("gptneox.rope.dimension_count").contents() == 32
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert facts["files"]["q4_k_m"]["tensor_types"].get("Q4_K", 0) > 0
    ids = hf_ids(tiny_neox, PARITY_TEXT, bos=False)  # Polyglot layout: no BOS
    stats = assert_f16_logits_match(hf_logits(tiny_neox, ids), gguf_logits(f16, ids))
    print(f"neox f16 vs HF: {stats}")


# --- tokenization parity ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_llama_cpp_tokenizes_like_hf(arch, llama_run, neox_run, tiny_llama, tiny_neox):
    """BOS is explicit on both sides: the Llama tokenizer has BOS <s>=1 and the kit prepends it
    itself (transformers 5 adds none); the GPT-NeoX (Polyglot) tokenizer has no BOS."""
    root, folder, bos = (llama_run[0], tiny_llama, True) if arch == "llama" else (neox_run[0], tiny_neox, False)
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(str(folder)).eos_token
    texts = SAMPLES + [f"답변입니다.{eos}"]  # an EOS written as text, as templates do: special=True parses it
    with gguf_model(root / "models/tiny/gguf/model-f16.gguf", vocab_only=True) as llm:
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
