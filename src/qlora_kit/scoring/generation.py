"""Generations from HF models and GGUFs on the recipe's inference prompt, and their summary."""
from __future__ import annotations

from typing import Any
from qlora_kit.config import Recipe


def prompt_ids(recipe: Recipe, tok, row: dict[str, str]) -> list[int]:
    from qlora_kit.text.templates import render_inference

    text = render_inference(recipe.template, row, bos=tok.bos, eos=tok.eos)
    bos = [tok.bos_id] if (recipe.template.add_bos and tok.bos_id is not None) else []
    return bos + tok.encode(text)


def _answer(expected: str, got: str) -> bool:
    return got.strip() == expected.strip()


def hf_generate(model, tok, recipe: Recipe, prompts: list[list[int]]) -> list[dict[str, Any]]:
    import torch

    e = recipe.eval
    out = []
    with torch.no_grad():
        for ids in prompts:
            kw: dict[str, Any] = dict(max_new_tokens=e.max_new_tokens, do_sample=e.do_sample,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                      repetition_penalty=e.repetition_penalty)
            if e.do_sample:
                kw.update(temperature=e.temperature, top_p=e.top_p, top_k=e.top_k)
            gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 **kw)[0, len(ids):].tolist()
            ended = tok.eos_id in gen
            new = gen[: gen.index(tok.eos_id)] if ended else gen
            out.append({"tokens": len(new), "ended_with_eos": ended, "text": tok.hf.decode(new, skip_special_tokens=True)})
    return out


def gguf_generate(llm, tok, recipe: Recipe, prompts: list[list[int]]) -> list[dict[str, Any]]:
    e = recipe.eval
    out = []
    for ids in prompts:
        llm.reset()
        new: list[int] = []
        ended = False
        # llama.cpp's own sampler; greedy unless the recipe samples (then the source's settings)
        for t in llm.generate(ids, temp=e.temperature if e.do_sample else 0.0, top_p=e.top_p,
                              top_k=e.top_k if e.do_sample else 1, repeat_penalty=e.repetition_penalty, reset=True):
            if t == tok.eos_id or llm.token_eos() == t:
                ended = True
                break
            new.append(t)
            if len(new) >= e.max_new_tokens:
                break
        text = llm.detokenize(new).decode("utf-8", errors="replace")
        out.append({"tokens": len(new), "ended_with_eos": ended, "text": text})
    return out


def summarize(gens: list[dict[str, Any]], refs: list[str]) -> dict[str, float]:
    n = max(len(gens), 1)
    lens = sorted(g["tokens"] for g in gens) or [0]
    return {"eos_rate": sum(g["ended_with_eos"] for g in gens) / n,
            "exact_match": sum(_answer(r, g["text"]) for g, r in zip(gens, refs)) / n,
            "answer_tokens_mean": sum(lens) / n, "answer_tokens_median": lens[len(lens) // 2],
            "answer_tokens_max": lens[-1]}
