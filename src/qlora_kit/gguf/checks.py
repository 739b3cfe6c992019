"""What a GGUF must hold: tensor types (no silent K-quant fallback) and prompt metadata."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any
from qlora_kit.config import Recipe
from qlora_kit.errors import DataError


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
    """A GGUF file is not what the recipe asked for, or does not behave like the merged model."""


def describe(path: Path, gguf: Any) -> dict[str, Any]:
    """Size, sha256, tensor count per GGML type and the metadata that identifies the file."""
    from qlora_kit.artifacts import sha256_file

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


def merged_chat_template(merged: Path) -> str:
    """The chat template the merge stage wrote (transformers 5 saves it as chat_template.jinja)."""
    jinja = merged / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = json.loads((merged / "tokenizer_config.json").read_text(encoding="utf-8"))
    if isinstance(cfg.get("chat_template"), str):
        return cfg["chat_template"]
    raise DataError(f"{merged}: no chat template (chat_template.jinja); the folder was not written by "
                    "`qlora-kit merge`")


def check_metadata(path: Path, gguf: Any, want: dict[str, Any]) -> dict[str, Any]:
    """The GGUF's prompt metadata equals the merged tokenizer's; raises QuantizeError naming keys."""
    reader = gguf.GGUFReader(str(path))

    def field(key: str) -> Any:
        f = reader.get_field(key)
        return f.contents() if f is not None else None

    found = {k: field(k) for k in want}
    wrong = {k: (want[k], found[k]) for k in want if found[k] != want[k]}
    if wrong:
        raise QuantizeError(f"{path.name}: metadata differs from the merged tokenizer: " + "; ".join(
            f"{k} = {g!r:.200}, expected {w!r:.200}" for k, (w, g) in wrong.items()))
    return {k: v for k, v in found.items() if k != "tokenizer.chat_template"} | {
        "tokenizer.chat_template": f"{len(found['tokenizer.chat_template'])} chars, equal to the merged folder's"}


def expected_metadata(recipe: Recipe, tok: Any, template: str) -> dict[str, Any]:
    want: dict[str, Any] = {"tokenizer.chat_template": template, "tokenizer.ggml.eos_token_id": tok.eos_id,
                            "tokenizer.ggml.add_bos_token": recipe.template.add_bos}
    if recipe.template.add_bos:
        want["tokenizer.ggml.bos_token_id"] = tok.bos_id
    return want
