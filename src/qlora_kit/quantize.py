"""Quantize stage: GGUF export with llama.cpp's own converter and quantizer, checked against HF.

    qlora-kit quantize --recipe tiny          (dvc: quantize@tiny)

Reads `models/NAME/merged` (the merge stage's folder: safetensors, tokenizer with the recipe's chat
template) and `data/NAME/processed`; writes `models/NAME/gguf/` (`model-<type>.gguf` and an Ollama
`model-<type>.Modelfile` for every type in `quantize.types`, plus `manifest.json`),
`reports/NAME/gguf_parity.json` and the converter's own log, `reports/NAME/quantize_converter.log`
(streamed to the terminal as well with QLORA_KIT_VERBOSE=1):

1. `convert_hf_to_gguf.py --outtype f16` (llama.cpp's converter, installed from the pinned
   llama-cpp-python sdist by `make setup`; see `converter.py`) -> `model-f16.gguf`. The converter
   copies the merged folder's `chat_template.jinja` into `tokenizer.chat_template` and
   `add_bos_token` (written explicitly by merge) into `tokenizer.ggml.add_bos_token`; the stage
   checks both and the BOS/EOS ids against the recipe's tokenizer and fails on any difference.
1b. the token gate (gguf/token_gate.py): llama.cpp, reading the f16 file's vocabulary only,
   tokenizes every processed training and validation text (BOS text + prompt + completion, special
   tokens parsed) to exactly the `input_ids` preprocess wrote, and agrees with sentencepiece on
   every plain field where the vocabulary is sentencepiece's; a mismatch stops the stage (exit 2)
   naming the row and the first differing tokens;
2. every other type (q8_0, q4_0, q4_k_m, q5_k_m, q6_k) from that f16 file with the binding's
   `llama_model_quantize`, the same code as llama.cpp's `llama-quantize` (metadata is copied);
3. each file read back with the sdist's `GGUFReader`: size, sha256, tensors per GGML type. The
   stage fails if a file lacks the tensor type it was asked for, or if llama.cpp fell back to
   another type for any weight (K-quants need rows that are multiples of 256; llama.cpp only warns
   and quietly writes Q5_0/Q5_1/Q8_0 instead, which would make the size/quality table lie);
4. parity per file on `quantize.parity_rows` validation rows (training rows where the recipe holds
   none out): llama.cpp tokenizes the inference prompt exactly as HF does, BOS included as the GGUF
   metadata says, through the plain prompt and through the embedded chat template (rendered by
   llama-cpp-python's Jinja2ChatFormatter); the EOS text maps to the EOS id; mean KL divergence and
   top-1 agreement of the next-token distributions vs the merged HF model (fp32) at every position;
   perplexity on the completion tokens. `quantize.max_mean_kl` / `quantize.min_top1` gate each type.
   Where the fp32 HF model does not fit in RAM, the f16 GGUF is the reference (and says so);
5. an Ollama Modelfile beside each GGUF: its TEMPLATE (Go template syntax) renders the recipe's
   inference prompt, PARAMETER stop the EOS text and `quantize.stop`, and the recipe's generation
   settings (`eval`: greedy -> temperature 0; repeat_penalty, num_predict).

Where this transformers version's configs or our own tokenizers trip the pinned converter, the
converter wrapper applies a documented shim (GPT-NeoX `rotary_pct`, BPE pre-tokenizer
registration; see `converter.py`); the ones that fired are recorded under `facts.shims`.

The whole folder is written atomically: a failed conversion, check or parity gate leaves no `gguf/`
folder (the parity report is still written, so the failure can be read).
If `f16` is not among the requested types, the f16 file is an intermediate: hashed, then removed.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from qlora_kit.config import Recipe
from qlora_kit.errors import DataError
from qlora_kit.gguf.checks import QuantizeError, check_metadata, check_types, describe, expected_metadata, merged_chat_template
from qlora_kit.scoring.logprobs import completion_ppl, distribution_parity, gguf_logprobs
from qlora_kit.gguf.modelfile import modelfile

# recipe name -> llama_ftype constant of the binding (llama.h); f16 comes from the converter.
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


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


# --- metadata: what llama.cpp needs to prompt the model the way the recipe does ------------------


# --- Ollama Modelfile ----------------------------------------------------------------------------


# --- parity against the merged HF model ----------------------------------------------------------


def hf_reference(recipe: Recipe, merged: Path, rows: list[dict[str, Any]]) -> tuple[list | None, dict[str, Any]]:
    """Log-probabilities of the merged model (fp32, CPU) at every position of every row, if it fits."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kit.scoring.logprobs import fits_in_memory
    from qlora_kit.weights.safetensors_io import tensor_shapes

    n_params = sum(math.prod(s) for s, _ in tensor_shapes(merged).values())
    ok, mem = fits_in_memory(n_params)
    if not ok:
        return None, {"hf": f"skipped: the fp32 model needs ~{mem['need_bytes'] / 2**30:.1f} GiB, "
                            f"{mem['available_bytes'] / 2**30:.1f} GiB available", **mem}
    man = json.loads((merged / "manifest.json").read_text()) if (merged / "manifest.json").is_file() else {}
    trust = bool(man.get("config", {}).get("model", {}).get("trust_remote_code", False))
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32, trust_remote_code=trust).eval()
    out = []
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0].double()
            out.append(torch.log_softmax(logits, -1).numpy())
    del model
    return out, {"hf": "merged model, fp32, transformers", **mem}


def tokenization_parity(llm: Any, recipe: Recipe, tok: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """llama.cpp vs HF token ids on the inference prompts, BOS and EOS included.

    - prompt: `render_inference` text tokenized by llama.cpp adding BOS as the GGUF metadata says,
      vs the kit's ids (BOS id iff template.add_bos, then the text without special tokens added);
    - chat: the GGUF's own chat template rendered by llama-cpp-python's Jinja2ChatFormatter and
      tokenized as its chat completion does (no BOS added: the template carries it), same ids;
    - eos: the EOS id is the recipe's, and the EOS text in a string tokenizes to it.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from qlora_kit.text.templates import chat_messages, render_inference

    # built the way Llama() builds its handler for a GGUF's template (token texts from the vocab)
    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                              eos_token=llm._model.token_get_text(llm.token_eos()),
                              bos_token=llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else "")
    bos = [tok.bos_id] if recipe.template.add_bos else []
    bad: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        text = render_inference(recipe.template, r, bos=tok.bos, eos=tok.eos)
        want = bos + tok.encode(text)
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        chat = fmt(messages=chat_messages(r)).prompt
        got_chat = llm.tokenize(chat.encode("utf-8"), add_bos=False, special=True)
        for kind, ids in (("prompt", got), ("chat_template", got_chat)):
            if ids != want:
                bad.append({"row": i, "via": kind, "text": text[:200], "hf": want[:64], "llama_cpp": ids[:64]})
    eos_ok = (llm.token_eos() == tok.eos_id
              and llm.tokenize(tok.eos.encode(), add_bos=False, special=True) == [tok.eos_id])
    bos_ok = not recipe.template.add_bos or llm.token_bos() == tok.bos_id
    return {"rows": len(rows), "mismatches": len(bad), "examples": bad[:3], "eos_id": llm.token_eos(),
            "eos_ok": eos_ok, "bos_ok": bos_ok, "ok": not bad and eos_ok and bos_ok}


def gguf_parity(recipe: Recipe, files: dict[str, Path], rows: list[dict[str, Any]], tok: Any,
                hf_ref: list | None, f16: Path) -> dict[str, Any]:
    """Tokenization and next-token parity of each GGUF in `files`; `f16` is the reference where
    the HF model did not fit (`hf_ref` None)."""
    from qlora_kit.gguf.runtime import open_gguf

    q = recipe.quantize
    n_ctx = max([512] + [len(r["input_ids"]) + 8 for r in rows])
    ref, ref_name = hf_ref, "merged HF model (fp32)"
    if ref is None:  # the HF model does not fit: the f16 GGUF stands in
        with open_gguf(f16, n_ctx=n_ctx, logits_all=True) as llm:
            ref = gguf_logprobs(llm, rows)
        ref_name = "model-f16.gguf (the fp32 HF model does not fit in RAM)"
    ref_ppl = completion_ppl(ref, rows)
    out: dict[str, Any] = {}
    for qtype, path in files.items():
        with open_gguf(path, n_ctx=n_ctx, logits_all=True) as llm:
            toks = tokenization_parity(llm, recipe, tok, rows)
            got = gguf_logprobs(llm, rows)
        ppl = completion_ppl(got, rows)
        res: dict[str, Any] = {"tokenization": toks, **distribution_parity(ref, got), "ppl": ppl,
                               "ppl_reference": ref_ppl, "ppl_ratio": ppl / ref_ppl,
                               "max_mean_kl": q.max_mean_kl[qtype], "min_top1": q.min_top1[qtype]}
        is_ref = hf_ref is None and qtype == "f16"
        res["passed"] = toks["ok"] and (is_ref or (res["mean_kl"] <= res["max_mean_kl"]
                                                   and res["top1_agreement"] >= res["min_top1"]))
        if is_ref:
            res["note"] = "the reference itself: KL/top-1 not gated"
        out[qtype] = res
    return {"reference": ref_name, "types": out, "passed": all(v["passed"] for v in out.values())}


def _failures(report: dict[str, Any]) -> str:
    msgs = []
    for qtype, r in report["types"].items():
        if r["passed"]:
            continue
        t = r["tokenization"]
        if not t["ok"]:
            msgs.append(f"{qtype}: llama.cpp tokenizes differently from HF ({t['mismatches']} prompt mismatches, "
                        f"eos ok {t['eos_ok']}, bos ok {t['bos_ok']})")
        if r["mean_kl"] > r["max_mean_kl"]:
            msgs.append(f"{qtype}: mean KL {r['mean_kl']:.3g} > quantize.max_mean_kl.{qtype} {r['max_mean_kl']}")
        if r["top1_agreement"] < r["min_top1"]:
            msgs.append(f"{qtype}: top-1 agreement {r['top1_agreement']:.3f} < quantize.min_top1.{qtype} "
                        f"{r['min_top1']}")
    return "; ".join(msgs)


def _require_inputs(recipe: Recipe, merged: Path, processed: Path) -> None:
    if not (merged / "config.json").is_file():
        raise DataError(f"{merged}: no merged model (config.json missing); run `qlora-kit merge --recipe "
                        f"{recipe.name}` first")
    if not (processed / "train.jsonl").is_file():
        raise DataError(f"{processed}: no processed data for the parity check; run `qlora-kit preprocess "
                        f"--recipe {recipe.name}` first")


def _quantize_all(f16: Path, out: Path, types: list[str], gguf: Any, st: Any) -> dict[str, Any]:
    """Every other type from the f16 file, then each file read back and its tensor types checked."""
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
    st.lap("verify")
    return files


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from qlora_kit import layout
    from qlora_kit.gguf import converter
    from qlora_kit.artifacts import StageRun, atomic_dir, write_json
    from qlora_kit.gguf.token_gate import token_gate
    from qlora_kit.text.examples import parity_rows
    from qlora_kit.text.tokenizer import load_tokenizer

    paths = layout.paths(recipe.name)
    st = StageRun("quantize", recipe, overrides)
    merged = paths.merged
    _require_inputs(recipe, merged, paths.processed)
    types = list(dict.fromkeys(recipe.quantize.types))
    gguf = converter.import_gguf()  # fails early, with `make setup` advice, if not installed
    # installed_at says when `make setup` ran, not what made these files: the run report keeps it
    source = converter.source_info()
    st.volatile["converter_installed_at"] = source.pop("installed_at", None)
    st.facts["converter"] = source
    st.add_input("merged", merged)
    st.add_input("processed", paths.processed)
    template = merged_chat_template(merged)
    tok = load_tokenizer(merged, recipe.template)
    rows, split = parity_rows(paths.processed, recipe.quantize.parity_rows)
    st.lap("hash_inputs")
    hf_ref, ref_info = hf_reference(recipe, merged, rows)
    st.lap("hf_reference")

    with atomic_dir(paths.gguf) as out:
        f16 = out / "model-f16.gguf"
        # --model-name: general.name says which recipe made the file, not "merged"
        paths.reports.mkdir(parents=True, exist_ok=True)
        log = paths.reports / "quantize_converter.log"
        conv = converter.convert(merged, f16, outtype="f16", model_name=recipe.name, log=log)
        st.volatile["convert_seconds"] = conv.pop("seconds", None)
        print(f"quantize: llama.cpp converter: {conv['tensors']} tensors to f16 in "
              f"{st.volatile['convert_seconds']:.1f} s (its log: {log})", flush=True)
        st.facts["convert"] = conv
        # the converter shims (converter.py) that fired for this model, by name
        st.facts["shims"] = {k: conv[k] for k in ("hparams_patches", "pre_tokenizer_registration") if k in conv}
        st.facts["metadata"] = check_metadata(f16, gguf, expected_metadata(recipe, tok, template))
        st.lap("convert_f16")
        st.facts["token_gate"] = token_gate(f16, merged, paths.processed, recipe, tok.bos)
        st.lap("token_gate")

        files = _quantize_all(f16, out, types, gguf, st)

        report = gguf_parity(recipe, {t: out / f"model-{t}.gguf" for t in types}, rows, tok, hf_ref, f16)
        report = {"rows": len(rows), "split": split, **ref_info, "token_gate": st.facts["token_gate"], **report}
        write_json(paths.reports / "gguf_parity.json", report)
        st.lap("parity")
        if not report["passed"]:
            raise QuantizeError(f"GGUF parity failed: {_failures(report)} (see {paths.reports / 'gguf_parity.json'})")

        _finish(recipe, st, out, types, files, report, tok)
    st.write_run_report(paths.reports)
    return st.facts


def _finish(recipe: Recipe, st: Any, out: Path, types: list[str], files: dict[str, Any],
            report: dict[str, Any], tok: Any) -> None:
    """Modelfiles, the f16 intermediate's record, the manifest: the passed folder's last files."""
    from qlora_kit.artifacts import sha256_file, write_json

    f16 = out / "model-f16.gguf"
    for qtype in types:
        name = f"model-{qtype}.gguf"
        (out / f"model-{qtype}.Modelfile").write_text(
            modelfile(recipe, name, recipe.template.add_bos, tok.bos, tok.eos), encoding="utf-8")
    if "f16" not in types:  # intermediate only: recorded, not shipped
        st.facts["intermediate"] = {"file": f16.name, "size_bytes": f16.stat().st_size,
                                    "sha256": sha256_file(f16)}
        f16.unlink()
    st.facts["files"] = files
    st.facts["parity"] = {t: {k: r[k] for k in ("mean_kl", "top1_agreement", "ppl", "passed")}
                          for t, r in report["types"].items()}
    for qtype, info in files.items():
        print(f"quantize: {info['file']}: {info['size_bytes'] / 2**20:.1f} MiB, {info['tensor_types']}", flush=True)
    write_json(out / "manifest.json", st.manifest())
