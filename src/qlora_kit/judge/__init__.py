"""LLM-as-judge scoring for the evaluate stage: komt (0-5 per answer) and AlpaGasus (pairwise).

Two judge styles, each reproducing one source:

* komt (davidkim205/komt README.md:L348-366): a judge scores every answer 0-5; per model the
  scores are summed over the questions and shown as sum / average (sum/N) / percentage (sum/5N).
  The source never published its judge prompt, so ``DEFAULT_KOMT_JUDGE_PROMPT`` is ours.
* AlpaGasus (gauss5930/AlpaGasus2-QLoRA evaluation/AlpaGasus-Evaluation/evaluation.py and
  result_graph.py): a judge compares two answers and returns "s1 s2" on its first line; every
  question is judged in both orders and turned into win / tie / lose for the model.

One code path: the live judge (``judge_komt`` / ``judge_alpagasus`` over ``JudgeClient``) and the
replay of recorded judge outputs (``replay_komt`` / ``replay_alpagasus``) both build
``KomtJudgment`` / ``PairJudgment`` objects from raw judge text, which parse with the same parser,
and both aggregate with ``summarise_komt`` / ``tally_alpagasus``.

The live client talks to any OpenAI-compatible endpoint (``POST {base_url}/chat/completions``)
with the standard library only (urllib), so a hosted API and llama-cpp-python's local server
work the same way. The API key is read only from an environment variable whose *name* is passed
in (default ``QLORA_KIT_JUDGE_API_KEY``); it is sent as a Bearer header and never stored, logged
or written. Judged items go to an append-only JSONL cache so an interrupted run resumes without
paying twice.

In the evaluate stage (``evaluate.judge_prompt_sets``) the endpoint comes from
``resolve_endpoint``: ``QLORA_KIT_JUDGE_BASE_URL`` / ``QLORA_KIT_JUDGE_MODEL`` or the recipe's
``eval.judge_base_url`` / ``eval.judge_model``; a judge on 127.0.0.1 needs no key.
``judge_komt_set`` scores the merged model's answers and, where the prompt file records another
model's answers (komt's score files do), those too, so the kit's judge can be compared with the
source's on the same text; ``judge_alpagasus_set`` judges the model against the recorded baseline
in both orders. Their tables go to metrics.json (``judge.<prompt set>.*``) and report.md.

Run the replay (prints a markdown table, or JSON with ``--json``)::

    qlora-kit judge replay --style alpagasus --data-dir MIRROR   # the sources' files, <repo>/<path>
    qlora-kit judge replay --style komt --json                  # MIRROR = $QLORA_KIT_SHARED_DATA
    python -m qlora_kit.judge replay --style komt        # same, without the main CLI
"""
