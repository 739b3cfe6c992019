"""Both judges end to end against a real OpenAI-compatible server (issue 6, done means 2).

Run: .venv/bin/python -m pytest -q tests/test_judge_server.py -p no:cacheprovider

The evaluate stage runs on the tiny recipe (tests/tiny_pipeline.py) with two prompt sets defined
here, one komt-style (0-5 per answer, with recorded answers) and one AlpaGasus-style (pairwise vs
recorded baseline answers, both orders), and its judge pointed at llama-cpp-python's own server
(`python -m llama_cpp.server`) serving the tiny model's GGUF on 127.0.0.1, through a small proxy
that answers the first request with HTTP 500 so the client's retry path runs for real.

Why the f16 GGUF: on this project's AMX-capable CPUs llama.cpp repacks *quantized* weights into
its AMX buffer type and then segfaults in llama_decode (see qlora_kit.gguf.runtime). The kit's
own loader switches extra buffer types off, but the server builds its model itself and has no
such flag; f16 weights never go to the AMX buffer type, so the f16 file is served.

A tiny random model is a useless judge: its replies do not parse. The test therefore checks the
path, not the scores: requests made (and their bodies), parse outcomes counted, cache written and
reused, tables in metrics.json and report.md.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from qlora_kit import evaluate
from qlora_kit.config import load_recipe
from support.pipeline import FAST, clone_outputs, pipeline_root
from support.repo import terminate
from qlora_kit.judge import client as judge_client
from qlora_kit.judge import live as judge_live
from qlora_kit.judge import prompts as judge_prompts

pytestmark = pytest.mark.slow

COMMIT = "1" * 40
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never via a proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def llama_server(tmp_path_factory, tmp_path):
    """llama-cpp-python's server on the tiny f16 GGUF; yields its /v1 base URL."""
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] extras not installed")
    gguf = pipeline_root(tmp_path_factory) / "models/tiny/gguf/model-f16.gguf"
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--seed", "0",
                             # a judge's chat format, not the GGUF's own template: that one follows the
                             # kit's chat convention and refuses the AlpaGasus judge's system message
                             # (the tiny prompt has no system text)
                             "--chat_format", "chatml",
                             # one thread: on a shared 2-core machine two spinning llama.cpp threads
                             # make a 4M-parameter model take seconds per reply instead of ~1 s
                             "--n_threads", "1", "--n_threads_batch", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with _DIRECT.open(base + "/models", timeout=2) as r:
                    assert r.status == 200
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (tmp_path / "server.log").read_text()[-3000:]
                    raise RuntimeError("llama_cpp.server did not start:\n" + tail)
                time.sleep(0.5)
        yield base
    finally:
        terminate(proc)
        log.close()


class FlakyProxy:
    """Forwards POSTs to the server; answers the first `fail_first` of them with HTTP 500 itself."""

    def __init__(self, upstream: str, fail_first: int = 1):
        self.posts: list[dict] = []
        self.forwarded = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.posts.append({"path": self.path, "body": json.loads(body),
                                    "authorization": self.headers.get("Authorization")})
                if len(proxy.posts) <= fail_first:
                    status, payload = 500, b'{"error": {"message": "injected failure"}}'
                else:
                    req = urllib.request.Request(upstream + self.path.removeprefix("/v1"), data=body,
                                                 headers={"Content-Type": "application/json"}, method="POST")
                    with _DIRECT.open(req, timeout=120) as r:
                        status, payload = r.status, r.read()
                    proxy.forwarded += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _file(shared: Path, path: str, data: bytes, **kw) -> dict:
    target = shared / "test-prompts" / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return {"repo": "test/prompts", "commit": COMMIT, "path": path, "sha256": hashlib.sha256(data).hexdigest(), **kw}


def prompt_sets(shared: Path) -> list[dict]:
    komt = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"id": 0, "instruction": "인삼은 어떤 효과가 있나요?", "answer": "면역력 향상에 도움이 됩니다.", "score": 4},
        {"id": 1, "instruction": "What is 3 plus 4?", "answer": "7", "score": 5},
        {"id": 2, "instruction": "서울은 어느 나라의 수도인가요?", "answer": "한국", "score": 5}]).encode()
    questions = "".join(json.dumps(r) + "\n" for r in [
        {"id": "s_0", "instruction": "Rewrite the sentence.", "instances": [{"input": "It is good.", "output": ""}]},
        {"id": "s_1", "instruction": "Name a color.", "instances": [{"input": "", "output": ""}]}]).encode()
    baseline = json.dumps([{"question_id": "s_1", "instruction": "Rewrite the sentence.", "alpaca2": "It's good."},
                           {"question_id": "s_2", "instruction": "Name a color.", "alpaca2": "Blue."}]).encode()
    return [
        {"name": "komt-3", "judge": "komt",
         "prompts": _file(shared, "komt.jsonl", komt, rows=3,
                          fields={"id": "id", "instruction": "instruction", "answer": "answer"})},
        {"name": "sinstruct-2", "judge": "alpagasus",
         "prompts": _file(shared, "sinstruct.jsonl", questions, rows=2,
                          fields={"id": "id", "instruction": "instruction", "input": "instances.0.input"}),
         "baseline": _file(shared, "sinstruct_seed_0.json", baseline, format="json",
                           fields={"instruction": "instruction", "answer": "alpaca2"})},
    ]


def test_both_judges_against_llama_cpp_server_with_a_retried_failure(llama_server, tmp_path_factory, tmp_path,
                                                                      monkeypatch):
    root = clone_outputs(pipeline_root(tmp_path_factory), tmp_path / "root")
    shared = tmp_path / "shared"
    for var in ("QLORA_KIT_JUDGE_BASE_URL", "QLORA_KIT_JUDGE_MODEL", "QLORA_KIT_JUDGE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QLORA_KIT_SHARED_DATA", str(shared))
    monkeypatch.setenv("QLORA_KIT_ROOT", str(root))
    proxy = FlakyProxy(llama_server)
    try:
        over = {**FAST, "eval.prompt_sets": prompt_sets(shared), "eval.judge_base_url": proxy.base_url,
                "eval.judge_model": "tiny-judge",
                "expected.metrics": {
                    "komt_recorded": {"value": 14, "out_of": 15, "tolerance": 15,
                                      "metric": "judge.komt-3.recorded.sum"},
                    "pairwise": {"value": {"win": 1, "tie": 1, "lose": 0}, "out_of": 2, "tolerance": {"win": 2},
                                 "metric": "judge.sinstruct-2"}}}
        recipe = load_recipe("tiny", over)
        try:
            evaluate.run(recipe, over)
            failed = ""
        except evaluate.EvaluationFailed as e:  # a random tiny judge's replies rarely parse
            failed = str(e)
    finally:
        proxy.close()
    m = json.loads((root / "reports/tiny/evaluate/manifest.json").read_text())["facts"]["metrics"]

    j = m["judge"]
    assert j["configured"] and j["status"].startswith(f"configured: tiny-judge at {proxy.base_url}")
    # komt: 3 model answers + 3 recorded answers; AlpaGasus: 2 questions x 2 orders = 10 judge calls
    assert (j["completions"], j["http_requests"], j["retries"], j["cache_hits"]) == (10, 11, 1, 0)
    assert len(proxy.posts) == 11 and proxy.forwarded == 10
    assert all(p["path"] == "/v1/chat/completions" and p["authorization"] is None for p in proxy.posts)
    bodies = [p["body"] for p in proxy.posts]
    assert bodies[0] == bodies[1]  # the failed request was sent again, unchanged
    komt_bodies = [b for b in bodies[1:] if b["messages"][0]["role"] == "user"]
    pair_bodies = [b for b in bodies[1:] if b["messages"][0]["role"] == "system"]
    assert len(komt_bodies) == 6 and len(pair_bodies) == 4
    assert all(b["model"] == "tiny-judge" and b["temperature"] == 0.0 and b["max_tokens"] == 256 for b in bodies)
    assert pair_bodies[0]["messages"][0]["content"] == judge_prompts.ALPAGASUS_SYSTEM_PROMPT
    # both orders: the model's answer first, then the baseline's first; the judge sees the input
    first, second = (b["messages"][1]["content"] for b in pair_bodies[:2])
    assert first.startswith("[Question]\nRewrite the sentence. Input: It is good.\n")
    assert "[The Start of Assistant 2's Answer]\nIt's good.\n" in first
    assert "[The Start of Assistant 1's Answer]\nIt's good.\n" in second
    assert "면역력 향상에 도움이 됩니다." in komt_bodies[3]["messages"][0]["content"]  # a recorded answer

    komt = j["komt-3"]
    assert komt["n"] == 3 and komt["out_of"] == 15 and komt["recorded"]["n"] == 3
    pair = j["sinstruct-2"]
    assert pair["n"] == 2 and pair["win"] + pair["tie"] + pair["lose"] == 2
    # honest status: more than 20 % unparsed replies is "failed" and evaluate raises (exit 1)
    assert komt["status"] == judge_live.set_status(komt) and pair["status"] == judge_live.set_status(pair)
    bad = [k for k in ("komt-3", "sinstruct-2") if j[k]["status"] != "ok"]
    assert bool(failed) == bool(bad) and all(k in failed for k in bad)
    assert 0 <= pair["parse_failures"] <= 4
    reports = root / "reports/tiny"
    items = [json.loads(x) for x in (reports / "evaluate/prompt_sets/komt-3.jsonl").read_text().splitlines()]
    assert komt["unparsed"] == sum(i["score"] is None for i in items)  # parse outcomes counted
    assert komt["sum"] == sum(i["score"] or 0 for i in items)
    assert all(isinstance(i["judge"], str) and "recorded_judge" in i for i in items)
    pairs = [json.loads(x) for x in (reports / "evaluate/prompt_sets/sinstruct-2.jsonl").read_text().splitlines()]
    assert pair["parse_failures"] == sum((p["score_model_first"] == [-1, -1]) + (p["score_baseline_first"] == [-1, -1])
                                         for p in pairs)

    cache = [json.loads(x) for x in (reports / "judge_cache.jsonl").read_text().splitlines()]
    assert len(cache) == 10 and len({c["key"] for c in cache}) == 10 and all(c["model"] == "tiny-judge" for c in cache)

    saved = json.loads((reports / "details.json").read_text())
    assert saved["judge"]["komt-3"]["sum"] == komt["sum"] and saved["judge"]["sinstruct-2"]["win"] == pair["win"]
    assert saved["judge"]["status"] == "configured"
    assert saved["judge"]["komt-3"]["status"] == komt["status"].split(":", 1)[0]
    assert saved["expected"]["komt_recorded"]["reproduced"] == komt["recorded"]["sum"]
    assert saved["expected"]["komt_recorded"]["within_tolerance"] is True  # 0..15 is within 15 of 14
    assert saved["expected"]["pairwise"]["reproduced"]["win"] == pair["win"]
    report = (reports / "report.md").read_text()
    assert "judge: configured: tiny-judge at http://127.0.0.1:" in report
    assert "11 HTTP requests (1 retries), 0 answered from `judge_cache.jsonl`" in report
    assert f"| komt-3 | this run (merged model) | 3 | {komt['sum']} / 15 |" in report
    assert f"| komt-3 | recorded answers in the prompt file | 3 | {komt['recorded']['sum']} / 15 |" in report
    assert f"| sinstruct-2 | 2 | {pair['win']} | {pair['tie']} | {pair['lose']} | {pair['parse_failures']} |" in report

    # A rerun judges nothing again: every call is answered from the cache, with the same tables.
    sets = evaluate.load_prompt_sets(recipe, reports / "prompt_sets", online=True)
    answers = {s.name: [{"text": json.loads(x)["text"]} for x in
                        (reports / f"evaluate/prompt_sets/{s.name}.jsonl").read_text().splitlines()] for s in sets}
    endpoint = judge_client.resolve_endpoint("http://127.0.0.1:9/v1", "tiny-judge")  # nothing listens there
    again, _ = evaluate.judge_prompt_sets(sets, answers, endpoint, reports / "judge_cache.jsonl")
    assert (again["http_requests"], again["cache_hits"]) == (0, 10)
    assert {k: again["komt-3"][k] for k in komt} == komt and again["sinstruct-2"] == pair
    assert os.environ.get("QLORA_KIT_JUDGE_API_KEY") is None
