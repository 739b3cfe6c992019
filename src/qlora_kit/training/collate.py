"""Batches for the train stage: padded (the sources' way) and padding-free packed rows."""
from __future__ import annotations

from typing import Any


class Collator:
    """Right-pads a batch: ids with pad, labels with -100, attention 1 on real tokens."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(feats), n), -100, dtype=torch.long)
        att = torch.zeros((len(feats), n), dtype=torch.long)
        for i, f in enumerate(feats):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            att[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": att}


class PaddingFreeCollator:
    """`train.packing: true`: the micro-batch's examples side by side in one row, with no padding.

    Faithful packing, not TRL's fixed-length block packing: the same examples form each
    micro-batch as with `Collator` (the sampler is untouched), `position_ids` restart at 0 for
    every example, and each example's first label becomes -100, the position that would predict
    it from the previous example's last token. Given position_ids and no attention mask,
    transformers' masking_utils (`find_packed_sequence_indices`) builds a block-diagonal causal
    mask for the sdpa/eager attention paths too, so no example attends to another; that is why
    this works on the CPU as well as with flash-attention; that mask is L x L in the row length,
    so the train stage normally replaces it with a per-example kernel (training/attention.py), for
    which `boundaries=True` adds the examples' offsets. `check_padding_free` verifies it on the
    actual model before training. The loss-bearing labels are exactly those of the padded batch.
    """

    def __init__(self, boundaries: bool = False):
        # boundaries: also emit cu_seq_lens_q/k and max_length_q/k (the examples' offsets in the
        # row), which the model passes on to a varlen attention kernel (training/attention.py)
        self.boundaries = boundaries

    def __call__(self, feats: list[dict[str, Any]]) -> dict[str, Any]:
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100,
                                          return_flash_attn_kwargs=self.boundaries)(
            [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in feats])


def check_padding_free(model, rows: list[dict[str, Any]], n_tokens: int = 24,
                       collator: PaddingFreeCollator | None = None) -> float:
    """Logits of two examples packed in one row vs each alone; raise if they differ.

    A model class whose attention does not honour the packed layout would let the second
    example attend to the first one and train on a contaminated context; this catches it before
    step 0. It calls the model as the Trainer will (no attention mask, no cache argument), so it
    also catches `config.use_cache: true`: transformers only builds the packed mask when no cache
    is passed, and a model that makes its own DynamicCache attends across examples (`load_base`
    turns the cache off). Returns the largest difference relative to the logits' spread (recorded
    in the manifest). The packed row is built by `collator` (the one training uses).
    """
    import torch

    if len(rows) < 2:
        return 0.0
    a, b = (list(r["input_ids"][:n_tokens]) for r in rows[:2])
    device = next(p.device for p in model.parameters())
    # The model runs in train mode with only its dropout layers switched off: bitsandbytes'
    # Linear4bit repacks its weights for inference on the first no-grad forward in eval mode on a
    # CPU with AVX512-BF16, and that kernel has no backward, so every later training step would
    # get no gradient at all (measured: grad_norm 0). A freshly loaded model is in eval mode.
    was_training = model.training
    model.train()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m in dropouts:
        m.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=torch.tensor([x], device=device)).logits[0].float() for x in (a, b)]
            batch = (collator or PaddingFreeCollator())([{"input_ids": x, "labels": x} for x in (a, b)])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items() if k != "labels"}
            packed = model(**batch).logits[0].float()
    finally:
        model.train(was_training)
    ref = torch.cat(alone)
    rel = float((packed - ref).abs().max() / ref.std().clamp_min(1e-6))
    # fp32 agrees to ~1e-5 of the spread; bf16/fp16 and 4-bit kernels to ~1e-2. Attending across
    # the boundary moves the second example's logits by a large fraction of the spread.
    if rel > 0.05:
        raise RuntimeError(f"train.packing: packed and separate logits differ by {rel:.3g} of the logits' spread: "
                           f"this model's attention ({type(model).__name__}) does not keep packed examples apart; "
                           "set train.packing: false")
    return rel
