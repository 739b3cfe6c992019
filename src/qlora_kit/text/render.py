"""`qlora-kit render`: print each row's exact prompt, completion and training text (JSON lines).

    qlora-kit render --recipe komt --input rows.json --limit 3
    qlora-kit render --recipe llama2-koalpaca --limit 2 --show-loss --tokenizer models/tiny/base

It is how a user checks a recipe's template against its source, byte for byte. One JSON object
per usable row, in file order:

- `origin` (file:line), `has_input`;
- `prompt`, `completion`: the recipe's training form of the row (templates.render);
- `text`: the full training text as the model sees it: the BOS token string when the recipe adds
  BOS (`template.add_bos`; it goes in as an id, never as text) + prompt + completion;
- `inference_prompt`: the prompt the source used at generation time (templates.render_inference).

With `--show-loss` the row is also tokenized exactly as preprocess does (same tokenizer policy,
same tokenization, same length policy) and the object gains `tokens` (a list of
[token_string, carries_loss] pairs, token strings as the tokenizer's pieces), `counts` and
`length` (`keep`, `truncate` or `drop`, as preprocess would decide).

Without `--input` the recipe's fetched raw data (data/NAME/raw) is read. Bad rows follow the
recipe's `preprocess.on_bad_row`: `error` stops with exit code 2 naming file:line; `drop`
skips them and reports the counts by reason on stderr. Without a tokenizer, `{bos}`/`{eos}` are
the recipe's `template.special_tokens` or the architecture's usual strings (Llama-2: <s> </s>;
Polyglot-ko/GPT-NeoX: no BOS, <|endoftext|>), which are also what the kit's tiny models use.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from qlora_kit.config import Preprocess, Recipe
from qlora_kit.errors import DataError
from qlora_kit.text.rows import SourceRow, drop_reason, fail, read_rows
from qlora_kit.text.templates import render, render_inference

# The special-token strings of the architectures' reference tokenizers (Llama-2; Polyglot-ko),
# used only when render runs without a tokenizer.
ARCH_SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "llama": {"bos": "<s>", "eos": "</s>"},
    "gpt_neox": {"bos": "", "eos": "<|endoftext|>"},
}


def special_strings(recipe: Recipe) -> tuple[str, str]:
    """(bos, eos) token strings without loading a tokenizer."""
    d = {**ARCH_SPECIAL_TOKENS[recipe.model.arch], **recipe.template.special_tokens}
    return d.get("bos", ""), d["eos"]


def _format_for(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "json"


def source_rows(recipe: Recipe, input_file: str | None) -> list[SourceRow]:
    """Rows from --input (format from the file name) or from the recipe's fetched raw data."""
    if input_file:
        path = Path(input_file)
        if not path.is_file():
            raise DataError(f"--input {path}: no such file")
        return list(read_rows(path, _format_for(path), recipe.data.fields))
    from qlora_kit import layout
    from qlora_kit.text.rows import load_rows

    raw = layout.paths(recipe.name).raw
    if not (raw / "manifest.json").is_file():
        raise DataError(f"{raw}: no fetched data; run `qlora-kit fetch --recipe {recipe.name}` "
                        "or pass --input FILE")
    return load_rows(raw, recipe)


def usable(rows: Iterable[SourceRow], pp: Preprocess, dropped: Counter) -> Iterable[SourceRow]:
    for r in rows:
        reason = drop_reason(r, pp.clean_rows)
        if reason:
            if pp.on_bad_row == "error":
                raise fail(r)
            dropped[reason] += 1
            continue
        yield r


def render_row(recipe: Recipe, r: SourceRow, bos: str, eos: str, tok: Any = None) -> dict[str, Any]:
    """The JSON object for one usable row; `tok` (a tokenizer.Tok) adds the loss view."""
    tpl = recipe.template
    rend = render(tpl, r.fields, bos=bos, eos=eos)
    out: dict[str, Any] = {
        "origin": f"{Path(r.file).name}:{r.line}",
        "has_input": bool(r.fields.get("input")),
        "prompt": rend.prompt,
        "completion": rend.completion,
        "text": (bos if tpl.add_bos else "") + rend.text,
        "inference_prompt": render_inference(tpl, r.fields, bos=bos, eos=eos),
    }
    if tok is not None:
        out.update(loss_view(recipe, rend.prompt, rend.completion, tok))
    return out


def loss_view(recipe: Recipe, prompt: str, completion: str, tok: Any) -> dict[str, Any]:
    from qlora_kit.text.examples import IGNORE, counted_length, length_policy, tokenize_example

    pp = recipe.preprocess
    ids, labels, n_prompt = tokenize_example(prompt, completion, tok, recipe.template, pp)
    if n_prompt is None:  # preprocess does not count it (joint + full loss); the view shows it
        n_prompt = len(([tok.bos_id] if recipe.template.add_bos and tok.bos_id is not None else [])
                       + tok.encode(prompt))
    counted = counted_length(ids, pp)
    kept_ids, kept_labels, action = length_policy(ids, labels, pp)
    if action != "drop":  # show what preprocess writes; a dropped row is shown whole
        ids, labels = kept_ids, kept_labels
    pieces = tok.hf.convert_ids_to_tokens(ids)
    return {
        "tokens": [[p, lab != IGNORE] for p, lab in zip(pieces, labels)],
        "counts": {"tokens": len(ids), "prompt_tokens": min(n_prompt, len(ids)),
                   "loss_tokens": sum(lab != IGNORE for lab in labels)},
        "length": {"counted": counted, "max_length": pp.max_length, "action": action},
    }


def run(recipe: Recipe, args: Any) -> int:
    """CLI entry: write JSON lines to stdout; return the exit code (DataError -> 2 in the CLI)."""
    tok = None
    if getattr(args, "show_loss", False) or getattr(args, "tokenizer", None):
        from qlora_kit import layout
        from qlora_kit.text.tokenizer import load_tokenizer

        folder = Path(args.tokenizer) if getattr(args, "tokenizer", None) else layout.paths(recipe.name).base
        if not folder.is_dir():
            raise DataError(f"--tokenizer {folder}: no such folder (run `qlora-kit fetch --recipe "
                            f"{recipe.name}` or pass --tokenizer DIR)")
        tok = load_tokenizer(folder, recipe.template, trust_remote_code=recipe.model.trust_remote_code)
        bos, eos = tok.bos, tok.eos
    else:
        bos, eos = special_strings(recipe)
    rows = source_rows(recipe, getattr(args, "input", None))
    limit = getattr(args, "limit", None)
    dropped: Counter = Counter()
    # Render everything before printing, so a strict-mode error leaves no partial output.
    lines = []
    for r in usable(rows, recipe.preprocess, dropped):
        if limit is not None and len(lines) >= limit:
            break
        obj = render_row(recipe, r, bos, eos, tok if getattr(args, "show_loss", False) else None)
        lines.append(json.dumps(obj, ensure_ascii=False))
    out = sys.stdout
    for line in lines:
        out.write(line + "\n")
    out.flush()
    if dropped:
        print(f"qlora-kit render: dropped {sum(dropped.values())} bad rows: {dict(sorted(dropped.items()))}",
              file=sys.stderr)
    return 0
