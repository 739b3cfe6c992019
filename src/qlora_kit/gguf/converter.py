"""llama.cpp's own HF -> GGUF converter, pinned to the llama.cpp the `llama_cpp` binding was built from.

The converter (`convert_hf_to_gguf.py`, its `conversion/` package and `gguf-py/`) is not in the
llama-cpp-python wheel, but the llama-cpp-python sdist carries it under `vendor/llama.cpp/` at the
same llama.cpp commit as the C++ it compiles. So there is one pin: the installed llama-cpp-python
version. `install` takes that sdist (downloaded with pip, or given with --sdist) and extracts the
converter into `<sys.prefix>/share/qlora-kit/llama.cpp-<version>/`, atomically, with a
`SOURCE.json` recording the sdist's sha256 and the llama.cpp commit.

    python -m qlora_kit.gguf.converter install [--sdist PATH] [--force]   # `make setup` runs this
    python -m qlora_kit.gguf.converter locate                              # print the folder

`convert()` runs the converter in a subprocess whose `PYTHONPATH` puts the sdist's `gguf-py`
first, so the `gguf` package always matches the converter's commit (a PyPI `gguf` in the venv, if
any, loses; the child checks where `gguf` came from). `import_gguf()` does the same for this
process (quantize reads files back with that `GGUFReader`).

The child is this module's `_run` command, a thin wrapper that imports the converter module and
runs its `main()`. It adds two shims, each documented where it is defined and recorded in the
run's report (and so in the quantize manifest): the GPT-NeoX `rotary_pct` hparam that transformers
5 configs no longer carry (`hparams_patches`), and the BPE pre-tokenizer registration
(`register_pre_tokenizers`). The converter's files are never edited.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from importlib import metadata
from pathlib import Path
from typing import Any

DIST = "llama-cpp-python"
SCRIPT = "convert_hf_to_gguf.py"
# What the converter reads from the llama.cpp tree, relative to `vendor/llama.cpp/`: the script,
# the `conversion` package it imports, `gguf-py` (the `gguf` package at the same commit) and the
# chat templates a few model classes read from `models/templates/`. Nothing else is imported
# (the big `models/ggml-vocab-*.gguf` test vocabularies are only for arches we never convert).
TREE_FILES = ("convert_hf_to_gguf.py", "LICENSE")
TREE_DIRS = ("conversion/", "gguf-py/gguf/", "models/templates/")
GGUF_PY_FILES = ("gguf-py/pyproject.toml", "gguf-py/LICENSE", "gguf-py/README.md")
REQUIRED = ("convert_hf_to_gguf.py", "conversion/__init__.py", "conversion/base.py", "conversion/llama.py",
            "conversion/gptneox.py", "gguf-py/gguf/__init__.py", "gguf-py/gguf/gguf_reader.py")



class ConverterError(RuntimeError):
    """The converter is missing, does not match the binding, or failed."""


# --- where it lives ---------------------------------------------------------------------------

def binding_version() -> str:
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        raise ConverterError(f"{DIST} is not installed in {sys.prefix}; run `make setup`") from None


def install_dir(version: str | None = None) -> Path:
    return Path(sys.prefix) / "share" / "qlora-kit" / f"llama.cpp-{version or binding_version()}"


def _die_with_parent() -> None:
    """In the converter child: get SIGKILL when the stage process dies (Linux), so a killed
    quantize leaves no orphan converter writing into the removed temporary folder."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:  # not Linux: best effort
        pass


def locate() -> Path:
    """The installed converter folder for the binding's version, or a clear error."""
    version = binding_version()
    override = os.environ.get("LLAMA_CPP_DIR")  # the Docker image unpacks the same sdist to /opt/llama.cpp
    if override:
        d = Path(override)
        if not all((d / f).is_file() for f in REQUIRED):
            raise ConverterError(f"LLAMA_CPP_DIR={d} does not hold llama.cpp's converter ({', '.join(REQUIRED)})")
        return d
    d = install_dir(version)
    if not (d / "SOURCE.json").is_file() or not all((d / f).is_file() for f in REQUIRED):
        raise ConverterError(
            f"llama.cpp's converter for {DIST} {version} is not installed (expected {d}); run `make setup` "
            f"(or `python -m qlora_kit.gguf.converter install [--sdist PATH]`)")
    return d


def source_info() -> dict[str, Any]:
    src = locate() / "SOURCE.json"
    return json.loads(src.read_text(encoding="utf-8")) if src.is_file() else {"dir": str(src.parent)}


# --- install ----------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def download_sdist(version: str, dest: Path) -> Path:
    """`pip download` the sdist (never a wheel: wheels do not carry the converter)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{DIST}=={version}", "-d", str(dest)]
    print("converter: " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConverterError(f"pip download of {DIST}=={version} failed (exit {proc.returncode}):\n"
                             + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
    found = sorted(dest.glob("*.tar.gz"))
    if len(found) != 1:
        raise ConverterError(f"pip download left {[p.name for p in found]} in {dest}; expected one sdist")
    return found[0]


def _sdist_root(tf: tarfile.TarFile, sdist: Path) -> str:
    first = tf.next()
    if first is None:
        raise ConverterError(f"{sdist}: empty archive")
    return first.name.split("/", 1)[0]


def _sdist_version(tf: tarfile.TarFile, root: str, sdist: Path) -> str:
    try:
        pkg_info = tf.extractfile(f"{root}/PKG-INFO")
    except KeyError:
        pkg_info = None
    if pkg_info is None:
        raise ConverterError(f"{sdist}: no {root}/PKG-INFO; not a {DIST} sdist")
    for line in pkg_info.read().decode("utf-8", "replace").splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise ConverterError(f"{sdist}: PKG-INFO has no Version")


def _llama_cpp_commit(tf: tarfile.TarFile, root: str) -> str | None:
    """The vendored llama.cpp commit, from the submodule's git metadata the sdist ships (if any)."""
    try:
        head = tf.extractfile(f"{root}/.git/modules/vendor/llama.cpp/HEAD")
    except KeyError:
        return None
    text = head.read().decode().strip() if head else ""
    return text if len(text) == 40 and all(c in "0123456789abcdef" for c in text) else None


def _wanted(rel: str) -> bool:
    return rel in TREE_FILES or rel in GGUF_PY_FILES or rel.startswith(TREE_DIRS)


def install(sdist: Path | None = None, *, force: bool = False) -> Path:
    """Extract the converter from the pinned sdist; a no-op (no download) when already installed."""
    from qlora_kit.artifacts import atomic_dir, write_json

    version = binding_version()
    dest = install_dir(version)
    if not force:
        try:
            locate()
            print(f"converter: already installed at {dest}", flush=True)
            return dest
        except ConverterError:
            pass
    with tempfile.TemporaryDirectory(prefix="qlora-kit-sdist-") as tmp:
        sdist = Path(sdist) if sdist else download_sdist(version, Path(tmp))
        if not sdist.is_file():
            raise ConverterError(f"--sdist {sdist}: no such file")
        digest = _sha256(sdist)
        with tarfile.open(sdist, "r:gz") as tf, atomic_dir(dest) as out:
            root = _sdist_root(tf, sdist)
            got = _sdist_version(tf, root, sdist)
            if got != version:
                raise ConverterError(f"{sdist} is {DIST} {got} but the installed binding is {version}: the "
                                     "converter must come from the same llama.cpp commit as the binding")
            commit = _llama_cpp_commit(tf, root)
            prefix = f"{root}/vendor/llama.cpp/"
            n = 0
            for m in tf:
                if not m.name.startswith(prefix) or not m.isfile():
                    continue
                rel = m.name[len(prefix):]
                parts = Path(rel).parts
                if not _wanted(rel) or Path(rel).is_absolute() or ".." in parts or "__pycache__" in parts:
                    continue
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(m) as src:  # type: ignore[union-attr]
                    target.write_bytes(src.read())
                n += 1
            missing = [f for f in REQUIRED if not (out / f).is_file()]
            if missing:
                raise ConverterError(f"{sdist}: no {', '.join(missing)} under {prefix}; cannot install the converter")
            write_json(out / "SOURCE.json", {
                "package": DIST, "version": version, "sdist": sdist.name, "sdist_sha256": digest,
                "llama_cpp_commit": commit, "files": n,
                "contents": list(TREE_FILES) + list(TREE_DIRS) + list(GGUF_PY_FILES),
                "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
    print(f"converter: installed {n} files from {sdist.name} (sha256 {digest[:12]}…) into {dest}", flush=True)
    return dest


# --- using it ---------------------------------------------------------------------------------

def _gguf_is_ours(module: Any, d: Path) -> bool:
    return Path(module.__file__).resolve().is_relative_to((d / "gguf-py").resolve())


def import_gguf():
    """The sdist's `gguf` package (GGUFReader, GGMLQuantizationType), imported into this process."""
    d = locate()
    mod = sys.modules.get("gguf")
    if mod is None:
        sys.path.insert(0, str(d / "gguf-py"))
        try:
            import gguf as mod  # noqa: PLC0415
        finally:
            sys.path.remove(str(d / "gguf-py"))
    if not _gguf_is_ours(mod, d):
        raise ConverterError(f"`gguf` was already imported from {mod.__file__}, not from {d / 'gguf-py'}; "
                             "import qlora_kit.gguf.converter.import_gguf() before anything else imports gguf")
    return mod


def child_env(d: Path) -> dict[str, str]:
    """Environment for the converter subprocess: the sdist's gguf-py wins over any installed `gguf`."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # would make the converter skip its own gguf-py
    pkg_parent = str(Path(__file__).resolve().parents[1])  # so the child imports this same qlora_kit
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(d / "gguf-py"), str(d), pkg_parent, *rest])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"  # the converter reads a local folder; never let it reach the Hub
    return env


# the converter's line for each tensor it writes: "INFO:hf-to-gguf:blk.0.attn_q.weight, torch.float32 --> F16, ..."
TENSOR_LINE = re.compile(r"INFO:hf-to-gguf:\S+,\s+torch\.\w+ --> ")


def convert(model_dir: Path, outfile: Path, outtype: str = "f16", model_name: str | None = None,
            log: Path | None = None) -> dict[str, Any]:
    """Run llama.cpp's converter on a local HF folder; return what the run reported (shims used)
    and `tensors` (how many it wrote). Its log (a line per tensor) goes to `log` when given, else
    to stderr; QLORA_KIT_VERBOSE=1 streams it to stderr as well. A failure carries its last lines."""
    d = locate()
    with tempfile.TemporaryDirectory(prefix="qlora-kit-convert-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "qlora_kit.gguf.converter", "_run", "--report", str(report), "--",
               str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
        if model_name:
            cmd += ["--model-name", model_name]
        t0 = time.perf_counter()
        tail: deque[str] = deque(maxlen=40)
        echo = log is None or os.environ.get("QLORA_KIT_VERBOSE") == "1"
        tensors, last_note = 0, t0
        # streamed, not captured: converting a 13B model takes many minutes and logs each tensor
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(open(log, "w", encoding="utf-8")) if log is not None else None
            proc = stack.enter_context(subprocess.Popen(
                cmd, env=child_env(d), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                encoding="utf-8", errors="replace", preexec_fn=_die_with_parent))
            for line in proc.stdout:  # type: ignore[union-attr]
                if echo:
                    sys.stderr.write(line)
                if sink is not None:
                    sink.write(line)
                tail.append(line.rstrip("\n"))
                tensors += bool(TENSOR_LINE.match(line))
                if not echo and time.perf_counter() - last_note > 30:  # a long conversion shows it is alive
                    last_note = time.perf_counter()
                    print(f"quantize: converting to {outtype}: {tensors} tensors so far, "
                          f"{last_note - t0:.0f} s", file=sys.stderr, flush=True)
        seconds = round(time.perf_counter() - t0, 3)
        if proc.returncode != 0 or not outfile.is_file():
            raise ConverterError(f"llama.cpp converter failed on {model_dir} (exit {proc.returncode}):\n"
                                 + "\n".join(tail))
        facts = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
    facts.update(outtype=outtype, seconds=seconds, tensors=tensors)
    return facts


# --- the child: llama.cpp's converter with two shims ------------------------------

# Shim: BPE pre-tokenizer registration.
# Why: for a BPE tokenizer the converter hashes the token ids of a fixed probe text and looks the
# hash up in a table of known models (`get_vocab_base_pre`) to choose llama.cpp's pre-tokenizer;
# an unknown hash raises NotImplementedError("BPE pre-tokenizer was not recognized"). Any tokenizer
# trained by us (the tiny GPT-NeoX one), or a fine-tune with a grown vocabulary, has a new hash
# even when its pre-tokenizer is exactly a known one. Upstream registers such models the same way:
# `convert_hf_to_gguf_update.py` maps evilfreelancer/ruGPT3XL's own hash to "gpt-2". We do it at
# run time, only for a hash the converter does not know, and only when the folder's tokenizer.json
# declares the pre-tokenizer that the llama.cpp name implements; otherwise the error stands.
# tests/test_quantize.py checks llama.cpp tokenizes like the HF tokenizer after the registration.
PRE_TOKENIZER_BY_SPEC: tuple[tuple[str, dict[str, Any]], ...] = (
    # GPT-2 byte-level BPE, the shape of GPT-2's own tokenizer.json and of our tiny GPT-NeoX one:
    # no normalizer; a ByteLevel pre-tokenizer with GPT-2's split regex (use_regex) and no prefix
    # space; plain BPE merges. llama.cpp's "gpt-2" pre-tokenizer splits with that same regex.
    # A tokenizer with a normalizer or another split is not matched: the converter's error stands
    # until someone checks llama.cpp's tokenization against HF and adds an entry here.
    ("gpt-2", {"normalizer": None,
               "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
               "model": {"type": "BPE", "byte_fallback": False, "ignore_merges": False}}),
)


def tokenizer_spec(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    """The parts of tokenizer.json that decide how text is split before BPE merges."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    model = tokenizer_json.get("model") or {}
    norm = tokenizer_json.get("normalizer")
    return {"normalizer": None if norm is None else norm.get("type"),
            "pre_tokenizer": {k: pre.get(k) for k in ("type", "add_prefix_space", "use_regex")},
            "model": {"type": model.get("type"), "byte_fallback": bool(model.get("byte_fallback")),
                      "ignore_merges": bool(model.get("ignore_merges"))}}


def pre_tokenizer_for(model_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer name whose definition the folder's tokenizer.json matches."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    spec = tokenizer_spec(json.loads(path.read_text(encoding="utf-8")))
    return next((name for name, want in PRE_TOKENIZER_BY_SPEC if spec == want), None)


class _RecordingTokenizer:
    """Passes through to the tokenizer, remembering what `encode` returned (the probe's ids)."""

    def __init__(self, tok: Any):
        self._tok, self.encoded = tok, []

    def encode(self, *a: Any, **k: Any) -> Any:
        ids = self._tok.encode(*a, **k)
        self.encoded.append(ids)
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def register_pre_tokenizers(text_model_cls: Any, report: dict[str, Any]) -> None:
    """Wrap the converter's `get_vocab_base_pre`: a hash it does not know, from a tokenizer whose
    declared pre-tokenizer is one llama.cpp implements, is registered under that name."""
    original = text_model_cls.get_vocab_base_pre
    conv_log = logging.getLogger("hf-to-gguf")

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        rec = _RecordingTokenizer(tokenizer)
        level = conv_log.level
        conv_log.setLevel(logging.ERROR)  # its "not recognized" banner is misleading when we handle it
        try:
            return original(self, rec)
        except NotImplementedError:
            name = pre_tokenizer_for(self.dir_model)
            if name is None or not rec.encoded:
                raise
            # the converter's own hash formula (conversion/base.py, get_vocab_base_pre)
            chkhsh = hashlib.sha256(str(rec.encoded[0]).encode()).hexdigest()
            report["pre_tokenizer_registration"] = {
                "chkhsh": chkhsh, "registered_as": name,
                "reason": "hash not in llama.cpp's table; tokenizer.json declares this pre-tokenizer"}
            print(f"qlora-kit: pre-tokenizer hash {chkhsh} is unknown to llama.cpp; tokenizer.json declares "
                  f"the {name!r} pre-tokenizer, registered as {name!r}", file=sys.stderr, flush=True)
            return name
        finally:
            conv_log.setLevel(level)

    text_model_cls.get_vocab_base_pre = get_vocab_base_pre


# Shim: GPT-NeoX `rotary_pct`.
# Why: the converter's GPTNeoXModel reads `hparams["rotary_pct"]` (conversion/gptneox.py,
# set_gguf_parameters) for the rope dimension count, but it builds `hparams` with
# `AutoConfig.from_pretrained(...).to_dict()` (conversion/base.py, load_hparams), and transformers 5
# folds `rotary_pct` into `rope_parameters.partial_rotary_factor` (configuration_gpt_neox.py pops
# it), so every GPT-NeoX config dies with KeyError 'rotary_pct', even one whose config.json still
# says rotary_pct (a staged copy of the folder with the key added does not help for that reason).
# We add the key back with the value transformers itself resolved and runs the model with.
# tests/test_quantize.py checks the GGUF's rope dimension count and the logits against HF.
def hparams_patches(hparams: dict[str, Any]) -> dict[str, Any]:
    """Keys the pinned converter reads that transformers 5's `to_dict()` no longer has."""
    patches: dict[str, Any] = {}
    if "GPTNeoXForCausalLM" in (hparams.get("architectures") or []) and "rotary_pct" not in hparams:
        rope = hparams.get("rope_parameters") or {}
        factor = hparams.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
        if factor is not None:  # else the converter's own KeyError stands
            patches["rotary_pct"] = float(factor)
    return patches


def register_hparams_patches(model_base_cls: Any, report: dict[str, Any]) -> None:
    original = model_base_cls.load_hparams  # a staticmethod: the plain function

    def load_hparams(dir_model: Path, is_mistral_format: bool) -> dict[str, Any]:
        hparams = original(dir_model, is_mistral_format)
        if isinstance(hparams, dict):
            for key, value in hparams_patches(hparams).items():
                hparams[key] = value
                report.setdefault("hparams_patches", {})[key] = {
                    "value": value, "from": "rope_parameters.partial_rotary_factor (transformers 5 config)"}
        return hparams

    model_base_cls.load_hparams = staticmethod(load_hparams)


def _run(report_path: Path, converter_args: list[str]) -> int:
    d = locate()
    # as when the script runs itself: its folder first (it finds `conversion` and models/ there)
    sys.path[:0] = [str(d / "gguf-py"), str(d)]
    import gguf  # noqa: PLC0415

    if not _gguf_is_ours(gguf, d):
        raise ConverterError(f"the converter would use gguf from {gguf.__file__}, not {d / 'gguf-py'}")
    import convert_hf_to_gguf  # noqa: PLC0415  (the script; importing it runs nothing)
    from conversion.base import ModelBase, TextModel  # noqa: PLC0415

    report: dict[str, Any] = {"converter": str(d), "gguf_py": str(Path(gguf.__file__).parent)}
    register_hparams_patches(ModelBase, report)
    register_pre_tokenizers(TextModel, report)
    sys.argv = [str(d / SCRIPT), *converter_args]
    convert_hf_to_gguf.main()
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_kit.gguf.converter", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="extract the converter from the pinned llama-cpp-python sdist")
    p.add_argument("--sdist", type=Path, default=None, help="use this sdist instead of `pip download`")
    p.add_argument("--force", action="store_true", help="reinstall even if present")
    sub.add_parser("locate", help="print the installed converter folder")
    r = sub.add_parser("_run", help=argparse.SUPPRESS)  # the subprocess convert() starts
    r.add_argument("--report", type=Path, required=True)
    r.add_argument("converter_args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    try:
        if a.command == "install":
            install(a.sdist, force=a.force)
        elif a.command == "locate":
            print(locate())
        else:
            args = a.converter_args[1:] if a.converter_args[:1] == ["--"] else a.converter_args
            return _run(a.report, args)
    except ConverterError as e:
        print(f"qlora-kit converter: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
