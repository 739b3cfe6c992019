"""Write a LlamaForCausalLM checkpoint with random fp16 weights, shard by shard (bench helper).

Used by merge_memory.py and gguf_export.py so both measure the same kind of model; only one
shard's tensors are in memory at a time. Norm weights are ones, everything else N(0, 0.02).
"""
from __future__ import annotations

import json
from pathlib import Path


def write_random_llama(out: Path, cfg, shard_mb: int, seed: int = 0) -> dict:
    """Save `cfg` and random weights into `out` (which must exist); returns params/bytes/shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    cfg.save_pretrained(str(out))
    gen = torch.Generator().manual_seed(seed)
    groups: list[list[str]] = [[]]
    size = 0
    for k, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod())
        if groups[-1] and size + n > shard_mb << 20:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for k in keys:
            t = torch.ones(shapes[k]) if k.endswith("norm.weight") else torch.randn(shapes[k], generator=gen) * 0.02
            tensors[k] = t.to(torch.float16)
            weight_map[k] = name
            total += tensors[k].numel() * 2
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"params": sum(int(torch.tensor(s).prod()) for s in shapes.values()), "bytes": total,
            "shards": len(groups)}
