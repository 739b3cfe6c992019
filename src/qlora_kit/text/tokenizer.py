"""Load a recipe's tokenizer with its special-token policy applied, the same way in every stage.

The recipe states BOS/EOS/pad explicitly (`template.special_tokens`, `template.pad_token`,
`template.add_bos`): transformers 5's Llama tokenizer adds no BOS by default while llama.cpp
does, so the kit never relies on either default.

`template.tokenizer` names the tokenizer the recipe's source actually ran, because the same
files tokenize differently through different code:

- `hub-fast`: the folder's `tokenizer.json` through the `tokenizers` library as the file itself
  defines it (its normalizer, pre-tokenizer, added tokens). transformers 5 would rebuild a Llama
  tokenizer from `tokenizer.model` with another whitespace split; this path never lets it.
- `sentencepiece-slow`: `tokenizer.model` through sentencepiece with the rules of transformers
  4.34's slow `LlamaTokenizer` (text/slow_llama.py).
- `auto`: transformers' `AutoTokenizer` (the kit's own recipes, where no source decides).

Every stage (preprocess, render, train, merge, quantize's GGUF gate, evaluate) calls
`load_tokenizer`, so all of them see the same ids.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qlora_kit.config import Template
from qlora_kit.errors import DataError

# the file each loader reads: without it the source's tokenizer cannot be reproduced
NEEDS = {"hub-fast": "tokenizer.json", "sentencepiece-slow": "tokenizer.model"}
# merge saves the tokenizer through transformers, which rewrites tokenizer.json and
# tokenizer_config.json; it keeps the base's originals beside them under this prefix, and the
# loaders read those, so every later stage sees the source's tokenizer byte for byte
SOURCE_PREFIX = "source_"


def source_file(folder: Path, name: str) -> Path:
    """`source_<name>` when merge kept the base's original there, else `<name>`."""
    kept = Path(folder) / (SOURCE_PREFIX + name)
    return kept if kept.is_file() else Path(folder) / name


@dataclass
class Tok:
    """A tokenizer plus the ids the kit uses; `encode` never adds special tokens by itself.

    `hf` is the transformers tokenizer (saving, decoding, chat templates); `encoder`, when set,
    is the source's own tokenization, which `encode` uses instead of `hf`.
    """

    hf: Any
    bos_id: int | None
    eos_id: int
    pad_id: int
    bos: str
    eos: str
    encoder: Callable[[str], list[int]] | None = None
    kind: str = "auto"
    # many texts in one call (the `tokenizers` batch path), same ids as `encode` on each
    batch_encoder: Callable[[list[str]], list[list[int]]] | None = None

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self.encoder is not None:
            return self.encoder(text)
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        if self.batch_encoder is None:
            return [self.encode(t) for t in texts]
        got = self.batch_encoder([t for t in texts if t])
        it = iter(got)
        return [next(it) if t else [] for t in texts]


def load_tokenizer(path: Path, tpl: Template, *, trust_remote_code: bool = False) -> Tok:
    from transformers import AutoTokenizer

    path = Path(path)
    kind = tpl.tokenizer
    need = NEEDS.get(kind)
    if need and not source_file(path, need).is_file():
        raise DataError(f"{path / need}: missing; template.tokenizer is {kind}, which reads this file "
                        "(the tokenizer the recipe's source ran); point model.name at a folder that has it")
    if kind != "auto" and source_file(path, "tokenizer.json").is_file() and (path / "tokenizer.model").is_file():
        check_files_agree(source_file(path, "tokenizer.json"), path / "tokenizer.model")
    tok = apply_policy(AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code), tpl)
    tok.kind = kind
    if kind == "hub-fast":
        tok.encoder, tok.batch_encoder = fast_encoder(source_file(path, "tokenizer.json"))
    elif kind == "sentencepiece-slow":
        from qlora_kit.text.slow_llama import SlowLlama

        tok.encoder = SlowLlama(path, tpl.special_tokens).encode
    return tok


def fast_encoder(file: Path) -> tuple[Callable[[str], list[int]], Callable[[list[str]], list[list[int]]]]:
    """`tokenizer.json` as the `tokenizers` library reads it, no special tokens added: one text,
    and many texts in one call."""
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise DataError(f"{file}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from e
    # encode_batch_fast: the same ids as encode_batch, without computing character offsets
    # (the kit never reads them); a quarter less CPU time on a batch
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return (lambda text: backend.encode(text, add_special_tokens=False).ids,
            lambda texts: [e.ids for e in batch(texts, add_special_tokens=False)])


def check_files_agree(tokenizer_json: Path, tokenizer_model: Path) -> None:
    """`tokenizer.json` and `tokenizer.model` in one folder must hold the same vocabulary.

    A folder assembled from two different models tokenizes one way in the kit and another in
    llama.cpp (which reads `tokenizer.model`); stop before anything is written.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(tokenizer_model))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{tokenizer_model}: not a readable sentencepiece model ({e})") from e
    try:
        vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{tokenizer_json}: no model.vocab to compare with {tokenizer_model.name} ({e})") from e
    if not isinstance(vocab, dict):
        return  # not a BPE/WordPiece vocabulary (e.g. Unigram's list): nothing comparable by piece
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if vocab.get(piece, i) != i:
            raise DataError(f"{tokenizer_json}: disagrees with {tokenizer_model}: piece "
                            f"{piece!r} is id {vocab[piece]} in tokenizer.json, {i} in tokenizer.model")
    shared = sum(1 for i in vocab.values() if i < sp.get_piece_size())
    if shared != sp.get_piece_size():
        raise DataError(f"{tokenizer_json}: disagrees with {tokenizer_model}: "
                        f"{shared} pieces below id {sp.get_piece_size()} vs {sp.get_piece_size()}")


def apply_policy(tok: Any, tpl: Template) -> Tok:
    overrides = {f"{k}_token": v for k, v in tpl.special_tokens.items()}
    if overrides:
        # komt's `add_special_tokens({"bos_token": "</s>", ...})`: reassigns existing tokens
        tok.add_special_tokens(overrides)
    if tpl.pad_token == "eos":
        tok.pad_token = tok.eos_token
    elif tpl.pad_token == "unk":
        tok.pad_token = tok.unk_token
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token  # nothing to pad with otherwise; labels mask pads by position
    if tok.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token; set template.special_tokens.eos")
    if tpl.add_bos and tok.bos_token_id is None:
        raise ValueError("template.add_bos is true but the tokenizer has no BOS token")
    return Tok(hf=tok, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
               bos=tok.bos_token or "", eos=tok.eos_token)
