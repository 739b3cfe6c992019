"""scoring/generation: batched HF generation equals one-at-a-time generation token for token
(greedy, fp32, Llama and GPT-NeoX, with and without a repetition penalty), sampled batches are reproducible, a
GGUF context that keeps the shared prompt prefix generates exactly what from-scratch decoding
generates, while decoding fewer prompt tokens, and batched GGUF generation (parallel sequences
of one llama.cpp context, f16 and K-quant) equals one prompt at a time with llama.cpp's sampler,
with and without a repeat penalty, in fewer llama_decode calls.

The GGUF test uses the shared small tiny-recipe run (support/pipeline.py, f16 GGUF).
"""
from __future__ import annotations

import os

import pytest

from qlora_kit.config import load_recipe
from qlora_kit.scoring.generation import gguf_generate, gguf_generate_ids, hf_generate, hf_generate_ids, prompt_ids
from support.pipeline import FAST, pipeline_root


def _prompts(recipe, tok, rows, n: int = 11) -> list[list[int]]:
    prompts = [prompt_ids(recipe, tok, r) for r in rows[:n]]
    assert len({len(p) for p in prompts}) > 2  # lengths differ: the batches are padded
    return prompts


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_neox"])
def hf(request):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kit.text.tokenizer import load_tokenizer

    folder = request.getfixturevalue(request.param)
    base = {"eval.max_new_tokens": 12, "template.add_bos": request.param == "tiny_llama"}  # NeoX: no BOS
    tok = load_tokenizer(folder, load_recipe("tiny", base).template)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return base, tok, model


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_hf_generation_equals_one_at_a_time(hf, sample_rows, penalty):
    base, tok, model = hf
    recipe = load_recipe("tiny", {**base, "eval.repetition_penalty": penalty})
    prompts = _prompts(recipe, tok, sample_rows)
    one = hf_generate_ids(model, tok, recipe, prompts, batch_size=1)
    for bs in (3, 8, len(prompts)):
        assert hf_generate_ids(model, tok, recipe, prompts, batch_size=bs) == one, bs
    assert hf_generate(model, tok, recipe, prompts) == hf_generate(model, tok, recipe, prompts, batch_size=1)
    assert all(len(new) == 12 or ended for new, ended in one)


def test_sampled_batches_are_seeded_and_reproducible(hf, sample_rows):
    import torch

    base, tok, model = hf
    recipe = load_recipe("tiny", {**base, "eval.do_sample": True, "eval.temperature": 1.5})
    prompts = _prompts(recipe, tok, sample_rows)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(hf_generate_ids(model, tok, recipe, prompts, batch_size=4))
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_gguf_prefix_reuse_equals_decoding_from_scratch(tmp_path_factory, sample_rows, monkeypatch):
    from qlora_kit import layout
    from qlora_kit.gguf.runtime import open_gguf
    from qlora_kit.scoring.logprobs import gguf_completion_loss
    from qlora_kit.text.examples import read_split
    from qlora_kit.text.tokenizer import load_tokenizer

    monkeypatch.setenv("QLORA_KIT_ROOT", str(pipeline_root(tmp_path_factory)))
    recipe, paths = load_recipe("tiny", {**FAST, "eval.max_new_tokens": 12}), layout.paths("tiny")
    tok = load_tokenizer(paths.merged, recipe.template)
    prompts = _prompts(recipe, tok, sample_rows)
    val = read_split(paths.processed, "val")
    with open_gguf(paths.gguf / "model-f16.gguf", n_ctx=512, logits_all=True, seed=0, n_threads=1) as llm:
        gguf_completion_loss(llm, val)  # what evaluate runs first in the same context
        decoded: list[int] = []
        real_eval = llm.eval
        llm.eval = lambda toks: (decoded.append(len(toks)), real_eval(toks))[1]
        new = gguf_generate_ids(llm, tok, recipe, prompts, reuse_prefix=True, batch_size=1)
        n_new, decoded[:] = sum(decoded), []
        old = gguf_generate_ids(llm, tok, recipe, prompts, reuse_prefix=False, batch_size=1)
        assert new == old
        assert n_new < sum(decoded)  # the shared prefix was not decoded again
        assert gguf_generate(llm, tok, recipe, prompts, batch_size=1) == gguf_generate(
            llm, tok, recipe, prompts, reuse_prefix=False, batch_size=1)


def _same_or_near_tie(llm, prompts, one, got, penalty, eos) -> int:
    """How many prompts' batched answers differ from one at a time; each difference must start at
    a near-tie. The yardstick is llama.cpp's own noise: the same tokens decoded in one batch and
    token by token give logits that differ by up to `noise` (largest over the rows); the two
    tokens' penalised logits at the first difference must lie within 2 x noise of each other, the
    most two such computations can move them apart."""
    import numpy as np

    assert len(got) == len(one)
    diff = 0
    for ids, (a, a_end), (b, b_end) in zip(prompts, one, got):
        if (a, a_end) == (b, b_end):
            continue
        diff += 1
        a, b = a + [eos] * a_end, b + [eos] * b_end  # the choice at each step, EOS included
        k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), None)
        assert k is not None, "the answers agree on every token both chose, yet differ"
        seq = ids + a[:k]
        llm.reset()
        llm.eval(seq)
        batch = np.array(llm.scores[:len(seq)], dtype=np.float32)
        llm.reset()
        for t in seq:
            llm.eval([t])
        noise = float(np.abs(batch - np.array(llm.scores[:len(seq)], dtype=np.float32)).max())
        lg = batch[-1].copy()
        for t in set(a[max(0, k - 64):k]):
            lg[t] = lg[t] * np.float32(penalty) if lg[t] <= 0 else lg[t] / np.float32(penalty)
        assert abs(float(lg[a[k]]) - float(lg[b[k]])) <= 2 * noise, (k, a[k], b[k], lg[a[k]], lg[b[k]], noise)
    return diff


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory, tiny_llama):
    """GGUFs (f16 and q4_k_m) of two models: the shared tiny run's 3-step model ("trained": most
    answers end early with EOS) and the untrained tiny Llama ("random": answers run to the limit)."""
    from qlora_kit.gguf.converter import convert
    from qlora_kit.quantize import quantize_file

    root = pipeline_root(tmp_path_factory)
    out = tmp_path_factory.mktemp("gguf-batched")
    files = {("trained", "f16"): root / "models" / "tiny" / "gguf" / "model-f16.gguf",
             ("random", "f16"): out / "random-f16.gguf"}
    convert(tiny_llama, files["random", "f16"], "f16")
    for model in ("trained", "random"):
        files[model, "q4_k_m"] = out / f"{model}-q4_k_m.gguf"
        quantize_file(files[model, "f16"], files[model, "q4_k_m"], "q4_k_m")
    return root, files


@pytest.mark.slow
@pytest.mark.parametrize("model", ["trained", "random"])
@pytest.mark.parametrize("qtype", ["f16", "q4_k_m"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_gguf_batched_equals_one_at_a_time(tiny_ggufs, tiny_llama, sample_rows, monkeypatch, model, qtype, penalty):
    import llama_cpp

    from qlora_kit import layout
    from qlora_kit.gguf.runtime import open_gguf
    from qlora_kit.text.tokenizer import load_tokenizer

    root, files = tiny_ggufs
    monkeypatch.setenv("QLORA_KIT_ROOT", str(root))
    recipe = load_recipe("tiny", {**FAST, "eval.max_new_tokens": 12, "eval.repetition_penalty": penalty})
    tok = load_tokenizer(layout.paths("tiny").merged if model == "trained" else tiny_llama, recipe.template)
    prompts = _prompts(recipe, tok, sample_rows)
    with open_gguf(files[model, qtype], n_ctx=512, logits_all=True, seed=0, n_threads=1) as llm:
        one = gguf_generate_ids(llm, tok, recipe, prompts, reuse_prefix=False, batch_size=1)
        if model == "random":  # long answers: many steps with several sequences running
            assert sum(len(new) for new, _ in one) > 8 * len(prompts)
        else:  # answers that end at once with EOS free their sequence for the next prompt
            assert sum(ended for _, ended in one) > len(prompts) // 2
        calls: list[int] = []
        real = llama_cpp.llama_decode
        monkeypatch.setattr(llama_cpp, "llama_decode", lambda ctx, b: (calls.append(b.n_tokens), real(ctx, b))[1])
        for bs in (2, 4, len(prompts)):
            calls.clear()
            got = gguf_generate_ids(llm, tok, recipe, prompts, batch_size=bs)
            n_calls = len(calls)
            assert _same_or_near_tie(llm, prompts, one, got, penalty, tok.eos_id) <= len(prompts) // 4, bs
            calls[:] = calls[:n_calls]
            # one call per step for all running sequences, fewer than one per token
            assert len(calls) < 0.75 * sum(len(new) + ended for new, ended in one), (bs, len(calls))
        # every prompt in a slot of its own: as many calls as the longest sequence needs logits,
        # after one for the prefix all prompts share (the template header, decoded once)
        assert len(os.path.commonprefix(prompts)) > 1
        assert len(calls) == 1 + max(len(new) + ended for new, ended in one)
        assert calls[0] == len(os.path.commonprefix(prompts))
        if qtype == "f16":  # f16: the batched sums equal the one-row sums here
            assert gguf_generate(llm, tok, recipe, prompts) == gguf_generate(llm, tok, recipe, prompts, batch_size=1)
        # the batched context is separate: llm's own context still generates as before
        assert gguf_generate_ids(llm, tok, recipe, prompts, batch_size=1) == one
