"""Preprocess stage: raw rows -> rendered, tokenized, label-masked train/val sets + a data report.

    qlora-kit preprocess --recipe tiny        (dvc: preprocess@tiny)

Reads `data/NAME/raw` (as listed in its manifest) and the tokenizer in `models/NAME/base`;
writes `data/NAME/processed/{train,val}.jsonl` and `reports/NAME/data_report.json`
(rows in / kept / dropped by reason; in == kept + dropped is asserted).

The row -> example logic (`tokenize_example`, `build`) is pure: the tokenizer is a parameter.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from .config import Preprocess, Recipe, Template
from .rows import DataError, SourceRow, fail, read_rows
from .templates import render

IGNORE = -100


class TokenizerLike(Protocol):
    bos_id: int | None
    eos_id: int
    pad_id: int
    bos: str
    eos: str

    def encode(self, text: str) -> list[int]: ...


@dataclass
class Example:
    row: dict[str, str]
    prompt: str
    completion: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    origin: str

    def to_json(self) -> dict[str, Any]:
        return {"origin": self.origin, **self.row, "prompt": self.prompt, "completion": self.completion,
                "prompt_len": self.prompt_len, "input_ids": self.input_ids, "labels": self.labels}


@dataclass
class Report:
    rows_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    kept: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    tokens: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        kept = sum(self.kept.values())
        dropped = sum(self.dropped.values())
        assert self.rows_in == kept + dropped, (self.rows_in, kept, dropped)
        return {"rows_in": self.rows_in, "kept": kept, "dropped": dropped,
                "dropped_by_reason": dict(sorted(self.dropped.items())), "kept_by_split": self.kept,
                "truncated": self.truncated, "tokens": self.tokens}


def tokenize_example(rendered_prompt: str, rendered_completion: str, tok: TokenizerLike, tpl: Template,
                     pp: Preprocess) -> tuple[list[int], list[int], int]:
    """ids, labels and prompt length (in tokens) for one rendered row, before length policy."""
    bos = [tok.bos_id] if (tpl.add_bos and tok.bos_id is not None) else []
    prompt_ids = bos + tok.encode(rendered_prompt)
    if pp.tokenize == "separate":
        ids = prompt_ids + tok.encode(rendered_completion)
    else:  # the sources' way: tokenize the whole text, mask the prompt's token count
        ids = bos + tok.encode(rendered_prompt + rendered_completion)
    n_prompt = len(prompt_ids)
    labels = list(ids) if pp.loss == "full" else [IGNORE] * n_prompt + ids[n_prompt:]
    if pp.mask_pad_in_labels:
        # DataCollatorForLanguageModeling sets labels[ids == pad] = -100; with pad == eos this
        # also masks the real EOS (llama2-koalpaca's quirk)
        labels = [IGNORE if i == tok.pad_id else lab for i, lab in zip(ids, labels)]
    return ids, labels, n_prompt


def counted_length(ids: list[int], pp: Preprocess) -> int:
    """The length the source compared with its limit: llama2-koalpaca counted one extra BOS,
    because it measured `tokenizer(text)` (which adds BOS) on a text that already began with one."""
    return len(ids) + (1 if pp.count_extra_bos else 0)


def length_policy(ids: list[int], labels: list[int], pp: Preprocess
                  ) -> tuple[list[int], list[int], Literal["keep", "truncate", "drop"]]:
    """Apply `max_length` / `overlength` to one example: keep it, cut it, or drop it."""
    if counted_length(ids, pp) <= pp.max_length:
        return ids, labels, "keep"
    if pp.overlength == "drop":
        return ids, labels, "drop"
    keep = pp.max_length - (1 if pp.count_extra_bos else 0)
    return ids[:keep], labels[:keep], "truncate"


def build(rows: list[SourceRow], tok: TokenizerLike, tpl: Template, pp: Preprocess
          ) -> tuple[dict[str, list[Example]], Report]:
    rep = Report(rows_in=len(rows))
    good: list[SourceRow] = []
    seen: set[tuple[str, str, str]] = set()
    for r in rows:
        if r.problem:
            if pp.on_bad_row == "error":
                raise fail(r)
            rep.dropped[r.problem] += 1
            continue
        key = (r.fields["instruction"], r.fields["input"], r.fields["output"])
        if pp.dedupe and key in seen:
            rep.dropped["duplicate"] += 1
            continue
        seen.add(key)
        good.append(r)
    if pp.shuffle_seed is not None:
        random.Random(pp.shuffle_seed).shuffle(good)

    def encode(r: SourceRow) -> Example | str:
        rend = render(tpl, r.fields, bos=tok.bos, eos=tok.eos)
        ids, labels, n_prompt = tokenize_example(rend.prompt, rend.completion, tok, tpl, pp)
        ids, labels, action = length_policy(ids, labels, pp)
        if action == "drop":
            return "overlength"
        if action == "truncate":
            rep.truncated += 1
        if all(lab == IGNORE for lab in labels):
            return "no_loss_tokens"
        return Example(dict(r.fields), rend.prompt, rend.completion, ids, labels, n_prompt,
                       f"{Path(r.file).name}:{r.line}")

    def split(items: list) -> tuple[list, list]:
        idx = list(range(len(items)))
        random.Random(pp.split_seed).shuffle(idx)
        # ceil, as datasets' train_test_split(test_size=...) sizes the test part (L2K, AG2 split with it)
        n_val = math.ceil(len(items) * pp.val_ratio - 1e-9) if pp.val_ratio > 0 else 0
        if pp.val_ratio > 0 and n_val == 0 and len(items) > 1:
            n_val = 1
        val_idx = set(idx[:n_val])
        return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]

    def encode_all(items: list[SourceRow]) -> list[Example]:
        out = []
        for r in items:
            ex = encode(r)
            if isinstance(ex, str):
                rep.dropped[ex] += 1
            else:
                out.append(ex)
        return out

    if pp.filter_after_split:  # llama2-koalpaca: split 99/1 first, then drop long rows per split
        tr, va = split(good)
        parts = {"train": encode_all(tr), "val": encode_all(va)}
    else:
        tr, va = split(encode_all(good))
        parts = {"train": tr, "val": va}
    rep.kept = {k: len(v) for k, v in parts.items()}
    rep.tokens = {
        k: sum(len(e.input_ids) for e in v) for k, v in parts.items()
    } | {f"{k}_loss": sum(lab != IGNORE for e in v for lab in e.labels) for k, v in parts.items()}
    return parts, rep


def raw_files(raw_dir: Path) -> list[tuple[Path, str, dict[str, str]]]:
    """(path, format, field mapping) of each data file fetch wrote, in order."""
    man = json.loads((raw_dir / "manifest.json").read_text())
    return [(raw_dir / f["name"], f["format"], f.get("fields", {})) for f in man["facts"]["files"]]


def load_rows(raw_dir: Path, recipe: Recipe) -> list[SourceRow]:
    rows: list[SourceRow] = []
    for path, fmt, mapping in raw_files(raw_dir):
        rows.extend(read_rows(path, fmt, mapping))
    d = recipe.data
    rows = rows[d.skip_rows:]
    return rows[: d.limit] if d.limit is not None else rows


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from . import layout
    from .artifacts import StageRun, atomic_dir, write_json
    from .tokenizer import load_tokenizer

    paths = layout.paths(recipe.name)
    st = StageRun("preprocess", recipe, overrides)
    st.add_input("raw", paths.raw)
    tok = load_tokenizer(paths.base, recipe.template, trust_remote_code=recipe.model.trust_remote_code)
    rows = load_rows(paths.raw, recipe)
    st.lap("read")
    parts, rep = build(rows, tok, recipe.template, recipe.preprocess)
    st.lap("tokenize")
    report = {"recipe": recipe.name, **rep.to_json()}
    if not parts["train"]:
        raise DataError(f"{paths.raw}: no training rows left after preprocessing: {report}")
    with atomic_dir(paths.processed) as tmp:
        for name, exs in parts.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for e in exs:
                    f.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")
        st.facts.update(report=report, special_ids={"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id})
        write_json(tmp / "manifest.json", st.manifest())
    write_json(paths.reports / "data_report.json", report)
    return report


def read_split(processed: Path, split: str) -> list[dict[str, Any]]:
    with open(Path(processed) / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
