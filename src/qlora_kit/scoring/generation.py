"""Generations from HF models and GGUFs on the recipe's inference prompt, and their summary.

HF models generate `eval.generation_batch_size` prompts at a time: prompts sorted by length,
left-padded with the pad id under an attention mask (position ids follow the mask), each row
stopping at EOS; results come back in the prompts' order. In fp32 the greedy batched output
equals the one-at-a-time output token for token on the kit's tiny models (tests/stages/
test_generation.py); other kernels or dtypes could flip a near-tie, and `generation_batch_size: 1`
is the one-at-a-time path. A GGUF generates in one llama.cpp context, one prompt after
another: the tokens a prompt shares with what the context already holds (the template header every
prompt starts with) stay evaluated and only the rest is decoded; greedy output equals a
from-scratch run of each prompt.
"""
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


def _hf_kwargs(recipe: Recipe, tok) -> dict[str, Any]:
    e = recipe.eval
    kw: dict[str, Any] = dict(max_new_tokens=e.max_new_tokens, do_sample=e.do_sample,
                              eos_token_id=tok.eos_id, pad_token_id=_pad_id(tok),
                              repetition_penalty=e.repetition_penalty)
    if e.do_sample:
        kw.update(temperature=e.temperature, top_p=e.top_p, top_k=e.top_k)
    return kw


def _pad_id(tok) -> int:
    return tok.pad_id if tok.pad_id is not None else tok.eos_id


def hf_generate(model, tok, recipe: Recipe, prompts: list[list[int]],
                batch_size: int | None = None) -> list[dict[str, Any]]:
    """One result per prompt, in order; `batch_size` (default eval.generation_batch_size) 1
    generates one prompt at a time."""
    return [{"tokens": len(new), "ended_with_eos": ended, "text": tok.hf.decode(new, skip_special_tokens=True)}
            for new, ended in hf_generate_ids(model, tok, recipe, prompts, batch_size)]


def hf_generate_ids(model, tok, recipe: Recipe, prompts: list[list[int]],
                    batch_size: int | None = None) -> list[tuple[list[int], bool]]:
    """(new token ids before EOS, ended with EOS) per prompt, in order."""
    import torch

    bs = recipe.eval.generation_batch_size if batch_size is None else batch_size
    kw = _hf_kwargs(recipe, tok)
    gens: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        if bs <= 1:
            for i, ids in enumerate(prompts):
                gens[i] = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                         dtype=torch.long), **kw)[0, len(ids):].tolist()
        else:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
            for start in range(0, len(order), bs):
                rows = order[start:start + bs]
                for i, gen in zip(rows, _hf_batch(model, [prompts[i] for i in rows], kw)):
                    gens[i] = gen
    return [(g[: g.index(tok.eos_id)], True) if tok.eos_id in g else (g, False) for g in gens]


def _hf_batch(model, batch: list[list[int]], kw: dict[str, Any]) -> list[list[int]]:
    """Generated ids per row of a left-padded batch (a finished row is padded after its EOS)."""
    import torch

    width = max(len(ids) for ids in batch)
    pads = [width - len(ids) for ids in batch]
    input_ids = torch.tensor([[kw["pad_token_id"]] * p + ids for p, ids in zip(pads, batch)])
    mask = torch.tensor([[0] * p + [1] * len(ids) for p, ids in zip(pads, batch)])
    # transformers derives the position ids from the mask (a row's first real token is at 0) and
    # leaves the pads out of the repetition penalty
    return model.generate(input_ids=input_ids, attention_mask=mask, **kw)[:, width:].tolist()


def gguf_generate(llm, tok, recipe: Recipe, prompts: list[list[int]],
                  reuse_prefix: bool = True) -> list[dict[str, Any]]:
    """One result per prompt, in order. `reuse_prefix` keeps the tokens a prompt shares with the
    context's current contents (llama.cpp decodes only the rest); False evaluates every prompt
    from token 0."""
    return [{"tokens": len(new), "ended_with_eos": ended,
             "text": llm.detokenize(new).decode("utf-8", errors="replace")}
            for new, ended in gguf_generate_ids(llm, tok, recipe, prompts, reuse_prefix)]


def gguf_generate_ids(llm, tok, recipe: Recipe, prompts: list[list[int]],
                      reuse_prefix: bool = True) -> list[tuple[list[int], bool]]:
    """(new token ids before EOS, ended with EOS) per prompt, in order."""
    e = recipe.eval
    out = []
    for ids in prompts:
        if not reuse_prefix:
            llm.reset()
        new: list[int] = []
        ended = False
        # llama.cpp's own sampler, built afresh (same seed) for every prompt; greedy unless the
        # recipe samples (then the source's settings). With reset=True llama-cpp-python keeps the
        # longest prefix the prompt shares with the context's tokens and decodes only the rest.
        for t in llm.generate(ids, temp=e.temperature if e.do_sample else 0.0, top_p=e.top_p,
                              top_k=e.top_k if e.do_sample else 1, repeat_penalty=e.repetition_penalty, reset=True):
            if t == tok.eos_id or llm.token_eos() == t:
                ended = True
                break
            new.append(t)
            if len(new) >= e.max_new_tokens:
                break
        out.append((new, ended))
    return out


def summarize(gens: list[dict[str, Any]], refs: list[str]) -> dict[str, float]:
    n = max(len(gens), 1)
    lens = sorted(g["tokens"] for g in gens) or [0]
    return {"eos_rate": sum(g["ended_with_eos"] for g in gens) / n,
            "exact_match": sum(_answer(r, g["text"]) for g, r in zip(gens, refs)) / n,
            "answer_tokens_mean": sum(lens) / n, "answer_tokens_median": lens[len(lens) // 2],
            "answer_tokens_max": lens[-1]}
