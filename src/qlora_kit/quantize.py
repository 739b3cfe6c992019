"""Quantize stage: GGUF export with llama.cpp's own converter and quantizer.

    qlora-kit quantize --recipe tiny          (dvc: quantize@tiny)

Reads `models/NAME/merged` (a Hugging Face folder: config.json, safetensors, tokenizer) and writes
`models/NAME/gguf/model-<type>.gguf` for every type in `quantize.types` plus `manifest.json`:

1. `convert_hf_to_gguf.py --outtype f16` (llama.cpp's converter, installed from the pinned
   llama-cpp-python sdist by `make setup`; see `converter.py`) -> `model-f16.gguf`;
2. every other type (q8_0, q4_0, q4_k_m, q5_k_m, q6_k) from that f16 file with the binding's
   `llama_model_quantize`, the same code as llama.cpp's `llama-quantize`;
3. each file read back with the sdist's `GGUFReader`: size, sha256, tensors per GGML type. The
   stage fails if a file lacks the tensor type it was asked for, or if llama.cpp fell back to
   another type for any weight (K-quants need rows that are multiples of 256; llama.cpp only warns
   and quietly writes Q5_0/Q5_1/Q8_0 instead, which would make the size/quality table lie).

Where this transformers version's configs or our own tokenizers trip the pinned converter, the
converter wrapper applies a documented shim (GPT-NeoX `rotary_pct`, BPE pre-tokenizer
registration; see `converter.py`); the ones that fired are recorded under `facts.shims`.

The whole folder is written atomically: a failed conversion or check leaves no `gguf/` folder.
If `f16` is not among the requested types, the f16 file is an intermediate: hashed, then removed.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from .config import Recipe
from .rows import DataError

# recipe name -> llama_ftype constant of the binding (llama.h); f16 comes from the converter.
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
# The GGML tensor type each file must contain: proof that llama.cpp did what was asked.
REQUIRED_TENSOR_TYPE = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0",
                        "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}
K_QUANTS = {"q4_k_m", "q5_k_m", "q6_k"}
QK_K = 256  # K-quant block: a matrix row (ncols, GGUF ne[0]) must be a multiple of it
# Where llama.cpp sends a matrix whose row length is not a multiple of 256 when a K type was
# asked for (`tensor_type_fallback` in src/llama-quant.cpp: Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0;
# the output matrix goes to Q8_0; F16 as the last resort). It logs a warning and goes on. A fallback
# is such a type on such a row length: llama.cpp also picks Q8_0 on purpose for a few tensors of
# other arches (Falcon's output, 8-expert MoE attention), whose rows are multiples of 256.
FALLBACK_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "F16", "BF16"}


class QuantizeError(RuntimeError):
    """A GGUF file is not what the recipe asked for."""


# --- quantize and read back ----------------------------------------------------------------------

def quantize_file(src: Path, dst: Path, qtype: str) -> None:
    """llama.cpp's quantizer through the binding (the code behind the `llama-quantize` tool)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[qtype])
    params.nthread = os.cpu_count() or 1  # rows are quantized independently: threads do not change bytes
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise QuantizeError(f"llama_model_quantize {src.name} -> {dst.name} ({qtype}) failed with code {rc}")


def describe(path: Path, gguf: Any) -> dict[str, Any]:
    """Size, sha256, tensor count per GGML type and the metadata that identifies the file."""
    from .artifacts import sha256_file

    reader = gguf.GGUFReader(str(path))
    types = Counter(t.tensor_type.name for t in reader.tensors)

    def field(key: str) -> Any:
        f = reader.get_field(key)
        return f.contents() if f is not None else None

    return {"file": path.name, "size_bytes": path.stat().st_size, "sha256": sha256_file(path),
            "tensors": len(reader.tensors), "tensor_types": dict(sorted(types.items())),
            "architecture": field("general.architecture"), "file_type": field("general.file_type"),
            "tokenizer_model": field("tokenizer.ggml.model"), "tokenizer_pre": field("tokenizer.ggml.pre"),
            "matrices": {t.name: {"type": t.tensor_type.name, "ncols": int(t.shape[0])}
                         for t in reader.tensors if len(t.shape) >= 2}}


def check_types(qtype: str, info: dict[str, Any]) -> dict[str, Any]:
    """Did llama.cpp write the type asked for? Raises QuantizeError with the offending tensors."""
    want = REQUIRED_TENSOR_TYPE[qtype]
    have = info["tensor_types"].get(want, 0)
    fallback = {n: m["type"] for n, m in info["matrices"].items()
                if qtype in K_QUANTS and m["ncols"] % QK_K and m["type"] in FALLBACK_TYPES}
    check = {"required_type": want, "required_count": have, "fallback_tensors": fallback,
             "ok": have > 0 and not fallback}
    if not check["ok"]:
        why = (f"{len(fallback)} matrices fell back to a non-K type: "
               + ", ".join(f"{n}={t}" for n, t in sorted(fallback.items())) if fallback
               else f"no {want} tensor at all (types: {info['tensor_types']})")
        raise QuantizeError(
            f"{info['file']}: asked for {qtype} but llama.cpp wrote something else; {why}. K-quants need every "
            "matrix row length (ncols) to be a multiple of 256; use q8_0/q4_0 for this model or fix its shape")
    return check


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from . import converter, layout
    from .artifacts import StageRun, atomic_dir, sha256_file, write_json

    paths = layout.paths(recipe.name)
    st = StageRun("quantize", recipe, overrides)
    merged = paths.merged
    if not (merged / "config.json").is_file():
        raise DataError(f"{merged}: no merged model (config.json missing); run `qlora-kit merge --recipe "
                        f"{recipe.name}` first")
    types = list(dict.fromkeys(recipe.quantize.types))
    gguf = converter.import_gguf()  # fails early, with `make setup` advice, if not installed
    st.facts["converter"] = converter.source_info()
    st.add_input("merged", merged)
    st.lap("hash_inputs")

    with atomic_dir(paths.gguf) as out:
        f16 = out / "model-f16.gguf"
        # --model-name: general.name says which recipe made the file, not "merged"
        conv = converter.convert(merged, f16, outtype="f16", model_name=recipe.name)
        st.facts["convert"] = conv
        # the converter shims (converter.py) that fired for this model, by name
        st.facts["shims"] = {k: conv[k] for k in ("hparams_patches", "pre_tokenizer_registration") if k in conv}
        st.lap("convert_f16")

        files: dict[str, Any] = {}
        for qtype in types:
            if qtype != "f16":
                quantize_file(f16, out / f"model-{qtype}.gguf", qtype)
                st.lap(f"quantize_{qtype}")
        for qtype in types:
            info = describe(out / f"model-{qtype}.gguf", gguf)
            info["check"] = check_types(qtype, info)
            del info["matrices"]  # per-tensor types only matter where the check names them
            files[qtype] = info
        if "f16" not in types:  # intermediate only: recorded, not shipped
            st.facts["intermediate"] = {"file": f16.name, "size_bytes": f16.stat().st_size,
                                        "sha256": sha256_file(f16)}
            f16.unlink()
        st.lap("verify")
        st.facts["files"] = files
        for qtype, info in files.items():
            print(f"quantize: {info['file']}: {info['size_bytes'] / 2**20:.1f} MiB, {info['tensor_types']}", flush=True)
        write_json(out / "manifest.json", st.manifest())
    return st.facts
