"""Build a tiny model the kit owns: random weights from a seed, tokenizer trained on the sample.

Two shapes, as the recipes need them:
- `llama`: LlamaForCausalLM + a sentencepiece BPE tokenizer (byte fallback, BOS <s>=1, EOS </s>=2),
  saved with `tokenizer.model` so llama.cpp's converter takes its sentencepiece path.
- `gpt_neox`: GPTNeoXForCausalLM + a byte-level BPE tokenizer in the Polyglot-ko layout
  (no BOS, `<|endoftext|>` = 2 as EOS).

Every matrix row is a multiple of 256 wide so llama.cpp's K-quants apply without fallback.
Same seed + same text -> byte-identical safetensors and tokenizer files.

    python -m qlora_kit.tiny.model --arch llama --out /tmp/tiny-llama
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Iterable

from qlora_kit.config import TinyModel

NEOX_SPECIALS = ["<|unk|>", "<|padding|>", "<|endoftext|>", "<|sep|>"]  # eos id 2, as Polyglot-ko


def sample_texts(rows: Iterable[dict[str, str]]) -> list[str]:
    """The text a tokenizer is trained on: every field of every row, one line each."""
    out = []
    for r in rows:
        out.extend(v for v in (r.get("instruction"), r.get("input"), r.get("output")) if v)
    return out


def _train_sentencepiece(texts: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, split_digits=True, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
        # Llama-2's normalizer spec: text as is (no NFKC, runs of spaces and newlines kept), so
        # sentencepiece, the slow/fast tokenizers and llama.cpp see the same pieces
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        # deterministic: no sampling, fixed input order
        shuffle_input_sentence=False, input_sentence_size=0,
    )
    return buf.getvalue()


def _llama_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from transformers import LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(_train_sentencepiece(texts, vocab_size))
    # transformers 5 converts the sentencepiece model to a `tokenizers` backend. Its Llama
    # tokenizer adds no BOS by default (llama.cpp does): the kit always adds BOS explicitly.
    tok = LlamaTokenizer.from_pretrained(str(out), legacy=False)
    tok.save_pretrained(str(out))
    return tok


def _neox_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=NEOX_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<|unk|>",
                                  pad_token="<|padding|>", additional_special_tokens=["<|sep|>"])
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return tok


def build(arch: str, out: Path, texts: list[str], shape: TinyModel = TinyModel()) -> Path:
    """Write a complete Hugging Face model folder (config, safetensors, tokenizer) to `out`."""
    import torch

    out = Path(out)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = _llama_tokenizer(texts, shape.vocab_size, out)
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_heads, max_position_embeddings=shape.max_position_embeddings,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
            tie_word_embeddings=False, rms_norm_eps=1e-5,
        )
        cls = LlamaForCausalLM
    elif arch == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        tok = _neox_tokenizer(texts, shape.vocab_size, out)
        cfg = GPTNeoXConfig(
            vocab_size=len(tok), hidden_size=shape.hidden_size, intermediate_size=4 * shape.hidden_size,
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
            max_position_embeddings=shape.max_position_embeddings, rotary_pct=0.5, use_parallel_residual=True,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        )
        cls = GPTNeoXForCausalLM
    else:
        raise ValueError(f"unknown tiny arch {arch!r} (llama, gpt_neox)")
    torch.manual_seed(shape.seed)
    model = cls(cfg)
    with torch.no_grad():  # small init keeps the untrained model's logits tame
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(out))
    gen = out / "generation_config.json"
    if gen.exists():  # drop the transformers version stamp so equal seeds give equal bytes
        g = json.loads(gen.read_text())
        g.pop("transformers_version", None)
        gen.write_text(json.dumps(g, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    from qlora_kit.tiny.data import generate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["llama", "gpt_neox"], default="llama")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    build(a.arch, a.out, sample_texts(generate(0)), TinyModel(seed=a.seed))
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
