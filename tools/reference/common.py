"""Shared plumbing of the reference scripts: arguments, rows in, one result per row out (stdlib only).

Every script reads rows in the kit's normalized form (JSON lines or a JSON array of objects with
`instruction`, `input`, `output`; a missing `input` means "") and writes one JSON line per row,
in input order:

    {"row": i, "kept": true|false, "reason": null|"overlength", "input_ids": [...]|null,
     "labels": [...]|null, ...}

`row` is the 0-based position in the input file. Dropped rows carry `input_ids`/`labels` null.
Extra keys (token counts before truncation, the source's own prompt length) are for reading,
not part of the canonical stream that summary.json hashes (see `canonical_line`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tokenizer", required=True, type=Path,
                   help="tokenizer folder as the source loaded it (see tools/reference/README.md)")
    p.add_argument("--input", required=True, type=Path, help="rows: JSON lines or a JSON array")
    p.add_argument("--out", required=True, type=Path, help="one JSON line per input row")
    return p.parse_args()


def read_rows(path: Path) -> list[dict[str, str]]:
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        recs = json.loads(text)
    else:
        recs = [json.loads(line) for line in text.split("\n") if line.strip()]
    rows = []
    for i, r in enumerate(recs):
        for f in ("instruction", "output"):
            if not isinstance(r.get(f), str):
                sys.exit(f"{path}: row {i}: field {f!r} is missing or not a string")
        rows.append({"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]})
    return rows


def write_results(path: Path, results: Iterable[dict[str, Any]]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def result(row: int, kept: bool, reason: str | None, input_ids: list[int] | None,
           labels: list[int] | None, **extra: Any) -> dict[str, Any]:
    return {"row": row, "kept": kept, "reason": reason, "input_ids": input_ids, "labels": labels, **extra}


# --- the canonical stream that summary.json hashes (the tests compute the same from the kit) ---

def canonical_line(row: int, kept: bool, reason: str | None, input_ids: list[int] | None,
                   labels: list[int] | None) -> str:
    return json.dumps([row, kept, reason, input_ids, labels], separators=(",", ":")) + "\n"


def iter_results(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def block_hashes(results: list[dict[str, Any]], size: int) -> list[str]:
    """The first 16 hex digits of the stream's sha256 over each block of `size` rows."""
    return [stream_sha256(results[i:i + size])[:16] for i in range(0, len(results), size)]


def stream_sha256(results: Iterable[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in results:
        h.update(canonical_line(r["row"], r["kept"], r["reason"], r["input_ids"], r["labels"]).encode())
    return h.hexdigest()
