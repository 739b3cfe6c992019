"""transformers 4.34's slow `LlamaTokenizer` (`use_fast=False`), on sentencepiece directly.

komt loaded its tokenizer this way (finetune_with_lora.py:L266-280). The slow tokenizer differs
from both transformers 5 and the fast `tokenizer.json` in ways that change training ids:

1. The text is split on added tokens (`<unk>`, `<s>`, `</s>`, `<pad>`, ...) first, longest
   match; an added token whose `rstrip`/`lstrip` is set eats the whitespace next to it.
   Tokens assigned by string through `add_special_tokens` (komt's `{"eos_token": "</s>", ...}`)
   strip on both sides (tokenization_utils_base.py:L977 of 4.34); those read from a saved
   config keep that config's flags (tokenization_utils.py:L349-366).
2. With `legacy: false` the whole text gets one leading "▁" (tokenization_llama.py:L203-215);
   every piece between added tokens is encoded with sentencepiece's dummy prefix switched off,
   and a piece that starts with a space or "▁" is encoded behind the unk token's text, whose
   pieces are then cut off (L218-235). With `legacy: true` (or no `legacy` key, 4.34's default)
   each piece is encoded by the model as it is.

Only the rules above decide ids; decoding, saving and chat templates stay with transformers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from qlora_kit.errors import DataError

SPIECE_UNDERLINE = "\u2581"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{file}: expected a JSON object")
    return data


def _token(value: object) -> tuple[str, bool, bool] | None:
    """(content, lstrip, rstrip) of a saved special-token value; None when unset."""
    if isinstance(value, dict):
        return str(value.get("content", "")), bool(value.get("lstrip")), bool(value.get("rstrip"))
    if isinstance(value, str) and value:
        return value, False, False  # LlamaTokenizer wraps plain strings unstripped (L121-124)
    return None


class SlowLlama:
    """Encode text to ids exactly as transformers 4.34's slow LlamaTokenizer did (no BOS added)."""

    def __init__(self, folder: Path, overrides: dict[str, str]):
        import sentencepiece as spm

        from qlora_kit.text.tokenizer import source_file

        folder = Path(folder)
        cfg = _read_json(source_file(folder, "tokenizer_config.json"))
        self.legacy = cfg.get("legacy", True) is not False
        model_file = folder / "tokenizer.model"
        self.sp = spm.SentencePieceProcessor()
        if self.legacy:
            self.sp.Load(str(model_file))
        else:
            from sentencepiece import sentencepiece_model_pb2 as pb2

            proto = pb2.ModelProto.FromString(model_file.read_bytes())
            proto.normalizer_spec.add_dummy_prefix = False
            self.sp.LoadFromSerializedProto(proto.SerializeToString())
        self.added, self.strip = self._added_tokens(folder, cfg, overrides)
        specials = {k: (_token(cfg.get(k)) or (None,))[0] for k in _SPECIAL_KEYS}
        specials.update({f"{k}_token": v for k, v in overrides.items()})
        self.all_special = {v for v in specials.values() if v}
        self.unk = specials.get("unk_token") or "<unk>"
        self.unk_len = len(self.sp.encode(self.unk))
        alts = sorted(self.added, key=len, reverse=True)
        self.split_re = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None

    def _added_tokens(self, folder: Path, cfg: dict, overrides: dict[str, str]
                      ) -> tuple[dict[str, int], dict[str, tuple[bool, bool]]]:
        """Added token -> id, and its (lstrip, rstrip), in the order 4.34 assembled them."""
        from qlora_kit.text.tokenizer import source_file

        ids: dict[str, int] = {}
        strip: dict[str, tuple[bool, bool]] = {}
        saved = cfg.get("added_tokens_decoder")
        if isinstance(saved, dict):  # a config saved by transformers >= 4.34: its flags are the truth
            for idx, tok in saved.items():
                content, ls, rs = _token(tok) or ("", False, False)
                ids[content], strip[content] = int(idx), (ls, rs)
        else:  # legacy folders: added_tokens.json, stripped on both sides (tokenization_utils_base.py:L2234-2241)
            for content, idx in _read_json(source_file(folder, "added_tokens.json")).items():
                ids[content], strip[content] = int(idx), (True, True)
        for key in _SPECIAL_KEYS:  # special tokens of the config, with its flags (L349-366)
            t = _token(cfg.get(key))
            if t and not isinstance(saved, dict):
                ids.setdefault(t[0], self._piece_id(t[0], ids))
                strip[t[0]] = (t[1], t[2])
        for content in overrides.values():  # add_special_tokens({...: "</s>"}): strip both sides (L977)
            ids.setdefault(content, self._piece_id(content, ids))
            strip[content] = (True, True)
        return ids, strip

    def _piece_id(self, content: str, ids: dict[str, int]) -> int:
        i = self.sp.piece_to_id(content)
        if i == self.sp.unk_id() and content != self.sp.id_to_piece(i):
            return self.sp.get_piece_size() + len([v for v in ids.values() if v >= self.sp.get_piece_size()])
        return i

    def _split(self, text: str) -> list[str]:
        """PreTrainedTokenizer.tokenize's split on added tokens and its whitespace stripping."""
        parts = [p for p in self.split_re.split(text) if p != ""] if self.split_re else [text]
        for i, part in enumerate(parts):
            if part not in self.added:
                continue
            lstrip, rstrip = self.strip.get(part, (False, False))
            if rstrip and i + 1 < len(parts) and parts[i + 1]:
                parts[i + 1] = parts[i + 1].lstrip()
            if lstrip and i > 0 and parts[i - 1]:
                parts[i - 1] = parts[i - 1].rstrip()
        return parts

    def _sp_pieces(self, text: str) -> list[str]:
        pieces = self.sp.encode(text, out_type=str)
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return pieces
        pieces = self.sp.encode(self.unk + text, out_type=str)
        return pieces[self.unk_len:] if len(pieces) >= self.unk_len else pieces

    def tokens(self, text: str) -> list[str]:
        if not text:
            return []
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        out: list[str] = []
        for part in self._split(text):
            if not part:
                continue
            out.extend([part] if part in self.added else self._sp_pieces(part))
        if not self.legacy and len(out) > 1 and out[0] == SPIECE_UNDERLINE and out[1] in self.all_special:
            out = out[1:]
        return out

    def encode(self, text: str) -> list[int]:
        return [self.added[t] if t in self.added else self.sp.piece_to_id(t) for t in self.tokens(text)]
