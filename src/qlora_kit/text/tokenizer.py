"""Load a recipe's tokenizer with its special-token policy applied, the same way in every stage.

The recipe states BOS/EOS/pad explicitly (`template.special_tokens`, `template.pad_token`,
`template.add_bos`): transformers 5's Llama tokenizer adds no BOS by default while llama.cpp
does, so the kit never relies on either default.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_kit.config import Template


@dataclass
class Tok:
    """A tokenizer plus the ids the kit uses; `encode` never adds special tokens by itself."""

    hf: Any
    bos_id: int | None
    eos_id: int
    pad_id: int
    bos: str
    eos: str

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False)) if text else []


def load_tokenizer(path: Path, tpl: Template, *, trust_remote_code: bool = False) -> Tok:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return apply_policy(tok, tpl)


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
