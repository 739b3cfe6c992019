"""train.packed_attention: the per-example kernel for packed rows (training/attention.py).

Packed training with it equals padded training step by step, packed logits equal separate logits,
no attention call ever sees the whole row or a mask, and a bad value is refused by the recipe
loader (tests/stages/test_train_packed.py: the train stage records the kernel it used).
"""
from __future__ import annotations

import copy

import pytest

from qlora_kit.config import RecipeError, load_recipe
from qlora_kit.training import attention
from qlora_kit.training.collate import Collator, check_padding_free

LENGTHS = (7, 1, 12, 3, 9, 2)  # a length-1 example included


def _rows(lengths=LENGTHS, vocab: int = 96) -> list[dict]:
    rows = []
    for i, n in enumerate(lengths):
        ids = [1 + (5 * i + 3 * j) % (vocab - 1) for j in range(n)]
        rows.append({"input_ids": ids, "labels": [-100] * min(1, n - 1) + ids[min(1, n - 1):]})
    return rows


def _model(arch: str = "llama"):
    """A tiny fp32 model with random weights (GQA for the Llama: 4 query heads on 2 kv heads)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPTNeoXConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64)
        model = GPTNeoXForCausalLM(cfg)
    model.config.use_cache = False  # as train.load_base sets it
    return model


def _peft(model):
    from peft import get_peft_model

    from qlora_kit.train import lora_config

    recipe = load_recipe("tiny", {"lora.dropout": 0.0})
    return get_peft_model(model, lora_config(recipe))


def _losses(model, batches, collate) -> list[float]:
    import torch

    torch.manual_seed(1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = []
    for feats in batches:
        loss = model(**collate(feats)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_packed_training_equals_padded_training():
    """Three optimizer steps of LoRA training: same per-step loss packed (per_example) and padded."""
    padded = _peft(_model())
    packed = copy.deepcopy(padded)
    name = attention.use_packed_attention(packed, "cpu", "auto")
    assert name == "per_example"
    rows = _rows((7, 1, 12, 3, 9, 2, 5, 11, 4, 8, 6, 10))
    batches = [rows[i:i + 4] for i in range(0, len(rows), 4)]
    ref = _losses(padded, batches, Collator(0))
    got = _losses(packed, batches, attention.packed_collator(name))
    assert len(got) == 3 and ref[0] != ref[-1]  # the steps did train
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4, (ref, got)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_packed_logits_equal_separate_logits(arch, monkeypatch):
    """Every example alone vs all packed in one row; attention never sees the row or a mask."""
    import torch

    model = _model(arch).eval()
    assert attention.use_packed_attention(model, "cpu", "per_example") == "per_example"
    rows = _rows()
    batch = attention.packed_collator("per_example")(rows)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((k.shape[2], attn_mask is None))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        n_packed = len(calls)
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows])
    assert (packed - alone).abs().max() < 1e-5
    assert n_packed == len(rows) * model.config.num_hidden_layers
    assert all(no_mask and kv_len <= max(LENGTHS) for kv_len, no_mask in calls)
    assert check_padding_free(model, _rows((10, 14)), collator=attention.packed_collator("per_example")) < 1e-5


def test_position_ids_alone_keep_the_examples_apart():
    """Without the collator's boundaries the kernel splits the row where position_ids restart."""
    import torch

    model = _model().eval()
    attention.use_packed_attention(model, "cpu", "per_example")
    rows = _rows((5, 1, 8))
    batch = attention.packed_collator("block_mask")(rows)
    assert "cu_seq_lens_q" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows])
    assert (packed - alone).abs().max() < 1e-5


def test_auto_and_forced_choices():
    assert attention.resolve("cpu", "auto") == "per_example"
    assert attention.resolve("cpu", "block_mask") == "block_mask"
    with pytest.raises(ValueError, match="train.packed_attention: flash_attention_2 needs a CUDA device"):
        attention.resolve("cpu", "flash_attention_2")
    with pytest.raises(ValueError, match="train.packed_attention: 'fast' is not one of"):
        attention.resolve("cpu", "fast")


def test_a_model_that_cannot_switch_falls_back_to_block_mask():
    class Config:
        _attn_implementation = "sdpa"

    class Fixed:
        config = Config()

        def set_attn_implementation(self, name):
            raise ValueError(f'Specified `attn_implementation="{name}"` is not supported')

    notes: list[str] = []
    assert attention.use_packed_attention(Fixed(), "cpu", "auto", notes) == "block_mask"
    assert len(notes) == 1 and "per_example unavailable" in notes[0] and "not supported" in notes[0]


def test_bad_packed_attention_value_names_the_field():
    with pytest.raises(RecipeError, match=r"train\.packed_attention: Input should be 'auto'"):
        load_recipe("tiny", {"train.packed_attention": "fast"})
    assert load_recipe("tiny").train.packed_attention == "auto"
