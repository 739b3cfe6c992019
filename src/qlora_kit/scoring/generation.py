"""Generations from HF models and GGUFs on the recipe's inference prompt, and their summary.

HF models generate `eval.generation_batch_size` prompts at a time: prompts sorted by length,
left-padded with the pad id under an attention mask (position ids follow the mask), each row
stopping at EOS; results come back in the prompts' order. In fp32 the greedy batched output
equals the one-at-a-time output token for token on the kit's tiny models (tests/stages/
test_generation.py); other kernels or dtypes could flip a near-tie, and `generation_batch_size: 1`
is the one-at-a-time path. A greedy recipe's GGUF generates the same number of prompts at a time
as parallel sequences of one llama.cpp context, one llama_decode call per step for all of them,
a freed sequence taking the next prompt (_gguf_batched); its output equals one prompt at a time
with llama.cpp's sampler on the kit's tiny GGUFs (f16 and K-quants, same tests). A sampling
recipe, or batch size 1, generates one prompt after another in the GGUF's own context: the
tokens a prompt shares with what the context already holds (the template header every prompt
starts with) stay evaluated and only the rest is decoded; greedy output equals a from-scratch run
of each prompt.
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


def gguf_generate(llm, tok, recipe: Recipe, prompts: list[list[int]], reuse_prefix: bool = True,
                  batch_size: int | None = None) -> list[dict[str, Any]]:
    """One result per prompt, in order; arguments as gguf_generate_ids."""
    return [{"tokens": len(new), "ended_with_eos": ended,
             "text": llm.detokenize(new).decode("utf-8", errors="replace")}
            for new, ended in gguf_generate_ids(llm, tok, recipe, prompts, reuse_prefix, batch_size)]


def gguf_generate_ids(llm, tok, recipe: Recipe, prompts: list[list[int]], reuse_prefix: bool = True,
                      batch_size: int | None = None) -> list[tuple[list[int], bool]]:
    """(new token ids before EOS, ended with EOS) per prompt, in order.

    Greedy recipes decode `batch_size` (default eval.generation_batch_size) prompts as parallel
    sequences of one llama.cpp context (_gguf_batched). batch_size 1, or a recipe that samples,
    generates one prompt after another in `llm`'s own context with llama.cpp's sampler;
    `reuse_prefix` then keeps the tokens a prompt shares with the context's current contents
    (llama.cpp decodes only the rest), and False evaluates every prompt from token 0."""
    e = recipe.eval
    bs = e.generation_batch_size if batch_size is None else batch_size
    if bs > 1 and not e.do_sample and len(prompts) > 1:
        return _gguf_batched(llm, tok, recipe, prompts, bs)
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


# llama-cpp-python's Llama(last_n_tokens_size=64): the repeat penalty's window of generated tokens
PENALTY_LAST_N = 64


def _greedy(logits_ptr, n_vocab: int, new: list[int], penalty: float) -> int:
    """llama.cpp's penalties + greedy samplers on one row of logits (a float* of n_vocab)."""
    import numpy as np

    logits = np.ctypeslib.as_array(logits_ptr, shape=(n_vocab,))
    if penalty != 1.0 and new:
        logits = logits.copy()
        seen = np.unique(np.asarray(new[-PENALTY_LAST_N:], dtype=np.int64))
        v = logits[seen]
        logits[seen] = np.where(v <= 0, v * np.float32(penalty), v / np.float32(penalty))
    return int(np.argmax(logits))


def _gguf_batched(llm, tok, recipe: Recipe, prompts: list[list[int]], slots: int) -> list[tuple[list[int], bool]]:
    """Greedy generation of all prompts as up to `slots` parallel sequences of one llama.cpp
    context (continuous batching): each llama_decode call carries the next token of every running
    sequence plus the prompt of each sequence that starts in a freed slot, so the model runs once
    per step for all of them. The prefix every prompt shares (the template header) is decoded
    once, into a sequence of its own, and each new sequence starts from a copy of it
    (llama_memory_seq_cp: the cache cells are shared, not recomputed). The context shares `llm`'s
    model and settings (threads, KV types), with one unified KV buffer. Greedy choice and repeat
    penalty are llama.cpp's own sampler rules (penalties over the last PENALTY_LAST_N generated
    tokens: a logit <= 0 times the penalty, else divided by it; then the first largest logit).
    The output equals one prompt at a time token for token except where llama.cpp's kernels flip
    a near-tie: a quantized matmul over several rows sums in another order than over one (the same
    holds for a prompt decoded in one batch vs token by token). tests/stages/test_generation.py
    checks both, and that every divergence is such a tie."""
    import collections
    import os

    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    e = recipe.eval
    slots = min(slots, len(prompts), llama_cpp.llama_max_parallel_sequences() - 1)
    eos = {t for t in (tok.eos_id, llm.token_eos()) if t is not None and t >= 0}
    n_vocab = llm.n_vocab()
    # every prompt keeps at least its last token to decode (its logits pick the first new token)
    shared = min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)
    prefix_seq = slots  # the sequence holding the shared prefix
    per_seq = max(map(len, prompts)) + e.max_new_tokens + 1
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_seq_max, params.kv_unified = slots + 1, True
    params.n_ctx = -(-(shared + slots * (per_seq - shared)) // 256) * 256  # llama.cpp pads it to 256
    params.n_batch = params.n_ubatch = max(512, max(map(len, prompts)) + slots)
    with suppress_stdout_stderr(disable=False):  # llama.cpp warns when n_ctx exceeds the trained length
        ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if ctx is None:
        raise RuntimeError(f"llama.cpp could not create a context for {slots} sequences of {per_seq} tokens")
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    try:
        mem = llama_cpp.llama_get_memory(ctx)
        n = 0

        def put(token: int, pos: int, seq: int, logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, logits
            batch.seq_id[n][0] = seq
            n += 1

        def decode(what: str) -> None:
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} for {what} ({n} tokens)")

        for j, t in enumerate(prompts[0][:shared]):
            put(t, j, prefix_seq, j == shared - 1)
        if shared:
            decode("the shared prompt prefix")
        out: list[tuple[list[int], bool] | None] = [None] * len(prompts)
        pending = collections.deque(range(len(prompts)))
        running: dict[int, dict[str, Any]] = {}  # slot -> prompt index, next position, tokens so far
        while pending or running:
            n, rows = 0, []
            for s, st in running.items():
                put(st["new"][-1], st["pos"], s, True)
                rows.append((s, n - 1))
                st["pos"] += 1
            free = [s for s in range(slots) if s not in running]
            while pending and free and n + len(prompts[pending[0]]) - shared <= params.n_batch:
                i, s = pending.popleft(), free.pop(0)
                if shared:
                    llama_cpp.llama_memory_seq_cp(mem, prefix_seq, s, -1, -1)
                for j in range(shared, len(prompts[i])):
                    put(prompts[i][j], j, s, j == len(prompts[i]) - 1)
                rows.append((s, n - 1))
                running[s] = {"i": i, "pos": len(prompts[i]), "new": []}
            decode(f"{len(rows)} sequences")
            for s, idx in rows:
                st = running[s]
                t = _greedy(llama_cpp.llama_get_logits_ith(ctx, idx), n_vocab, st["new"], e.repetition_penalty)
                ended = t in eos
                if not ended:
                    st["new"].append(t)
                if ended or len(st["new"]) >= e.max_new_tokens:
                    out[st["i"]] = (st["new"], ended)
                    llama_cpp.llama_memory_seq_rm(mem, s, -1, -1)  # the prefix cells stay with prefix_seq
                    del running[s]
        return out  # type: ignore[return-value]  # every prompt's slot finished above
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def summarize(gens: list[dict[str, Any]], refs: list[str]) -> dict[str, float]:
    n = max(len(gens), 1)
    lens = sorted(g["tokens"] for g in gens) or [0]
    return {"eos_rate": sum(g["ended_with_eos"] for g in gens) / n,
            "exact_match": sum(_answer(r, g["text"]) for g, r in zip(gens, refs)) / n,
            "answer_tokens_mean": sum(lens) / n, "answer_tokens_median": lens[len(lens) // 2],
            "answer_tokens_max": lens[-1]}
