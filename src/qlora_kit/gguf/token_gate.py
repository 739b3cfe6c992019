"""The GGUF's tokenizer against the ids the model was trained on, on every processed row.

llama.cpp tokenizes with its own code from the vocabulary the converter copied into the GGUF. A
model is only usable from llama.cpp if that code turns the training text into the training ids.
`token_gate` opens the f16 GGUF with `vocab_only` (no weights: thousands of rows take seconds)
and checks, for every row of `train.jsonl` and `val.jsonl`:

- training ids: the full training text - the BOS text when the recipe adds BOS, then prompt and
  completion, special tokens parsed - tokenized by llama.cpp equals the row's `input_ids`
  (a truncated row: its first len(input_ids) ids). With `preprocess.tokenize: separate` prompt and
  completion are tokenized one after the other, as preprocess did;
- plain fields, for sentencepiece vocabularies (a `tokenizer.model` in the merged folder): each
  non-empty instruction, input and output tokenized by sentencepiece and by llama.cpp (no special
  tokens parsed) agree.

Any mismatch raises `TokenizationMismatch` (exit 2) naming the file, the line and the first
differing tokens, decoded; the counts go to the parity report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_kit.config import Recipe
from qlora_kit.errors import DataError

FIELDS = ("instruction", "input", "output")


class TokenizationMismatch(DataError):
    """llama.cpp's tokenizer gives other ids than the ones the model was trained on."""


def _pieces(llm: Any, ids: list[int]) -> list[str]:
    return [llm._model.token_get_text(i) for i in ids]


def _first_diff(llm: Any, want: list[int], got: list[int]) -> str:
    j = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return (f"first difference at token {j}: trained on {_pieces(llm, want[j:j + 4])}, "
            f"llama.cpp gives {_pieces(llm, got[j:j + 4])}")


def _llama_ids(llm: Any, recipe: Recipe, bos_text: str, row: dict[str, Any]) -> list[int]:
    lead = bos_text if recipe.template.add_bos else ""
    if recipe.preprocess.tokenize == "separate":
        head = llm.tokenize((lead + row["prompt"]).encode("utf-8"), add_bos=False, special=True)
        tail = llm.tokenize(row["completion"].encode("utf-8"), add_bos=False, special=True) if row["completion"] else []
        return head + tail
    return llm.tokenize((lead + row["prompt"] + row["completion"]).encode("utf-8"), add_bos=False, special=True)


def token_gate(gguf: Path, merged: Path, processed: Path, recipe: Recipe, bos_text: str) -> dict[str, Any]:
    """Check every processed row (see the module docstring); return the counts for the report."""
    from qlora_kit.gguf.runtime import open_gguf
    from qlora_kit.text.examples import read_split

    sp = _sentencepiece(merged)
    counts = {"rows": 0, "rows_agree": 0, "fields": 0, "fields_agree": 0}
    first: str | None = None
    with open_gguf(gguf, vocab_only=True) as llm:
        for split in ("train", "val"):
            if not (processed / f"{split}.jsonl").is_file():
                continue
            for line, row in enumerate(read_split(processed, split), 1):
                want = row["input_ids"]
                got = _llama_ids(llm, recipe, bos_text, row)[:len(want)]
                counts["rows"] += 1
                if got == want:
                    counts["rows_agree"] += 1
                elif first is None:
                    first = f"{processed / (split + '.jsonl')}:{line} ({row.get('origin', '?')}): {_first_diff(llm, want, got)}"
                for f in FIELDS if sp is not None else ():
                    if not row.get(f):
                        continue
                    counts["fields"] += 1
                    a, b = sp.encode(row[f]), llm.tokenize(row[f].encode("utf-8"), add_bos=False, special=False)
                    if a == b:
                        counts["fields_agree"] += 1
                    elif first is None:
                        first = (f"{processed / (split + '.jsonl')}:{line} field {f!r}: sentencepiece and "
                                 f"llama.cpp disagree: {_first_diff(llm, a, b)}")
    counts["agreement"] = counts["rows_agree"] / counts["rows"] if counts["rows"] else 1.0
    if first is not None:
        raise TokenizationMismatch(
            f"{gguf.name}: llama.cpp tokenizes {counts['rows'] - counts['rows_agree']} of {counts['rows']} "
            f"training texts (and {counts['fields'] - counts['fields_agree']} of {counts['fields']} plain "
            f"fields) differently from the ids trained on; {first}")
    return counts


def _sentencepiece(merged: Path) -> Any:
    if not (merged / "tokenizer.model").is_file():
        return None
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(merged / "tokenizer.model"))
    return sp
