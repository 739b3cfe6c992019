"""The source recipes: they load, cite their values, run preprocess on a tiny model of their own
architecture with their real template, special tokens, masking and length policy, flip their
quirk switches the way recipes/QUIRKS.md says, preprocess the real data in ../shared/data when it
is there (skipped when it is not), and render through `qlora-kit render`.

    .venv/bin/python -m pytest -q tests/test_recipes.py -p no:cacheprovider

Tiny models come from the session fixtures in conftest.py (built once, offline). The per-recipe
overrides that swap in the tiny model live in tests/recipe_overrides.py, shared with the
end-to-end tests.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from qlora_kit import cli
from qlora_kit.config import load_recipe
from qlora_kit.fetch import sample_path
from qlora_kit.text.examples import IGNORE, build, tokenize_example
from qlora_kit.text.rows import check_row, read_rows
from qlora_kit.text.templates import render, render_inference
from qlora_kit.text.tokenizer import load_tokenizer
from support.overrides import ALLOWED_KEYS, SAMPLE_ROWS, TINY_OVERRIDES
from support.repo import REPO

RECIPES = REPO / "recipes"
SHARED_DATA = REPO.parent / "shared" / "data"
REAL = sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem != "tiny")
BASE_OF = {"llama2-koalpaca-7b": "llama2-koalpaca", "alpagasus2-13b": "alpagasus2"}


def recipe(name: str, overrides: dict | None = None, **fixed: bool):
    o = dict(overrides or {})
    o.update({f"quirks.{q}.fix": v for q, v in fixed.items()})
    return load_recipe(str(RECIPES / f"{name}.yaml"), o)


def tiny(name: str, extra: dict | None = None, **fixed: bool):
    return recipe(name, {**TINY_OVERRIDES[name], **(extra or {})}, **fixed)


@pytest.fixture(scope="module")
def tiny_dirs(tiny_llama, tiny_neox):
    return {"llama": tiny_llama, "gpt_neox": tiny_neox}


@pytest.fixture(scope="module")
def sample():
    return list(read_rows(sample_path(), "json"))


def tok_for(r, tiny_dirs):
    return load_tokenizer(tiny_dirs[r.model.arch], r.template)


def one_example(r, tok, row):
    rend = render(r.template, row, bos=tok.bos, eos=tok.eos)
    return tokenize_example(rend.prompt, rend.completion, tok, r.template, r.preprocess)


# --- loading ----------------------------------------------------------------------------------

def test_the_four_sources_and_their_variants_are_there():
    assert set(REAL) == {"llama2-koalpaca", "llama2-koalpaca-7b", "komt", "alpagasus2", "alpagasus2-13b",
                         "polyglot-koalpaca"}


@pytest.mark.parametrize("name", REAL + ["tiny"])
def test_recipe_loads_strictly(name):
    r = recipe(name)
    assert r.name == name
    for q in r.quirks:  # every switch yields a valid recipe too
        assert recipe(name, **{q: True}).quirks[q].fix


@pytest.mark.parametrize("name", REAL)
def test_real_recipe_is_pinned_and_faithful_by_default(name):
    r = recipe(name)
    assert re.fullmatch(r"[0-9a-f]{40}", r.source.commit) and r.source.repo
    assert r.source.readme.startswith("seeds/")
    if (REPO.parent / "shared" / "seeds").is_dir():
        assert (REPO.parent / "shared" / r.source.readme).is_file()
    assert r.model.source == "hub" and r.model.revision is None  # fetch records the resolved commit
    if r.data.source == "url":
        assert r.data.url.startswith("https://raw.githubusercontent.com/")
        assert re.search(r"/[0-9a-f]{40}/", r.data.url) and re.fullmatch(r"[0-9a-f]{40}", r.data.git_blob)
        for extra in r.data.extra:
            assert re.search(r"/[0-9a-f]{40}/", extra["url"]) and re.fullmatch(r"[0-9a-f]{40}", extra["git_blob"])
    else:
        assert r.data.source == "hub" and r.data.hub_dataset == "beomi/KoAlpaca-v1.1a"
    assert r.quirks, "every source shipped at least one quirk"
    for q in r.quirks.values():
        assert not q.fix and q.when_fixed and q.cite and q.description
    for ps in r.eval.prompt_sets:  # referenced, never copied: no eval file lives in the repo
        for f in (ps.prompts, ps.baseline):
            if f is not None:
                for d in ("src", "tests", "recipes"):
                    assert not list((REPO / d).rglob(Path(f.path).name)), (d, f.path)


@pytest.mark.parametrize("name", REAL)
def test_real_recipe_data_is_what_fetch_can_download(name):
    """The fetch stage's own offline check of `data` (and every `data.extra`), default and fixed."""
    from qlora_kit.sources.download import data_files

    r = recipe(name)
    files = data_files(r)
    assert all(f.source in ("url", "hub") and (f.git_blob or f.source == "hub") for f in files)
    assert len({f.name for f in files}) == len(files)
    for q in r.quirks:
        data_files(recipe(name, **{q: True}))


@pytest.mark.parametrize("name", REAL)
def test_every_reproduced_value_carries_a_comment(name):
    """Each value under model/data/template/preprocess/quant/lora/train/merge/quantize/eval has a
    comment on its line or belongs to a run of values directly under a comment (a cited group)."""
    lines = (RECIPES / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
    section, missing = None, []
    for i, line in enumerate(lines):
        top = re.match(r"^([a-z_]+):", line)
        if top:
            section = top.group(1)
            continue
        if section not in ("model", "data", "template", "preprocess", "qlora", "lora", "train", "merge",
                           "quantize", "eval"):
            continue
        m = re.match(r"^  ([A-Za-z_][\w-]*): (.+)$", line)
        if not m or m.group(2).startswith((">", "|")):
            continue
        if section in ("model", "data") and m.group(1) == "source":
            continue  # how the kit fetches (hub / url), not a value of the source's run
        if " # " in line or line.rstrip().endswith("#"):
            continue
        j = i - 1
        while j >= 0 and re.match(r"^  [A-Za-z_][\w-]*: ", lines[j]) and " # " not in lines[j]:
            j -= 1
        if j >= 0 and (lines[j].lstrip().startswith("#") or re.match(r"^  [A-Za-z_][\w-]*: .* # ", lines[j])):
            continue
        missing.append(f"{name}.yaml:{i + 1}: {line.strip()}")
    assert not missing, "\n".join(missing)


# --- the tiny overrides ---------------------------------------------------------------------------

def test_tiny_overrides_cover_every_recipe_and_swap_only_model_data_and_counts():
    assert set(TINY_OVERRIDES) == set(REAL)
    for name, o in TINY_OVERRIDES.items():
        bad = [k for k in o if not k.startswith(ALLOWED_KEYS)]
        assert not bad, (name, bad)
        real, small = recipe(name), tiny(name)
        assert small.model.source == "tiny" and small.model.arch == real.model.arch
        assert small.data.source == "tiny-sample"
        for section in ("template", "qlora", "lora", "merge", "quirks"):
            assert getattr(small, section) == getattr(real, section), (name, section)
        assert small.preprocess.model_copy(update={"max_length": real.preprocess.max_length}) == real.preprocess
        assert small.preprocess.max_length <= 512
        t_real, t_small = real.train.model_dump(), small.train.model_dump()
        for k in ("max_steps", "warmup_steps", "logging_steps", "eval_steps", "save_steps"):
            t_real.pop(k), t_small.pop(k)
        assert t_real == t_small, name


# What each recipe's examples must look like on the tiny model: does the prompt carry loss, how
# does the sequence start, and where is EOS (last and learned / last and masked / absent).
SHAPE = {
    "llama2-koalpaca": dict(prompt_loss=True, first="<s>", eos="masked", val=1),
    "llama2-koalpaca-7b": dict(prompt_loss=True, first="<s>", eos="masked", val=1),
    "komt": dict(prompt_loss=False, first="</s>", eos="learned", val=0),
    # 64 rows x 0.05 = 3.2 -> 4: datasets' train_test_split sizes the test part with ceil
    "alpagasus2": dict(prompt_loss=True, first="<s>", eos="absent", val=4),
    "alpagasus2-13b": dict(prompt_loss=True, first="<s>", eos="absent", val=4),
    "polyglot-koalpaca": dict(prompt_loss=False, first=None, eos="learned", val=0),
}


@pytest.mark.parametrize("name", REAL)
def test_preprocess_on_tiny_model(name, tiny_dirs, sample):
    r = tiny(name)
    tok = tok_for(r, tiny_dirs)
    shape = SHAPE[name]
    parts, rep = build(sample[: r.data.limit], tok, r.template, r.preprocess)
    report = rep.to_json()
    assert report["rows_in"] == SAMPLE_ROWS and report["dropped"] == 0 and report["truncated"] == 0
    assert report["kept_by_split"] == {"train": SAMPLE_ROWS - shape["val"], "val": shape["val"]}
    for ex in parts["train"] + parts["val"]:
        ids, labels, n = ex.input_ids, ex.labels, ex.prompt_len
        bos = [tok.bos_id] if r.template.add_bos else []
        if shape["prompt_loss"]:  # joint + full loss: the whole text in one encode, no prompt count
            assert n is None and ids == bos + tok.encode(ex.prompt + ex.completion)
            n = len(bos + tok.encode(ex.prompt))
        assert ids[:n] == bos + tok.encode(ex.prompt), "label mask boundary drifted"
        assert ids[n:] == tok.encode(ex.prompt + ex.completion)[n - len(bos):]
        if shape["prompt_loss"]:
            assert labels[:n] == ids[:n]
        else:
            assert labels[:n] == [IGNORE] * n and labels[n] == ids[n]
        if shape["first"] is None:
            assert tok.bos_id is None and ids[0] != tok.eos_id
        else:
            assert ids[0] == tok.hf.convert_tokens_to_ids(shape["first"])
        body = ids[1:] if bos else ids
        if shape["eos"] == "absent":
            assert tok.eos_id not in body and labels == ids
        else:
            assert ids[-1] == tok.eos_id and tok.eos_id not in body[:-1]
            assert labels[-1] == (IGNORE if shape["eos"] == "masked" else tok.eos_id)
            assert labels[n:-1] == ids[n:-1]


def test_length_policy_drops_llama2_koalpaca_and_truncates_the_others(tiny_dirs, sample):
    rows = sample[:SAMPLE_ROWS]
    for name, action in (("llama2-koalpaca", "drop"), ("komt", "truncate"), ("alpagasus2", "truncate"),
                         ("polyglot-koalpaca", "truncate")):
        r = tiny(name)
        tok = tok_for(r, tiny_dirs)
        lengths = sorted(len(one_example(r, tok, row.fields)[0]) for row in rows)
        limit = lengths[len(lengths) // 2]  # half the rows are over it
        r = tiny(name, {"preprocess.max_length": limit})
        parts, rep = build(rows, tok, r.template, r.preprocess)
        over = sum(n + (1 if r.preprocess.count_extra_bos else 0) > limit for n in lengths)
        assert over > 0
        if action == "drop":
            assert rep.dropped["overlength"] == over and rep.truncated == 0
        else:  # a row whose prompt alone fills the limit has nothing left to learn: dropped as such
            assert rep.truncated == over and set(rep.dropped) <= {"no_loss_tokens"}
            assert max(len(e.input_ids) for e in parts["train"]) == limit


# --- quirk switches ---------------------------------------------------------------------------------

ROW = {"instruction": "세 가지 기본 색은 무엇인가요?", "input": "", "output": "빨강, 파랑, 노랑입니다."}
ROW_IN = {"instruction": "다음 단어를 영어로 번역하세요.", "input": "사과", "output": "apple"}


def _eos_never_learned(name, ctx):
    for fixed, want in ((False, IGNORE), (True, None)):
        r = tiny(name, eos_never_learned=fixed)
        tok = tok_for(r, ctx)
        ids, labels, _ = one_example(r, tok, ROW)
        assert ids[-1] == tok.eos_id and labels[-1] == (want if want is not None else tok.eos_id)


def _val_ratio_ignored(name, ctx):
    rows = list(read_rows(sample_path(), "json"))[:200]
    sizes = []
    for fixed in (False, True):
        r = tiny(name, {"data.limit": 200}, val_ratio_ignored=fixed)
        _, rep = build(rows, tok_for(r, ctx), r.template, r.preprocess)
        sizes.append(rep.kept["val"])
    assert sizes == [2, 10]


def _length_count_extra_bos(name, ctx):
    r = tiny(name)
    tok = tok_for(r, ctx)
    n = len(one_example(r, tok, ROW)[0])
    rows = [check_row("x.json", 1, ROW, {})] * 2
    kept = []
    for fixed in (False, True):
        r = tiny(name, {"preprocess.max_length": n}, length_count_extra_bos=fixed)
        _, rep = build(rows, tok, r.template, r.preprocess)
        kept.append(sum(rep.kept.values()))
    assert kept == [0, 2]  # faithful: n real tokens count as n + 1 > n -> dropped


def _eos_without_space(name, ctx):
    out = [render(recipe(name, eos_without_space=f).template, ROW, eos="</s>").completion for f in (False, True)]
    assert out == [" 빨강, 파랑, 노랑입니다.</s>", " 빨강, 파랑, 노랑입니다. </s>"]


def _config(name, quirk, path, before, after):
    def check(_name, ctx):
        got = []
        for fixed in (False, True):
            obj = recipe(_name, **{quirk: fixed})
            for part in path.split("."):
                obj = getattr(obj, part)
            got.append(obj)
        assert got == [before, after]
    return check


def _bos_is_eos(name, ctx):
    firsts = []
    for fixed in (False, True):
        r = tiny(name, bos_is_eos=fixed)
        tok = tok_for(r, ctx)
        firsts.append(tok.hf.convert_ids_to_tokens(one_example(r, tok, ROW)[0][0]))
    assert firsts == ["</s>", "<s>"]


def _inference_is_training_prompt(quirk, row):
    def check(name, ctx):
        before, after = (recipe(name, **{quirk: f}).template for f in (False, True))
        train_prompt = render(before, row, eos="x").prompt
        assert render_inference(before, row) != train_prompt
        assert render_inference(after, row) == train_prompt
    return check


def _no_eos_in_training_text(name, ctx):
    for fixed in (False, True):
        r = tiny(name, no_eos_in_training_text=fixed)
        tok = tok_for(r, ctx)
        ids, labels, _ = one_example(r, tok, ROW)
        assert (ids[-1] == tok.eos_id and labels[-1] == tok.eos_id) == fixed
        assert (tok.eos_id in ids) == fixed


def _generation_drops_input(name, ctx):
    before, after = (render_inference(recipe(name, generation_drops_input=f).template, ROW_IN) for f in (False, True))
    assert "사과" not in before and "### Input:\n사과\n\n### Response:\n" in after


def _cutoff_len_readme_512(name, ctx):
    long_row = {**ROW, "output": " ".join(["apple banana cherry"] * 120)}
    lens = []
    for fixed in (False, True):
        r = tiny(name, {"preprocess.max_length": recipe(name, cutoff_len_readme_512=fixed).preprocess.max_length})
        tok = tok_for(r, ctx)
        _, rep = build([check_row("x.json", 1, long_row, {})] * 2, tok, r.template, r.preprocess)
        lens.append(rep.tokens["train"] // rep.kept["train"])
    assert lens == [256, 512]


def _warmup_counts_micro_batches(name, ctx):
    from qlora_kit.train import derived_numbers

    got = [derived_numbers(70775, recipe(name, warmup_counts_micro_batches=f), 1, 100.0) for f in (False, True)]
    # the published run took 17,692 optimizer steps (trainer_state.json global_step) under
    # transformers 4.36, which dropped each epoch's trailing partial accumulation; transformers 5
    # steps on it, so the kit's run takes 17,696 (4 more, one per epoch) — either way
    assert [d["total_steps"] for d in got] == [17696, 17696]
    assert [d["warmup_steps"] for d in got] == [7077, 1770]  # 40 % of the run vs 10 %


CHECKS = {
    ("llama2-koalpaca", "eos_never_learned"): _eos_never_learned,
    ("llama2-koalpaca", "val_ratio_ignored"): _val_ratio_ignored,
    ("llama2-koalpaca", "length_count_extra_bos"): _length_count_extra_bos,
    ("llama2-koalpaca", "eos_without_space"): _eos_without_space,
    ("llama2-koalpaca", "fp16_amp_with_bf16_compute"): _config(
        "llama2-koalpaca", "fp16_amp_with_bf16_compute", "train.precision", "fp16", "bf16"),
    ("komt", "bits_8_not_4"): _config("komt", "bits_8_not_4", "qlora.bits", 8, 4),
    ("komt", "max_steps_overrides_epochs"): _config("komt", "max_steps_overrides_epochs", "train.max_steps", 1000, -1),
    ("komt", "learning_rate_1e-6"): _config("komt", "learning_rate_1e-6", "train.learning_rate", 1e-6, 1e-5),
    ("komt", "bos_is_eos"): _bos_is_eos,
    ("komt", "train_infer_prompt_mismatch"): _inference_is_training_prompt("train_infer_prompt_mismatch", ROW),
    ("alpagasus2", "bnb_kwargs_misspelled"): _config(
        "alpagasus2", "bnb_kwargs_misspelled", "qlora.double_quant", False, True),
    ("alpagasus2", "no_eos_in_training_text"): _no_eos_in_training_text,
    ("alpagasus2", "generation_drops_input"): _generation_drops_input,
    ("alpagasus2", "dataset_is_not_gpt4lifes"): _config(
        "alpagasus2", "dataset_is_not_gpt4lifes", "data.git_blob", "d81ee91f9777110253471666e52e54358d695b39",
        "2b9c35d88dbe33644e667ac5fd3aeb79231cb84c"),
    ("alpagasus2", "cutoff_len_readme_512"): _cutoff_len_readme_512,
    ("polyglot-koalpaca", "warmup_counts_micro_batches"): _warmup_counts_micro_batches,
    ("polyglot-koalpaca", "eval_prompt_differs"): _inference_is_training_prompt("eval_prompt_differs", ROW_IN),
    ("polyglot-koalpaca", "merge_into_4bit"): _config(
        "polyglot-koalpaca", "merge_into_4bit", "merge.base", "nf4-roundtrip", "original"),
}

def _source_kept_unusable_rows(name, ctx):
    """Faithful: a blank output and a control character are trained on; fixed: dropped, counted."""
    from support.chartok import CharTok
    from qlora_kit.text.examples import build
    from qlora_kit.text.rows import check_row

    rows = [check_row("f.jsonl", i + 1, r, {}) for i, r in enumerate(
        [ROW, {"instruction": "a", "input": "", "output": "  "}, {"instruction": "b", "input": "", "output": "x\x07"}])]
    for fixed, dropped in ((False, {}), (True, {"empty_output": 1, "control_character": 1})):
        r = recipe(name, {"preprocess.val_ratio": 0.0}, source_kept_unusable_rows=fixed)
        assert dict(build(rows, CharTok(), r.template, r.preprocess)[1].dropped) == dropped


for _n in ("llama2-koalpaca", "komt", "alpagasus2"):
    CHECKS[(_n, "source_kept_unusable_rows")] = _source_kept_unusable_rows

ALL_QUIRKS = [(n, q) for n in REAL for q in recipe(n).quirks]


@pytest.mark.parametrize("name,quirk", ALL_QUIRKS)
def test_quirk_switch_changes_what_the_table_says(name, quirk, tiny_dirs):
    CHECKS[(BASE_OF.get(name, name), quirk)](name, tiny_dirs)
    # and nothing but its own `when_fixed` keys (plus the switch itself)
    before, after = recipe(name).model_dump(mode="json"), recipe(name, **{quirk: True}).model_dump(mode="json")
    after["quirks"][quirk]["fix"] = False

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("special_tokens", "strip", "fields"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fb, fa = flat(before), flat(after)
    changed = {k for k in fb if fb[k] != fa[k]}
    assert changed and changed <= set(recipe(name).quirks[quirk].when_fixed), (changed,)


def _quirks_table() -> list[list[str]]:
    text = (RECIPES / "QUIRKS.md").read_text(encoding="utf-8")
    rows = [ln for ln in text.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    header, body = rows[0], rows[1:]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "recipe", "quirk", "what the source did (cite)", "kit default", "switch", "effect"]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in body]


def test_quirks_table_lists_every_switch_exactly_once():
    table = _quirks_table()
    listed = {}
    for cells in table:
        assert len(cells) == 6, cells
        quirk = cells[1].strip("`")
        for name in re.split(r",\s*", cells[0].replace("`", "")):
            assert (name, quirk) not in listed, (name, quirk)
            listed[(name, quirk)] = cells
    assert set(listed) == set(ALL_QUIRKS)
    for (name, quirk), cells in listed.items():
        assert f"quirks.{quirk}.fix" in cells[4]
        for key in recipe(name).quirks[quirk].when_fixed:
            assert key in cells[5], (name, quirk, key)


# --- real data in ../shared/data ------------------------------------------------------------------

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")

REAL_DATA = {
    # id: (recipe, file under shared/data, format, field map, skip_rows, hash key, hash, rows in, dropped by reason)
    # Faithful recipes keep the blank outputs and control characters their sources trained on
    # (quirk source_kept_unusable_rows): helpfulness_t45 holds 1 empty output, claude_t45 4,
    # random_9k 4 and 1 control character, all kept.
    "koalpaca-sample-l2k": ("llama2-koalpaca", "samples/Volume21-github_test__ko_alpaca_data.sample.json", "json",
                            {}, 11, "sha256", "312a37e58aaf1940c2612228605c1f0f171b256811736560f385b6a2547590f4",
                            661, None),
    "koalpaca-sample-polyglot": ("polyglot-koalpaca", "samples/Volume21-github_test__ko_alpaca_data.sample.json",
                                 "json", {}, 11, "sha256",
                                 "312a37e58aaf1940c2612228605c1f0f171b256811736560f385b6a2547590f4", 661, {}),
    "helpfulness-t45-alpagasus2": ("alpagasus2", "gpt4life-alpagasus/data/filtered/helpfulness_t45.json", "json", {},
                                   0, "git_blob", "8b41a13eb97045dfb7d011c9edd76b60c624a35a", 2022,
                                   {}),
    "komt-questions-komt": ("komt", "davidkim205-komt/eval_results/score_result_komt-llama2-7b-v1.jsonl", "jsonl",
                            {"output": "answer"}, 0, "git_blob", "8de645c11cf55e205b2f112417ea80b49a97be9a", 37, {}),
}
SLOW_REAL_DATA = {
    "claude-t45-alpagasus2": ("alpagasus2", "gpt4life-alpagasus/data/filtered/claude_t45.json", "json", {}, 0,
                              "git_blob", "752fc56c077de564ff066c46393172d92280535a", 5305, {}),
    "dolly-3k-alpagasus2": ("alpagasus2", "gpt4life-alpagasus/data/filtered/dolly_3k.json", "json", {}, 0,
                            "git_blob", "5d2a1d6f46dc3348e39942bd6ac2d38c3861e1b6", 2996, {}),
    "random-9k-alpagasus2": ("alpagasus2", "gpt4life-alpagasus/data/random/random_9k.json", "json", {}, 0,
                             "git_blob", "afb581799986a47e2f08a2810483e5c2b710f023", 9229, {}),
}


def _stage_run_on_real_data(case, tmp_path, monkeypatch, tiny_dirs):
    """fetch (local model = the tiny one, local data = the shared file, hash-checked) then
    preprocess, through the stages themselves, with the recipe's own preprocess values."""
    from qlora_kit import fetch, preprocess

    name, rel, fmt, fields, skip, hkey, hval, rows_in, dropped = case
    arch = recipe(name).model.arch
    monkeypatch.setenv("QLORA_KIT_ROOT", str(tmp_path))
    o = {"model.source": "local", "model.name": str(tiny_dirs[arch]),
         "data.source": "local", "data.path": str(SHARED_DATA / rel), "data.format": fmt, "data.fields": fields,
         "data.skip_rows": skip, "data.url": "", "data.git_blob": "", "data.sha256": "", "data.extra": [],
         "data.hub_dataset": "", f"data.{hkey}": hval}
    r = recipe(name, o)
    fetch.run(r, o)
    report = preprocess.run(r, o)
    on_disk = json.loads((tmp_path / "reports" / name / "data_report.json").read_text())
    assert on_disk == report
    assert report["rows_in"] == rows_in
    assert report["kept"] + report["dropped"] == rows_in
    assert sum(report["kept_by_split"].values()) == report["kept"] > 0
    if dropped is not None:
        assert report["dropped_by_reason"] == dropped
    else:  # the tiny tokenizer makes Korean long: some rows may be dropped as over-length, by that reason only
        assert set(report["dropped_by_reason"]) <= {"overlength"}
    processed = tmp_path / "data" / name / "processed"
    n_lines = sum(1 for _ in open(processed / "train.jsonl", encoding="utf-8"))
    assert n_lines == report["kept_by_split"]["train"]
    return report


@needs_shared
@pytest.mark.parametrize("case", list(REAL_DATA))
def test_preprocess_real_data(case, tmp_path, monkeypatch, tiny_dirs):
    _stage_run_on_real_data(REAL_DATA[case], tmp_path, monkeypatch, tiny_dirs)


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("case", list(SLOW_REAL_DATA))
def test_preprocess_real_data_large(case, tmp_path, monkeypatch, tiny_dirs):
    _stage_run_on_real_data(SLOW_REAL_DATA[case], tmp_path, monkeypatch, tiny_dirs)


# --- qlora-kit render -----------------------------------------------------------------------------

def _rows_file(tmp_path, rows) -> Path:
    p = tmp_path / "rows.json"
    p.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return p


@pytest.mark.parametrize("name", REAL)
def test_render_cli_prints_prompt_completion_text(name, tmp_path, capsys):
    f = _rows_file(tmp_path, [ROW, ROW_IN, ROW])
    assert cli.main(["render", "--recipe", str(RECIPES / f"{name}.yaml"), "--input", str(f), "--limit", "2"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 2
    r = recipe(name)
    bos = "" if r.model.arch == "gpt_neox" else r.template.special_tokens.get("bos", "<s>")
    for obj, row, line in zip(out, (ROW, ROW_IN), (2, 7)):
        assert obj["origin"] == f"rows.json:{line}"
        assert obj["text"] == (bos if r.template.add_bos else "") + obj["prompt"] + obj["completion"]
        assert obj["inference_prompt"] == render_inference(r.template, row, bos=bos)


@pytest.mark.parametrize("name", ["llama2-koalpaca", "komt", "alpagasus2", "polyglot-koalpaca"])
def test_render_cli_show_loss(name, tmp_path, capsys, tiny_dirs):
    f = _rows_file(tmp_path, [ROW])
    arch = recipe(name).model.arch
    code = cli.main(["render", "--recipe", str(RECIPES / f"{name}.yaml"), "--input", str(f), "--show-loss",
                     "--tokenizer", str(tiny_dirs[arch])])
    assert code == 0
    obj = json.loads(capsys.readouterr().out)
    flags = [c for _, c in obj["tokens"]]
    n_prompt = obj["counts"]["prompt_tokens"]
    assert obj["counts"]["tokens"] == len(flags) and obj["counts"]["loss_tokens"] == sum(flags)
    assert obj["length"]["action"] == "keep"
    if SHAPE[name]["prompt_loss"]:
        assert all(flags[:n_prompt])
    else:
        assert not any(flags[:n_prompt]) and all(flags[n_prompt:])
    last_piece, last_flag = obj["tokens"][-1]
    if SHAPE[name]["eos"] == "absent":
        assert last_piece not in ("</s>", "<|endoftext|>")
    else:
        assert last_piece in ("</s>", "<|endoftext|>") and last_flag == (SHAPE[name]["eos"] == "learned")


def test_render_strict_bad_row_exits_2_naming_file_and_line(tmp_path, capsys):
    f = _rows_file(tmp_path, [ROW, {"instruction": "no output here", "input": ""}])
    code = cli.main(["render", "--recipe", str(RECIPES / "komt.yaml"), "--input", str(f),
                     "--set", "preprocess.on_bad_row=error"])
    cap = capsys.readouterr()
    assert code == 2 and cap.out == ""  # nothing printed: no partial output
    assert f"{f}:7" in cap.err and "output" in cap.err


def test_render_lenient_bad_row_is_dropped_and_counted(tmp_path, capsys):
    f = _rows_file(tmp_path, [ROW, {"instruction": "empty output", "input": "", "output": " "}, ROW_IN])
    # faithful (the source trained on it): rendered; with the cleaning quirk fixed: dropped, counted
    assert cli.main(["render", "--recipe", str(RECIPES / "alpagasus2.yaml"), "--input", str(f)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert cli.main(["render", "--recipe", str(RECIPES / "alpagasus2.yaml"), "--input", str(f),
                     "--set", "quirks.source_kept_unusable_rows.fix=true"]) == 0
    cap = capsys.readouterr()
    assert len(cap.out.splitlines()) == 2
    assert "dropped 1 bad rows" in cap.err and "empty_output" in cap.err


def test_render_without_fetched_data_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QLORA_KIT_ROOT", str(tmp_path))
    assert cli.main(["render", "--recipe", str(RECIPES / "komt.yaml")]) == 2
    assert "qlora-kit fetch --recipe komt" in capsys.readouterr().err


def test_render_reads_fetched_raw_data(tmp_path, monkeypatch, capsys, tiny_dirs):
    """Without --input, render reads data/NAME/raw as fetch left it (data.limit honoured)."""
    from qlora_kit import fetch

    monkeypatch.setenv("QLORA_KIT_ROOT", str(tmp_path))
    o = {**TINY_OVERRIDES["polyglot-koalpaca"], "model.source": "local",
         "model.name": str(tiny_dirs["gpt_neox"]), "data.limit": 5}
    fetch.run(recipe("polyglot-koalpaca", o), o)
    args = ["render", "--recipe", str(RECIPES / "polyglot-koalpaca.yaml")]
    for k, v in o.items():
        args += ["--set", f"{k}={v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip()}"]
    assert cli.main(args + ["--show-loss"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    sample = json.loads(sample_path().read_text(encoding="utf-8"))
    assert len(out) == 5
    assert [o_["prompt"].split("### Instruction(명령어):\n")[1].split("\n\n\n")[0] for o_ in out] == [
        s["instruction"] for s in sample[:5]]
    assert all(o_["tokens"][-1] == ["<|endoftext|>", True] for o_ in out)
