"""Evaluate stage: evaluation inputs by reference, expected-vs-reproduced table, judge endpoint,
report sections, and `dvc metrics show/diff` across two runs of the tiny recipe (issue 6, done
means 4).

Run: .venv/bin/python -m pytest -q tests/test_evaluate.py -p no:cacheprovider
     (`-m "not slow"` for the unit tests only, a few seconds)

The slow tests share one small tiny-recipe run (tests/tiny_pipeline.py: 64 rows, 3 steps, f16
GGUF) in a temporary git copy of the checkout; everything is offline (downloads go to a server on
127.0.0.1).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import subprocess
import threading
from pathlib import Path

import pytest

from support.repo import SHARED_DATA, kit_env
from qlora_kit import evaluate
from qlora_kit.sources import prompt_sets
from qlora_kit.config import EvalFile, PromptSet, load_recipe
from qlora_kit.errors import DataError
from support.pipeline import FAST, clone_outputs, pipeline_root, run_stages
from qlora_kit.scoring.expected import compare_expected
from qlora_kit.scoring import report as scoring_report
from qlora_kit.judge import client as judge_client
from qlora_kit.judge import prompts as judge_prompts

COMMIT = "0" * 40


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def eval_file(path: str, data: bytes, **kw) -> EvalFile:
    return EvalFile(repo="owner/repo", commit=COMMIT, path=path, sha256=sha(data), **kw)


@pytest.fixture()
def shared(tmp_path, monkeypatch):
    """An empty shared-data folder that evaluate looks in first."""
    d = tmp_path / "shared"
    d.mkdir()
    monkeypatch.setenv(prompt_sets.SHARED_DATA_ENV, str(d))
    return d


def put(shared: Path, path: str, data: bytes) -> None:
    target = shared / "owner-repo" / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


# --- evaluation files: shared copy, cache, download, verification ----------------------------

KOMT_JSONL = "".join(json.dumps({"id": i, "instruction": f"질문 {i}?", "answer": f"답 {i}", "score": 3},
                                ensure_ascii=False) + "\n" for i in range(3)).encode()


def test_shared_copy_is_verified_and_read(shared, tmp_path):
    f = eval_file("eval/komt.jsonl", KOMT_JSONL, rows=3, fields={"id": "id", "instruction": "instruction",
                                                                  "answer": "answer"})
    put(shared, "eval/komt.jsonl", KOMT_JSONL)
    path, how = prompt_sets.locate(f, tmp_path / "cache", allow_download=False)
    assert how["from"] == "shared" and path == shared / "owner-repo/eval/komt.jsonl"
    rows = prompt_sets.rows_of(f, path)
    assert [(r["id"], r["instruction"], r["input"], r["answer"]) for r in rows][0] == (0, "질문 0?", "", "답 0")
    # a copy whose bytes differ from the pin is not used, and without downloads the file is unavailable
    put(shared, "eval/komt.jsonl", KOMT_JSONL.replace(b"3}", b"4}"))
    with pytest.raises(prompt_sets.Unavailable, match="sha256 .* differs.*not attempted"):
        prompt_sets.locate(f, tmp_path / "cache", allow_download=False)


class FileServer:
    """Serves fixed bytes on 127.0.0.1, standing in for raw.githubusercontent.com."""

    def __init__(self, files: dict[str, bytes]):
        self.hits: list[str] = []
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                srv.hits.append(self.path)
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_at_the_pinned_url_verifies_and_caches(shared, tmp_path, monkeypatch):
    f = eval_file("eval/komt.jsonl", KOMT_JSONL, fields={"instruction": "instruction"})
    server = FileServer({f"/owner/repo/{COMMIT}/eval/komt.jsonl": KOMT_JSONL,
                         f"/owner/repo/{COMMIT}/eval/bad.jsonl": b"{}\n"})
    try:
        monkeypatch.setattr(prompt_sets, "RAW_URL", server.url + "/{repo}/{commit}/{path}")
        cache = tmp_path / "cache"
        path, how = prompt_sets.locate(f, cache, allow_download=True)
        assert how["from"] == "download" and path == cache / "owner-repo/eval/komt.jsonl"
        assert path.read_bytes() == KOMT_JSONL
        path, how = prompt_sets.locate(f, cache, allow_download=True)  # second time: the verified cache
        assert how["from"] == "cache" and len(server.hits) == 1
        bad = eval_file("eval/bad.jsonl", KOMT_JSONL)  # the server sends other bytes than pinned
        with pytest.raises(prompt_sets.Unavailable, match="sha256"):
            prompt_sets.locate(bad, cache, allow_download=True)
        assert not (cache / "owner-repo/eval/bad.jsonl").exists()
        with pytest.raises(prompt_sets.Unavailable, match="HTTP 404"):
            prompt_sets.locate(eval_file("eval/none.jsonl", b"x"), cache, allow_download=True)
    finally:
        server.close()


def test_unsafe_path_is_refused():
    with pytest.raises(DataError, match="relative"):
        prompt_sets.relative_path(eval_file("../../etc/passwd", b"x"))


def test_field_mapping_errors_name_file_line_and_field(shared, tmp_path):
    data = b'{"id": 1, "q": "a?"}\n{"id": 2, "x": "b?"}\n'
    put(shared, "p.jsonl", data)
    f = eval_file("p.jsonl", data, fields={"instruction": "q"})
    path, _ = prompt_sets.locate(f, None, allow_download=False)
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'q' \(kit name instruction\) missing"):
        prompt_sets.rows_of(f, path)
    with pytest.raises(DataError, match="2 records, the recipe says rows: 5"):
        prompt_sets.rows_of(eval_file("p.jsonl", data, rows=5, fields={"instruction": "id"}), path)


def test_pairwise_baseline_is_aligned_by_position_and_checked(shared, tmp_path):
    prompts = b'{"id": "k_0", "prompt": "A?"}\n{"id": "k_1", "prompt": "B?", "ins": [{"input": "ctx"}]}\n'
    base_ok = json.dumps([{"question_id": "k_1", "prompt": "A?", "alpaca2": "a"},
                          {"question_id": "k_2", "prompt": "B?", "alpaca2": "b"}]).encode()
    base_bad = json.dumps([{"prompt": "A?", "alpaca2": "a"}, {"prompt": "C?", "alpaca2": "b"}]).encode()
    put(shared, "p.jsonl", prompts)
    put(shared, "ok.json", base_ok)
    put(shared, "bad.json", base_bad)
    pf = eval_file("p.jsonl", prompts, fields={"id": "id", "instruction": "prompt"})
    ok = PromptSet(name="koala", judge="alpagasus", prompts=pf, baseline=eval_file(
        "ok.json", base_ok, format="json", fields={"instruction": "prompt", "answer": "alpaca2",
                                                    "input": "instances.0.input"}))
    loaded = prompt_sets.load_prompt_set(ok, None, allow_download=False)
    assert loaded.baseline == ["a", "b"] and [r["id"] for r in loaded.rows] == ["k_0", "k_1"]
    bad = ok.model_copy(update={"baseline": eval_file("bad.json", base_bad, format="json",
                                                      fields={"instruction": "prompt", "answer": "alpaca2"})})
    with pytest.raises(DataError, match=r"bad\.json: record 1: instruction differs"):
        prompt_sets.load_prompt_set(bad, None, allow_download=False)
    missing = ok.model_copy(update={"name": "gone", "prompts": eval_file("gone.jsonl", b"x")})
    gone = prompt_sets.load_prompt_set(missing, None, allow_download=False)
    assert gone.unavailable.startswith("not found under") and not gone.rows
    assert judge_prompts.alpagasus_judge_question("Rewrite.", "ctx") == "Rewrite. Input: ctx"


def test_every_recipe_prompt_set_loads_from_shared_data():
    """The recipes' pins match the files in ../shared/data and their field maps fit every row."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    for name in ("komt", "alpagasus2-13b", "llama2-koalpaca", "polyglot-koalpaca"):
        recipe = load_recipe(name)
        for ps in recipe.eval.prompt_sets:
            loaded = prompt_sets.load_prompt_set(ps, None, allow_download=False)
            assert not loaded.unavailable, (name, ps.name, loaded.unavailable)
            assert len(loaded.rows) == ps.prompts.rows
            if ps.judge == "alpagasus":
                assert len(loaded.baseline) == len(loaded.rows)
            if ps.judge == "komt":
                assert all(r["answer"] for r in loaded.rows)  # the recorded answers, judged as "recorded"
    curve = load_recipe("polyglot-koalpaca").eval.reference_curve
    path, _ = prompt_sets.locate(curve, None, allow_download=False)
    ref = scoring_report.read_reference_curve(path)
    assert ref["total_steps"] == 17692 and ref["points"][0] == (200, 2.2448) and len(ref["points"]) == 88


# --- judge endpoint ------------------------------------------------------------------------------

def test_judge_endpoint_from_recipe_or_environment():
    off = judge_client.resolve_endpoint("", "", environ={})
    assert not off.configured and off.message.startswith("judge: not configured: set QLORA_KIT_JUDGE_BASE_URL")
    local = judge_client.resolve_endpoint("http://127.0.0.1:9/v1", "tiny", environ={})
    assert local.configured and not local.require_api_key  # a judge on this machine needs no key
    remote = judge_client.resolve_endpoint("https://api.example.com/v1", "gpt", environ={})
    assert not remote.configured and "QLORA_KIT_JUDGE_API_KEY" in remote.message
    env = {"QLORA_KIT_JUDGE_BASE_URL": "https://user:secret@judge.example.com/v1?token=abc",
           "QLORA_KIT_JUDGE_MODEL": "m2", "QLORA_KIT_JUDGE_API_KEY": "sk-123"}
    both = judge_client.resolve_endpoint("http://127.0.0.1:9/v1", "tiny", environ=env)
    assert both.configured and both.model == "m2" and both.base_url.startswith("https://user")
    assert "secret" not in both.message and "abc" not in both.message and "sk-123" not in both.message
    assert "judge.example.com/v1" in both.message and "from the environment" in both.message


# --- expected vs reproduced ------------------------------------------------------------------------

def test_compare_expected_measured_tolerance_scale_and_reasons():
    metrics = {
        "train": {"global_step": 17692, "train_loss": 1.86},
        "judge": {"status": "ok", "koala": {"status": "ok", "n": 180, "out_of": 180, "win": 100, "tie": 60, "lose": 20},
                  "vicuna": {"status": "ok", "n": 5, "out_of": 5, "win": 3, "tie": 2, "lose": 0},
                  "komt-37": {"status": "off: judge: not configured: set X"}},
        "benchmarks": {"status": "ok", "arc": {"acc_norm": 0.6}, "mmlu": {"acc": 0.5}},
    }
    expected = {
        "global_step": {"value": 17692, "tolerance": 0, "metric": "train.global_step"},
        "train_loss": {"value": 1.7985, "tolerance": 0.05, "metric": "train.train_loss"},
        "alpagasus_koala": {"value": {"win": 94, "tie": 71, "lose": 15}, "out_of": 180, "tolerance": {"win": 15},
                            "metric": "judge.koala"},
        "alpagasus_vicuna": {"value": {"win": 40, "tie": 38, "lose": 2}, "out_of": 80, "metric": "judge.vicuna"},
        "komt": {"value": 117, "out_of": 185, "tolerance": 15, "metric": "judge.komt-37.recorded.sum"},
        "leaderboard": {"value": {"arc": 61.09, "mmlu": 55.27, "avg": 59.34}, "scale": 100,
                        "tolerance": {"arc": 2.0, "mmlu": 2.0},
                        "metric": {"arc": "benchmarks.arc.acc_norm", "mmlu": "benchmarks.mmlu.acc"}},
        "published_only": {"value": 1, "applies_to": "the published model"},
    }
    out = compare_expected(expected, metrics)
    assert out["global_step"]["within_tolerance"] is True and out["global_step"]["reproduced"] == 17692
    assert out["train_loss"]["within_tolerance"] is False
    assert out["alpagasus_koala"]["reproduced"] == {"win": 100, "tie": 60, "lose": 20}
    assert out["alpagasus_koala"]["within_tolerance"] is True  # only `win` has a tolerance
    assert out["alpagasus_vicuna"]["status"].startswith("not comparable: this run measured out of 5")
    assert out["alpagasus_vicuna"]["within_tolerance"] is None
    assert out["komt"]["status"] == "not measured in this run: off: judge: not configured: set X"
    lb = out["leaderboard"]
    assert lb["reproduced"] == pytest.approx({"arc": 60.0, "mmlu": 50.0})
    assert lb["within_tolerance"] is False and "(not measured: avg)" in lb["status"]
    assert out["published_only"]["status"].startswith("not measured in this run: the kit measures no counterpart")
    short = scoring_report.for_dvc({"expected": out, "judge": metrics["judge"]})
    assert short["expected"]["komt"]["status"] == "not measured in this run"
    assert short["judge"]["komt-37"]["status"] == "off"


# --- the evaluate stage on a tiny run --------------------------------------------------------------

def _dvc(root: Path, *args: str) -> str:
    res = subprocess.run(["dvc", *args], cwd=root, env=kit_env(root), capture_output=True, text=True)
    assert res.returncode == 0, f"dvc {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _commit(root: Path, message: str) -> None:
    # reports/ is git-ignored (DVC tracks outputs), but `dvc metrics diff` between commits reads
    # the committed metrics files (they are `cache: false`), so they are added by force.
    files = [f"reports/tiny/{n}" for n in ("metrics.json", "data_report.json", "merge_parity.json")]
    env = kit_env(root, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                  GIT_COMMITTER_EMAIL="t@t")
    # --allow-empty: a headline that did not change between two runs is a commit with no change
    for cmd in (["git", "add", "-f", *files], ["git", "commit", "--allow-empty", "-qm", message]):
        subprocess.run(cmd, cwd=root, check=True, env=env, capture_output=True)


@pytest.mark.slow
def test_dvc_metrics_show_and_diff_across_two_runs(tmp_path_factory, monkeypatch):
    root = pipeline_root(tmp_path_factory)
    monkeypatch.delenv("QLORA_KIT_JUDGE_BASE_URL", raising=False)
    run_stages(root, ("evaluate",), FAST)
    first = json.loads((root / "reports/tiny/details.json").read_text())
    _commit(root, "run 1")
    run_stages(root, ("evaluate",), {**FAST, "eval.num_prompts": 3})
    second = json.loads((root / "reports/tiny/details.json").read_text())
    headline = json.loads((root / "reports/tiny/metrics.json").read_text())
    _commit(root, "run 2")
    assert (first["prompts"], second["prompts"]) == (2, 3)
    # details.json: the keys other tests and the README rely on, unchanged in name and kind
    for m in (first, second):
        assert {"val_loss_before", "val_loss_after"} <= set(m) and "eos_rate" in m["hf"]
        assert {"val_loss", "eos_rate", "parity_mean_kl"} <= set(m["gguf"]["f16"])
        assert m["judge"]["status"] == "off" and m["benchmarks"]["status"] == "off" and m["expected"] == {}
        assert len(m["environment"]["fingerprint"]) == 16 and m["train"]["global_step"] == 3
    # metrics.json: the numbers-only headline
    assert headline == {"steps": 3, "loss": {"before": round(second["val_loss_before"], 6),
                                             "after": round(second["val_loss_after"], 6)},
                        "eos": {"hf": second["hf"]["eos_rate"], "gguf": second["gguf"]["f16"]["eos_rate"]},
                        "kl": {"f16": round(second["gguf"]["f16"]["parity_mean_kl"], 6)}}
    report = (root / "reports/tiny/report.md").read_text()
    for text in ("EOS before max_new_tokens", "![loss curve](evaluate/loss_curve.png)", "## Source reported vs reproduced",
                 "judge: off: the recipe has no judged prompt sets", "Status: off: the recipe lists no benchmarks",
                 "GGUF parity (quantize stage", "| f16 |", "## Environment", "Fingerprint `"):
        assert text in report, text

    show = _dvc(root, "metrics", "show")
    header = show.splitlines()[0].split()
    assert set(header) == {"Path", "eos.gguf", "eos.hf", "kl.f16", "loss.after", "loss.before", "steps"}, show
    shown = json.loads(_dvc(root, "metrics", "show", "--json"))
    assert shown[""]["data"]["reports/tiny/metrics.json"]["data"] == headline

    diff = json.loads(_dvc(root, "metrics", "diff", "--all", "--json", "HEAD~1", "HEAD"))
    changed = diff["reports/tiny/metrics.json"]
    # same model, same validation rows: the losses are unchanged; the EOS rates are over 2 vs 3 prompts
    assert changed["loss.after"]["old"] == changed["loss.after"]["new"] == headline["loss"]["after"]
    assert changed["eos.hf"]["new"] == headline["eos"]["hf"]


@pytest.mark.slow
def test_prompt_sets_unavailable_unjudged_and_reference_curve(tmp_path_factory, tmp_path, shared, monkeypatch):
    """A recipe with prompt sets but no judge: generation-only sets are answered, judged ones say
    how to configure the judge, a missing file is reported (no crash, no download), and a source
    training curve is drawn under ours."""
    for var in ("QLORA_KIT_JUDGE_BASE_URL", "QLORA_KIT_JUDGE_MODEL", "QLORA_KIT_JUDGE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    root = clone_outputs(pipeline_root(tmp_path_factory), tmp_path / "root")
    txt = "누전차단기가 내려가는 이유는?\n\nWhat is 2 + 2?\n".encode()
    state = json.dumps({"global_step": 400, "max_steps": 400, "log_history": [
        {"step": 100, "loss": 2.5}, {"step": 200, "loss": 2.0}, {"step": 400, "loss": 1.8},
        {"step": 400, "train_loss": 2.1}]}).encode()
    put(shared, "datasets/testset.txt", txt)
    put(shared, "eval/komt.jsonl", KOMT_JSONL)
    put(shared, "trainer_state.json", state)
    sets = [
        {"name": "testset", "judge": "none", "prompts": {"repo": "owner/repo", "commit": COMMIT,
                                                         "path": "datasets/testset.txt", "sha256": sha(txt),
                                                         "format": "txt", "rows": 2}},
        {"name": "komt-3", "judge": "komt", "prompts": {"repo": "owner/repo", "commit": COMMIT,
                                                        "path": "eval/komt.jsonl", "sha256": sha(KOMT_JSONL),
                                                        "fields": {"id": "id", "instruction": "instruction",
                                                                   "answer": "answer"}}},
        {"name": "gone", "judge": "none", "prompts": {"repo": "owner/repo", "commit": COMMIT,
                                                      "path": "nowhere.jsonl", "sha256": "1" * 64}},
    ]
    over = {**FAST, "eval.prompt_sets": sets,
            "eval.reference_curve": {"repo": "owner/repo", "commit": COMMIT, "path": "trainer_state.json",
                                     "sha256": sha(state), "format": "json"},
            "expected.metrics": {"komt_judge": {"value": 117, "out_of": 185, "tolerance": 15,
                                                "metric": "judge.komt-3.recorded.sum"}}}
    monkeypatch.setenv("QLORA_KIT_ROOT", str(root))
    m = evaluate.run(load_recipe("tiny", over), over)
    assert m["prompt_sets"]["testset"]["status"] == "ok" and m["prompt_sets"]["testset"]["answered"] == 2
    assert m["prompt_sets"]["komt-3"]["status"] == "not answered: judge not configured"
    assert m["prompt_sets"]["gone"]["status"].startswith("unavailable: not found under")
    assert m["judge"]["status"].startswith("not configured: set QLORA_KIT_JUDGE_BASE_URL")
    assert m["expected"]["komt_judge"]["status"] == ("not measured in this run: off: judge not configured "
                                                     "(see the LLM judge section)")
    assert not (root / "reports/tiny/prompt_sets").exists()  # nothing downloaded
    answered = root / "reports/tiny/evaluate/prompt_sets/testset.jsonl"
    answers = [json.loads(x) for x in answered.read_text().splitlines()]
    assert [a["instruction"] for a in answers] == ["누전차단기가 내려가는 이유는?", "What is 2 + 2?"]
    assert all("text" in a and "ended_with_eos" in a for a in answers)
    report = (root / "reports/tiny/report.md").read_text()
    assert "judge: not configured: set QLORA_KIT_JUDGE_BASE_URL" in report
    assert "| gone | source | none | - | unavailable: not found under" in report
    assert ("The dashed curve is the source's own training loss (`trainer_state.json`, 3 logged points over "
            "400 steps") in report
    assert "| komt_judge | this run | 117 / 185 | not measured in this run: off: judge not configured" in report
    saved = json.loads((root / "reports/tiny/details.json").read_text())
    assert saved["prompt_sets"]["gone"]["status"] == "unavailable" and saved["judge"]["status"] == "not configured"


# --- judging prompt sets (no model: answers given) ---------------------------------------------

def _loaded(name: str, style: str, rows: list[dict], baseline: list[str] | None = None):
    spec = PromptSet(name=name, judge=style, prompts=eval_file(f"{name}.jsonl", b"x"),
                     baseline=eval_file(f"{name}.json", b"y") if style == "alpagasus" else None)
    return prompt_sets.LoadedSet(spec, rows=rows, baseline=baseline)


def test_judge_prompt_sets_tables_and_a_failing_judge(tmp_path):
    from support.judge_stub import StubServer  # canned judge: answers containing GOOD score high

    komt = _loaded("komt-2", "komt", [{"id": 0, "instruction": "질문?", "input": "", "answer": "GOOD 기록"},
                                      {"id": 1, "instruction": "Q?", "input": "", "answer": "recorded"}])
    pair = _loaded("koala-2", "alpagasus", [{"id": "k0", "instruction": "A?", "input": ""},
                                            {"id": "k1", "instruction": "B?", "input": "ctx"}], ["weak", "GOOD base"])
    gone = _loaded("gone", "komt", [])
    gone.unavailable = "not found"
    answers = {"komt-2": [{"text": "GOOD 답"}, {"text": "bad"}], "koala-2": [{"text": "GOOD"}, {"text": "weak"}]}
    stub = StubServer()
    try:
        endpoint = judge_client.resolve_endpoint(stub.base_url, "stub", environ={})
        out, records = evaluate.judge_prompt_sets([komt, pair, gone], answers, endpoint, tmp_path / "cache.jsonl")
        assert out["komt-2"] == {"style": "komt", "status": "ok", "of_prompts": 2, "n": 2, "out_of": 10, "sum": 6,
                                 "average": 3.0, "percentage": 60.0, "unparsed": 0,
                                 "recorded": {"n": 2, "out_of": 10, "sum": 6, "average": 3.0, "percentage": 60.0,
                                              "unparsed": 0}}
        assert [r["score"] for r in records["komt-2"]] == [5, 1]
        assert {k: out["koala-2"][k] for k in ("n", "win", "tie", "lose", "parse_failures")} == {
            "n": 2, "win": 1, "tie": 0, "lose": 1, "parse_failures": 0}
        assert out["gone"]["status"] == "unavailable: not found"
        assert (out["http_requests"], out["cache_hits"]) == (8, 0)
        questions = [r["body"]["messages"][-1]["content"] for r in stub.requests[4:]]
        assert questions[2].startswith("[Question]\nB? Input: ctx\n")  # the judge sees the input
        # a judge that refuses (HTTP 400, not retried) fails its set; the next set is not tried
        stub.script = ["400"]
        out, _ = evaluate.judge_prompt_sets([_loaded("k3", "komt", komt.rows), pair], {
            "k3": [{"text": "new"}, {"text": "other"}], "koala-2": answers["koala-2"]}, endpoint,
            tmp_path / "cache.jsonl", client_options={"sleep": lambda s: None})
        assert out["k3"]["status"].startswith("failed: judge http://127.0.0.1:") and "HTTP 400" in out["k3"]["status"]
        assert out["koala-2"]["status"] == "failed: not judged, the judge failed on k3"
    finally:
        stub.close()
