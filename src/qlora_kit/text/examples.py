"""Rows to training examples: tokenize, mask labels, apply the length policy; read them back.

Pure: the tokenizer is a parameter (a text.tokenizer.Tok, or anything with its encode/bos_id/eos_id/
pad_id/bos/eos), no torch.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from qlora_kit.config import Preprocess, Template
from qlora_kit.errors import DataError
from qlora_kit.text.rows import SourceRow, drop_reason, fail
from qlora_kit.text.templates import render

if TYPE_CHECKING:  # the one tokenizer interface; tests pass stand-ins with the same fields
    from qlora_kit.text.tokenizer import Tok


IGNORE = -100


@dataclass
class Example:
    row: dict[str, str]
    prompt: str
    completion: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int | None  # None: not counted (text.examples.counts_prompt)
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


def counts_prompt(pp: Preprocess) -> bool:
    """Whether the prompt is tokenized on its own: to mask it (`loss: completion`) or because the
    text is tokenized in two parts. `joint` + `full` tokenizes the whole text once, as the
    sources that trained on it did, and records no prompt length."""
    return pp.tokenize == "separate" or pp.loss != "full"


def tokenize_example(rendered_prompt: str, rendered_completion: str, tok: Tok, tpl: Template,
                     pp: Preprocess) -> tuple[list[int], list[int], int | None]:
    """ids, labels and prompt length (in tokens; None where nothing needs it, see counts_prompt)
    for one rendered row, before length policy."""
    bos = [tok.bos_id] if (tpl.add_bos and tok.bos_id is not None) else []
    if not counts_prompt(pp):
        ids = bos + tok.encode(rendered_prompt + rendered_completion)
        return ids, _mask_pad(ids, list(ids), tok, pp), None
    prompt_ids = bos + tok.encode(rendered_prompt)
    if pp.tokenize == "separate":
        ids = prompt_ids + tok.encode(rendered_completion)
    else:  # the sources' way: tokenize the whole text, mask the prompt's token count
        ids = bos + tok.encode(rendered_prompt + rendered_completion)
    n_prompt = len(prompt_ids)
    labels = list(ids) if pp.loss == "full" else [IGNORE] * n_prompt + ids[n_prompt:]
    return ids, _mask_pad(ids, labels, tok, pp), n_prompt


def _mask_pad(ids: list[int], labels: list[int], tok: Tok, pp: Preprocess) -> list[int]:
    """`mask_pad_in_labels`: -100 wherever the pad id stands in the ids."""
    if pp.mask_pad_in_labels:
        # DataCollatorForLanguageModeling sets labels[ids == pad] = -100; with pad == eos this
        # also masks the real EOS (llama2-koalpaca's quirk)
        pad = tok.pad_id
        if pad in ids:  # one C-speed scan; the list is rebuilt only for rows that hold the pad id
            labels = [IGNORE if i == pad else lab for i, lab in zip(ids, labels)]
    return labels


UNKNOWN_TOKEN_CHARS = 64  # chars per token assumed when the tokenizer has no vocabulary to measure


def max_token_chars(tok: Any) -> int:
    """The longest token of the vocabulary, in characters: no token covers more text than this.

    Measured once per tokenizer object (a 32000-piece vocabulary takes tens of milliseconds)."""
    cached = getattr(tok, "_max_token_chars", None)
    if cached is not None:
        return cached
    try:
        vocab = tok.hf.get_vocab()
    except Exception:  # noqa: BLE001 - any tokenizer without a vocabulary gets the safe constant
        return UNKNOWN_TOKEN_CHARS
    n = max(max(map(len, vocab), default=0), 1)
    try:
        tok._max_token_chars = n
    except AttributeError:  # a tokenizer object that takes no new attributes: measured each time
        pass
    return n


def char_bound(tok: Any, pp: Preprocess) -> int:
    """Characters past which a text has more than max_length tokens whatever it holds.

    Rows longer than this are dropped (`overlength: drop`) without being tokenized, or cut to this
    many characters before tokenizing (`truncate`): the kept first max_length tokens cover at most
    max_length x max_token_chars characters, so the cut lies beyond them (8 tokens of margin).
    """
    return max_token_chars(tok) * (pp.max_length + 8)


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


def _usable(rows: list[SourceRow], pp: Preprocess, rep: Report) -> list[SourceRow]:
    """The rows preprocess tokenizes: bad rows refused (strict) or counted (lenient), duplicates
    counted when `dedupe`, then shuffled when `shuffle_seed` is set."""
    good: list[SourceRow] = []
    seen: set[tuple[str, str, str]] = set()
    for r in rows:
        reason = drop_reason(r, pp.clean_rows)
        if reason:
            if pp.on_bad_row == "error":
                raise fail(r)
            rep.dropped[reason] += 1
            continue
        key = (r.fields["instruction"], r.fields["input"], r.fields["output"])
        if pp.dedupe and key in seen:
            rep.dropped["duplicate"] += 1
            continue
        seen.add(key)
        good.append(r)
    if pp.shuffle_seed is not None:
        random.Random(pp.shuffle_seed).shuffle(good)
    return good


def split_items(items: list, pp: Preprocess) -> tuple[list, list]:
    """(train, val): `val_ratio` of the items, chosen with `split_seed`, order kept in each part."""
    idx = list(range(len(items)))
    random.Random(pp.split_seed).shuffle(idx)
    # ceil, as datasets' train_test_split(test_size=...) sizes the test part (L2K, AG2 split with it)
    n_val = math.ceil(len(items) * pp.val_ratio - 1e-9) if pp.val_ratio > 0 else 0
    if pp.val_ratio > 0 and n_val == 0 and len(items) > 1:
        n_val = 1
    val_idx = set(idx[:n_val])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]


@lru_cache(maxsize=64)
def _file_name(file: str) -> str:
    return Path(file).name


def encode_row(r: SourceRow, tok: Tok, tpl: Template, pp: Preprocess, rep: Report,
               rend: Any = None) -> Example | str:
    """One usable row as an Example, or the reason it is dropped (`overlength`, `no_loss_tokens`).
    `rend`: the row's rendering when the caller has it already."""
    bound = char_bound(tok, pp)
    if pp.overlength == "drop" and sum(map(len, r.fields.values())) > bound:
        return "overlength"  # cannot fit: never tokenized
    rend = rend or render(tpl, r.fields, bos=tok.bos, eos=tok.eos)
    ids, labels, n_prompt = tokenize_example(rend.prompt[:bound], rend.completion[:bound], tok, tpl, pp)
    ids, labels, action = length_policy(ids, labels, pp)
    if action == "drop":
        return "overlength"
    if action == "truncate":
        rep.truncated += 1
    if pp.clean_rows and all(lab == IGNORE for lab in labels):
        return "no_loss_tokens"
    return Example(dict(r.fields), rend.prompt, rend.completion, ids, labels, n_prompt,
                   f"{_file_name(str(r.file))}:{r.line}")


class _Prepared:
    """`tok` with the texts of many rows encoded up front in one batch call (`Tok.encode_many`);
    `encode` answers from that table, so each row's ids are exactly `tok.encode`'s."""

    def __init__(self, tok: Tok, texts: list[str]):
        self._tok = tok
        self._ids = dict(zip(texts, tok.encode_many(texts)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def encode(self, text: str) -> list[int]:
        got = self._ids.get(text)
        return list(got) if got is not None else self._tok.encode(text)


def _prepare(rows: list[SourceRow], tok: Tok, tpl: Template, pp: Preprocess) -> tuple[Any, dict[int, Any]]:
    """Batch-encode what encode_row will ask for (only where the tokenizer has a batch path); with
    each row's rendering, by the row object's id, so that no row is rendered twice."""
    if getattr(tok, "batch_encoder", None) is None:
        return tok, {}
    bound = char_bound(tok, pp)
    texts: list[str] = []
    rendered: dict[int, Any] = {}
    for r in rows:
        rendered[id(r)] = rend = render(tpl, r.fields, bos=tok.bos, eos=tok.eos)
        p, c = rend.prompt[:bound], rend.completion[:bound]
        texts += [p, c] if pp.tokenize == "separate" else [p, p + c] if counts_prompt(pp) else [p + c]
    return _Prepared(tok, texts), rendered


def build(rows: list[SourceRow], tok: Tok, tpl: Template, pp: Preprocess
          ) -> tuple[dict[str, list[Example]], Report]:
    rep = Report(rows_in=len(rows))
    good = _usable(rows, pp, rep)
    tok, rendered = _prepare(good, tok, tpl, pp)

    def encode_all(items: list[SourceRow]) -> list[Example]:
        out = []
        for r in items:
            ex = encode_row(r, tok, tpl, pp, rep, rendered.get(id(r)))
            if isinstance(ex, str):
                rep.dropped[ex] += 1
            else:
                out.append(ex)
        return out

    if pp.filter_after_split:  # llama2-koalpaca: split 99/1 first, then drop long rows per split
        tr, va = split_items(good, pp)
        parts = {"train": encode_all(tr), "val": encode_all(va)}
    else:
        tr, va = split_items(encode_all(good), pp)
        parts = {"train": tr, "val": va}
    rep.kept = {k: len(v) for k, v in parts.items()}
    rep.tokens = {
        k: sum(len(e.input_ids) for e in v) for k, v in parts.items()
    } | {f"{k}_loss": sum(len(e.labels) - e.labels.count(IGNORE) for e in v) for k, v in parts.items()}
    return parts, rep


def read_split(processed: Path, split: str) -> list[dict[str, Any]]:
    with open(Path(processed) / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def parity_rows(processed: Path, n: int) -> tuple[list[dict[str, Any]], str]:
    """The first n validation rows; the first n training rows where the recipe holds none out
    (komt and polyglot-koalpaca train on everything, as their sources did: val_ratio 0)."""
    from qlora_kit.text.examples import read_split

    rows = read_split(processed, "val")[:n]
    if rows:
        return rows, "val"
    rows = read_split(processed, "train")[:n]
    if not rows:
        raise DataError(f"{processed}: no rows in val.jsonl or train.jsonl to check parity on")
    return rows, "train (no validation rows: preprocess.val_ratio is 0)"
