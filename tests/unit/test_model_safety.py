"""Hostile model folders: no pickle weights and no model-shipped code unless the recipe opts in (issue 8).

Run: python -m pytest -q tests/test_model_safety.py -p no:cacheprovider

Every hostile folder is built here in a temporary directory from the session's tiny Llama:
custom code via `auto_map` (config.json or tokenizer_config.json) with Python files that would
write a marker file if anything imported them, and weights only as `pytorch_model.bin` written by
`torch.save` (plus a pickle whose unpickling would write a marker). `model_safety.check` must
refuse them with a message that says why, and the kit's load paths (fetch, train, merge,
evaluate) must call it before loading anything: the marker files prove no code ran.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from support.repo import BIN, kit_env, kit_root
from qlora_kit.config import load_recipe
from qlora_kit.sources.model_safety import UnsafeModelError, check
from qlora_kit.errors import DataError
from qlora_kit.weights import lora_merge

TINY = load_recipe("tiny")
META = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _model_cfg(**over):
    return TINY.model.model_copy(update=over)


def _copy_meta(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in META:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    return dst


def _marker_code(marker: Path) -> str:
    # what a hostile repo would do at import time; here it only leaves evidence
    return (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('custom code ran')\n"
            "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilForCausalLM\n")


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "hostile code ran"


@pytest.fixture
def custom_code(tiny_llama, tmp_path, marker) -> Path:
    """The tiny model plus auto_map -> modeling_evil.py / configuration_evil.py."""
    d = tmp_path / "custom-code"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    for name in ("modeling_evil.py", "configuration_evil.py"):
        (d / name).write_text(_marker_code(marker))
    return d


@pytest.fixture
def pickle_only(tiny_llama, tmp_path) -> Path:
    """The tiny model's weights as pytorch_model.bin (torch.save), no safetensors."""
    import torch
    from safetensors.torch import load_file

    d = _copy_meta(tiny_llama, tmp_path / "pickle-only")
    torch.save(load_file(str(tiny_llama / "model.safetensors")), d / "pytorch_model.bin")
    return d


class _Payload:
    """Unpickling this calls Path.write_text(marker): the classic pickle attack, made harmless."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle payload ran"))


# --- check() on its own ---------------------------------------------------------------------------

def test_a_plain_safetensors_folder_passes(tiny_llama, tmp_path):
    facts = check(tiny_llama, _model_cfg())
    assert facts == {"weights": "safetensors", "weight_files": ["model.safetensors"], "custom_code": False,
                     "python_files": []}
    # a folder without weights has nothing to unpickle: not refused here (the loader says what is missing)
    assert check(_copy_meta(tiny_llama, tmp_path / "no-weights"), _model_cfg())["weights"] == "none"


def test_pickle_only_weights_are_refused_and_the_message_says_why(pickle_only):
    with pytest.raises(UnsafeModelError) as e:
        check(pickle_only, _model_cfg())
    msg = str(e.value)
    assert isinstance(e.value, DataError)  # so the CLI exits 2
    assert str(pickle_only) in msg and "pytorch_model.bin" in msg
    assert "executes code" in msg and "model.allow_pickle: true" in msg and "safetensors" in msg


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "model.pkl", "model.ckpt", "shards/part-0.bin"])
def test_every_pickle_suffix_counts(tiny_llama, tmp_path, name):
    d = _copy_meta(tiny_llama, tmp_path / "m")
    (d / name).parent.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(b"\x80\x04N.")  # a valid pickle of None; never opened by check()
    with pytest.raises(UnsafeModelError, match=name.replace(".", r"\.")):
        check(d, _model_cfg())


def test_pickle_is_loaded_only_when_the_recipe_opts_in(pickle_only):
    from qlora_kit import train

    assert check(pickle_only, _model_cfg(allow_pickle=True))["weights"] == "pickle"
    recipe = load_recipe("tiny", {"model.allow_pickle": True, "qlora.bits": 16, "qlora.double_quant": False})
    model = train.load_base(recipe, pickle_only, "cpu")  # the opt-in path really loads the .bin
    assert model.config.model_type == "llama"


def test_safetensors_next_to_pickles_pass_and_the_pickles_are_never_opened(tiny_llama, tmp_path, marker):
    import pickle

    d = tmp_path / "both"
    shutil.copytree(tiny_llama, d)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    (d / "training_args.bin").write_bytes(pickle.dumps(_Payload(marker)))
    assert check(d, _model_cfg())["weights"] == "safetensors"


def test_auto_map_without_trust_remote_code_is_refused(custom_code):
    with pytest.raises(UnsafeModelError) as e:
        check(custom_code, _model_cfg())
    msg = str(e.value)
    assert "custom code" in msg and "config.json auto_map" in msg and "AutoModelForCausalLM" in msg
    assert "modeling_evil.py" in msg and "model.trust_remote_code: true" in msg


def test_auto_map_in_tokenizer_config_is_refused_too(tiny_llama, tmp_path, marker):
    d = tmp_path / "custom-tokenizer"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "tokenization_evil.py").write_text(_marker_code(marker))
    with pytest.raises(UnsafeModelError, match=r"tokenizer_config\.json auto_map .*tokenization_evil\.py"):
        check(d, _model_cfg())


def test_auto_map_passes_when_the_recipe_trusts_remote_code(custom_code):
    facts = check(custom_code, _model_cfg(trust_remote_code=True))
    assert facts["custom_code"] and facts["python_files"] == ["configuration_evil.py", "modeling_evil.py"]


@pytest.mark.parametrize("problem, text", [
    ("no config", r"not a model folder \(no config\.json\)"),
    ("bad config", r"config\.json: not valid UTF-8 JSON"),
    ("config not an object", r"config\.json: expected a JSON object, got list"),
])
def test_not_a_model_folder_is_a_clear_error(tiny_llama, tmp_path, problem, text):
    d = _copy_meta(tiny_llama, tmp_path / "m")
    shutil.copyfile(tiny_llama / "model.safetensors", d / "model.safetensors")
    if problem == "no config":
        (d / "config.json").unlink()
    elif problem == "bad config":
        (d / "config.json").write_text('{"model_type": "llama",')
    else:
        (d / "config.json").write_text("[]")
    with pytest.raises(UnsafeModelError, match=text):
        check(d, _model_cfg())


# --- the load paths call it before loading anything --------------------------------------------------

def test_train_and_merge_loaders_refuse_custom_code_and_pickles(custom_code, pickle_only):
    from qlora_kit import train

    r16 = load_recipe("tiny", {"qlora.bits": 16, "qlora.double_quant": False})
    for folder, text in ((custom_code, "custom code"), (pickle_only, "pickle")):
        with pytest.raises(UnsafeModelError, match=text):
            train.load_base(r16, folder, "cpu")
        with pytest.raises(UnsafeModelError, match=text):
            lora_merge.load_base_for_merge(TINY, folder)


def test_evaluate_refuses_a_hostile_base_before_loading_anything(custom_code, tmp_path, monkeypatch):
    from qlora_kit import evaluate, layout

    root = kit_root(tmp_path / "kit")
    monkeypatch.setenv("QLORA_KIT_ROOT", str(root))
    shutil.copytree(custom_code, layout.paths("tiny").base)
    with pytest.raises(UnsafeModelError, match=r"models/tiny/base: the model ships custom code"):
        evaluate.run(TINY)


def _fetch(root: Path, model_dir: Path, *sets: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "qlora-kit"), "fetch", "--recipe", "tiny", "--set", "model.source=local",
                           "--set", f"model.name={model_dir}", *sets], cwd=root, env=kit_env(root),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["custom_code", "pickle_only"])
def test_cli_fetch_of_a_hostile_local_model_exits_2_and_writes_nothing(kind, request, tmp_path):
    folder = request.getfixturevalue(kind)
    root = kit_root(tmp_path / "kit")
    out = _fetch(root, folder)
    assert out.returncode == 2, out.stderr
    assert "qlora-kit fetch: error: " in out.stderr and "Traceback" not in out.stderr
    assert ("model.trust_remote_code: true" if kind == "custom_code" else "model.allow_pickle: true") in out.stderr
    assert not (root / "models/tiny/base").exists() and not (root / "data/tiny/raw").exists()
    assert not list(root.glob("models/tiny/base.partial-*")) and not list(root.glob("data/tiny/raw.partial-*"))


def test_cli_fetch_of_a_pickle_model_succeeds_when_the_recipe_opts_in(pickle_only, tmp_path):
    root = kit_root(tmp_path / "kit")
    out = _fetch(root, pickle_only, "--set", "model.allow_pickle=true")
    assert out.returncode == 0, out.stderr
    assert (root / "models/tiny/base/pytorch_model.bin").is_file()

