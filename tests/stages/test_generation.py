"""scoring/generation: batched HF generation equals one-at-a-time generation token for token
(greedy, fp32, Llama and GPT-NeoX, with and without a repetition penalty), sampled batches are reproducible, and a
GGUF context that keeps the shared prompt prefix generates exactly what from-scratch decoding
generates, while decoding fewer prompt tokens.

The GGUF test uses the shared small tiny-recipe run (support/pipeline.py, f16 GGUF).
"""
from __future__ import annotations

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
        new = gguf_generate_ids(llm, tok, recipe, prompts, reuse_prefix=True)
        n_new, decoded[:] = sum(decoded), []
        old = gguf_generate_ids(llm, tok, recipe, prompts, reuse_prefix=False)
        assert new == old
        assert n_new < sum(decoded)  # the shared prefix was not decoded again
        assert gguf_generate(llm, tok, recipe, prompts) == gguf_generate(llm, tok, recipe, prompts, reuse_prefix=False)
