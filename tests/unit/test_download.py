"""Tests for the fetch stage's network code (qlora_kit.sources.download), all against 127.0.0.1.

Run: python -m pytest -q tests/test_download.py -p no:cacheprovider

A small HTTP server started in the test plays GitHub's raw file host (good file, 404, 500 then
success, truncated body, stalled body) and, for the Hub paths, a minimal Hugging Face Hub (the four
endpoints huggingface_hub's snapshot_download / hf_hub_download call). Hub runs go through the
real CLI in a subprocess, because huggingface_hub reads HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE
when it is imported. Nothing here touches any other host; DNS failure is simulated.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
import yaml

from qlora_kit.sources import download
from qlora_kit.config import RecipeError, load_recipe
from qlora_kit.sources.download import FetchError, OfflineError, fetch_remote_data
from support.repo import REPO

CANARY = "hf_CANARYdoNotWriteMe0123456789abcdef"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BODY = json.dumps([{"instruction": "하늘은 왜 파란가요?", "input": "", "output": "빛의 산란 때문입니다."},
                   {"instruction": "Say hi", "input": "", "output": "hi"}], ensure_ascii=False).encode()


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def git_blob(b: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()


# --- a local server --------------------------------------------------------------------------

Route = Callable[[BaseHTTPRequestHandler], None]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _dispatch(self) -> None:
        srv = self.server
        path = self.path.split("?", 1)[0]
        srv.hits[(self.command, path)] += 1
        srv.auth.append(self.headers.get("Authorization"))
        route = srv.routes.get(path) or next((r for p, r in srv.prefix_routes if path.startswith(p)), None)
        if route is None:
            send(self, 404, b"not found")
        else:
            route(self)

    do_GET = do_HEAD = _dispatch

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


def send(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict | None = None,
         length: int | None = None, stall: float = 0.0) -> None:
    h.send_response(status)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Connection", "close")
    h.end_headers()
    if h.command == "HEAD":
        return
    if stall:
        h.wfile.write(body[: len(body) // 2])
        h.wfile.flush()
        time.sleep(stall)
        body = body[len(body) // 2:]
    try:
        h.wfile.write(body)
    except OSError:  # the client gave up (timeout test)
        pass
    h.close_connection = True


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.routes, srv.prefix_routes = {}, []
    srv.hits, srv.auth = collections.Counter(), []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(download.HTTP_TIMEOUT_ENV, raising=False)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connecting is refused at once
    return port


def recipe_file(tmp_path: Path, data: dict, model: dict | None = None, name: str = "netcheck") -> Path:
    doc = {"model": model or {"source": "tiny", "name": "t", "arch": "llama"}, "data": data,
           "template": {"prompt": "{instruction}"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


def recipe(tmp_path: Path, **data):
    return load_recipe(str(recipe_file(tmp_path, {"source": "url", "format": "json", **data})))


class Sleeps(list):
    def __call__(self, s: float) -> None:
        self.append(s)


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def dest(tmp_path) -> Path:
    d = tmp_path / "raw"
    d.mkdir()
    return d


# --- plain URLs ------------------------------------------------------------------------------

@pytest.mark.parametrize("pin", ["sha256", "git_blob", "both"])
def test_good_download_is_verified_and_recorded(server, tmp_path, dest, pin):
    server.routes["/o/r/c0ffee/ko_alpaca.json"] = lambda h: send(h, 200, BODY)
    pins = {"sha256": sha256(BODY)} if pin == "sha256" else {"git_blob": git_blob(BODY)} if pin == "git_blob" \
        else {"sha256": sha256(BODY), "git_blob": git_blob(BODY)}
    r = recipe(tmp_path, url=server.url + "/o/r/c0ffee/ko_alpaca.json", fields={"input": "context"}, **pins)
    sleeps = Sleeps()
    [entry] = fetch_remote_data(r, dest, sleep=sleeps)
    assert (dest / "ko_alpaca.json").read_bytes() == BODY
    assert leftovers(dest) == ["ko_alpaca.json"]
    assert entry["name"] == "ko_alpaca.json" and entry["format"] == "json" and entry["fields"] == {"input": "context"}
    assert entry["sha256"] == sha256(BODY) and entry["git_blob"] == git_blob(BODY)
    assert entry["url"].endswith("/ko_alpaca.json") and entry["bytes"] == len(BODY) and entry["attempts"] == 1
    assert sleeps == []


def test_git_blob_matches_git_hash_object(server, tmp_path, dest):
    # The recipes pin GitHub blob ids; make sure ours is what `git hash-object` prints.
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    server.routes["/f.json"] = lambda h: send(h, 200, BODY)
    fetch_remote_data(recipe(tmp_path, url=server.url + "/f.json", git_blob=git_blob(BODY)), dest)
    out = subprocess.run(["git", "hash-object", str(dest / "f.json")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == git_blob(BODY)


@pytest.mark.parametrize("key", ["sha256", "git_blob"])
def test_checksum_mismatch_names_both_and_leaves_nothing(server, tmp_path, dest, key):
    server.routes["/f.json"] = lambda h: send(h, 200, BODY)
    wrong = "0" * (64 if key == "sha256" else 40)
    with pytest.raises(FetchError) as e:
        fetch_remote_data(recipe(tmp_path, url=server.url + "/f.json", **{key: wrong}), dest)
    actual = sha256(BODY) if key == "sha256" else git_blob(BODY)
    assert f"expected {wrong}" in str(e.value) and f"got {actual}" in str(e.value) and key in str(e.value)
    assert leftovers(dest) == []
    assert server.hits[("GET", "/f.json")] == 1  # a mismatch is not a network hiccup: no retry


def test_truncated_body_is_an_error_and_leaves_nothing(server, tmp_path, dest):
    server.routes["/f.json"] = lambda h: send(h, 200, BODY, length=len(BODY) + 100)
    sleeps = Sleeps()
    with pytest.raises(FetchError, match=rf"truncated body: got {len(BODY)} of {len(BODY) + 100} bytes"):
        fetch_remote_data(recipe(tmp_path, url=server.url + "/f.json", sha256=sha256(BODY)), dest, sleep=sleeps)
    assert leftovers(dest) == []
    # a dropped connection is worth retrying, within the bounded attempts
    assert server.hits[("GET", "/f.json")] == download.MAX_ATTEMPTS
    assert sleeps == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize("status", [404, 403])
def test_client_errors_fail_at_once_without_retry(server, tmp_path, dest, status):
    server.routes["/f.json"] = lambda h: send(h, status, b"nope")
    sleeps = Sleeps()
    with pytest.raises(FetchError, match=f"HTTP {status}") as e:
        fetch_remote_data(recipe(tmp_path, url=server.url + "/f.json", sha256=sha256(BODY)), dest, sleep=sleeps)
    if status == 404:
        assert "check the commit and path" in str(e.value)
    assert server.hits[("GET", "/f.json")] == 1 and sleeps == []
    assert leftovers(dest) == []


def flaky(statuses: list[int], headers: dict | None = None) -> Route:
    """Answer with each status in turn (with `headers`), then serve BODY."""
    todo = list(statuses)

    def route(h):
        if todo:
            send(h, todo.pop(0), b"busy", headers)
        else:
            send(h, 200, BODY)
    return route


def test_5xx_is_retried_with_exponential_backoff(server, tmp_path, dest):
    server.routes["/f.json"] = flaky([500, 503])
    sleeps = Sleeps()
    [entry] = fetch_remote_data(recipe(tmp_path, url=server.url + "/f.json", sha256=sha256(BODY)), dest, sleep=sleeps)
    assert sleeps == [1.0, 2.0]
    assert server.hits[("GET", "/f.json")] == 3 and entry["attempts"] == 3
    assert leftovers(dest) == ["f.json"]


def test_429_honours_retry_after_and_attempts_are_bounded(server, tmp_path, dest):
    server.routes["/ok.json"] = flaky([429], {"Retry-After": "3"})
    server.routes["/down.json"] = flaky([502] * 50)
    sleeps = Sleeps()
    fetch_remote_data(recipe(tmp_path, url=server.url + "/ok.json", sha256=sha256(BODY)), dest, sleep=sleeps)
    assert sleeps == [3.0]
    sleeps.clear()
    with pytest.raises(FetchError, match=r"gave up after 5 attempt\(s\).*HTTP 502"):
        fetch_remote_data(recipe(tmp_path, url=server.url + "/down.json", sha256=sha256(BODY)), dest, sleep=sleeps)
    assert server.hits[("GET", "/down.json")] == 5 and sleeps == [1.0, 2.0, 4.0, 8.0]


def test_retry_budget_caps_total_time(server, tmp_path):
    server.routes["/f.json"] = flaky([500] * 50)
    sleeps = Sleeps()
    with pytest.raises(FetchError, match="gave up after 3 attempt"):
        download.download_url(server.url + "/f.json", tmp_path / "f.json", sleep=sleeps, budget=5.0)
    assert sleeps == [1.0, 2.0]  # the next delay (4 s) would pass the 5 s budget
    assert not (tmp_path / "f.json").exists() and not (tmp_path / "f.json.partial").exists()


def test_stalled_server_times_out_and_leaves_no_partial(server, tmp_path, dest, monkeypatch):
    monkeypatch.setenv(download.HTTP_TIMEOUT_ENV, "0.2")
    big = BODY * 200
    server.routes["/f.json"] = lambda h: send(h, 200, big, stall=2.0)  # half the body, then silence
    sleeps = Sleeps()
    t0 = time.monotonic()
    with pytest.raises(FetchError, match=r"read timed out after 0.2 s"):
        fetch_remote_data(recipe(tmp_path, url=server.url + "/f.json", sha256=sha256(big)), dest, sleep=sleeps)
    assert time.monotonic() - t0 < 5
    assert leftovers(dest) == []
    assert len(sleeps) == download.MAX_ATTEMPTS - 1


def test_bad_timeout_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(download.HTTP_TIMEOUT_ENV, "soon")
    with pytest.raises(RecipeError, match="QLORA_KIT_HTTP_TIMEOUT='soon'"):
        download.http_timeout()


def assert_says_what_to_do(msg: str) -> None:
    assert "pre-download on a networked machine" in msg
    assert "--set data.source=local --set data.path=FILE" in msg
    assert "HF_HUB_OFFLINE=1" in msg


def test_connection_refused_fails_fast_with_what_to_do(tmp_path, dest):
    url = f"http://127.0.0.1:{closed_port()}/o/r/c0ffee/komt_squad.json"
    t0 = time.monotonic()
    with pytest.raises(OfflineError) as e:  # real sleep: a retry would show in the elapsed time
        fetch_remote_data(recipe(tmp_path, url=url, git_blob=git_blob(BODY)), dest)
    assert time.monotonic() - t0 < 5
    assert "refused" in str(e.value) and url in str(e.value)
    assert_says_what_to_do(str(e.value))
    assert leftovers(dest) == []


def test_dns_failure_fails_fast_without_retry(tmp_path, dest, monkeypatch):
    calls = []

    def no_dns(*args, **kwargs):
        calls.append(args[0])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # simulated: the test resolves nothing for real
    sleeps = Sleeps()
    with pytest.raises(OfflineError, match="cannot resolve host raw.githubusercontent.com") as e:
        fetch_remote_data(recipe(tmp_path, url="https://raw.githubusercontent.com/o/r/c0ffee/x.json",
                                 sha256=sha256(BODY)), dest, sleep=sleeps)
    assert calls == ["raw.githubusercontent.com"] and sleeps == []
    assert_says_what_to_do(str(e.value))


def test_extra_files_are_fetched_and_a_failure_removes_earlier_ones(server, tmp_path, dest):
    other = b'{"instruction": "a", "output": "b", "url": "u"}\n'
    server.routes["/c1/ko_alpaca_data.json"] = lambda h: send(h, 200, BODY)
    server.routes["/c1/KoAlpaca_v1.1.jsonl"] = lambda h: send(h, 200, other)
    r = recipe(tmp_path, url=server.url + "/c1/ko_alpaca_data.json", sha256=sha256(BODY),
               extra=[{"url": server.url + "/c1/KoAlpaca_v1.1.jsonl", "git_blob": git_blob(other)}])
    entries = fetch_remote_data(r, dest)
    assert [(e["name"], e["format"]) for e in entries] == [("ko_alpaca_data.json", "json"),
                                                           ("KoAlpaca_v1.1.jsonl", "jsonl")]
    assert (dest / "KoAlpaca_v1.1.jsonl").read_bytes() == other
    fresh = tmp_path / "raw2"
    fresh.mkdir()
    bad = recipe(tmp_path, url=server.url + "/c1/ko_alpaca_data.json", sha256=sha256(BODY),
                 extra=[{"url": server.url + "/c1/KoAlpaca_v1.1.jsonl", "git_blob": "f" * 40}])
    with pytest.raises(FetchError, match=r"data.extra.0 .*git_blob mismatch"):
        fetch_remote_data(bad, fresh)
    assert leftovers(fresh) == []


@pytest.mark.parametrize("extra, msg", [
    ({"url": "http://x/a.json", "sha": "1"}, "unknown key"),
    ({"url": "http://x/ko.json"}, "file name 'ko.json' is also used by data"),
    ({"url": "file:///etc/passwd"}, "need an http"),
    ({"hub_dataset": "beomi/KoAlpaca-v1.1a"}, "source hub needs hub_dataset and path"),
])
def test_bad_extra_entries_are_recipe_errors(tmp_path, extra, msg):
    r = recipe(tmp_path, url="http://127.0.0.1:9/c/ko.json", extra=[extra])
    with pytest.raises(RecipeError, match=msg):
        download.data_files(r)


# --- the CLI, the Hub, tokens (subprocess: huggingface_hub reads its env at import) ----------

def run_fetch(tmp_path: Path, recipe_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("HF_", "HUGGING", "QLORA_KIT")) and "proxy" not in k.lower()}
    full = {**clean, "QLORA_KIT_ROOT": str(tmp_path / "kit"), "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]), **env}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "qlora_kit", "fetch", "--recipe", str(recipe_path)],
                         cwd=tmp_path, env=full, capture_output=True, text=True, timeout=120)
    return out, time.monotonic() - t0


def files_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() or p.is_symlink()) if d.exists() else []


def assert_no_canary(tmp_path: Path, out: subprocess.CompletedProcess) -> None:
    assert CANARY not in out.stdout and CANARY not in out.stderr
    for p in files_under(tmp_path):
        if p.is_file():
            assert CANARY.encode() not in p.read_bytes(), p


HUB_MODEL = {"source": "hub", "name": "davidkim205/komt-llama2-7b-v1", "arch": "llama", "revision": "main"}


def hub_recipe(tmp_path: Path, what: str, revision: str = "main") -> Path:
    """komt-like recipe whose model (what=model) or data (what=data) comes from the Hub."""
    if what == "model":
        return recipe_file(tmp_path, {"source": "tiny-sample"}, {**HUB_MODEL, "revision": revision}, name="komt")
    return recipe_file(tmp_path, {"source": "hub", "hub_dataset": "beomi/KoAlpaca-v1.1a", "hub_revision": revision,
                                  "path": "data/train-00000-of-00001-21df739eb88d711e.parquet",
                                  "format": "parquet"}, name="komt")


@pytest.mark.parametrize("what", ["model", "data"])
def test_hub_offline_with_empty_cache_fails_fast(tmp_path, what):
    # HF_ENDPOINT points at a closed local port too, so even a client that ignored
    # HF_HUB_OFFLINE could not leave this machine.
    path = hub_recipe(tmp_path, what)
    out, elapsed = run_fetch(tmp_path, path, HF_HUB_OFFLINE="1", HF_TOKEN=CANARY,
                             HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert out.returncode == 2, out.stderr
    assert elapsed < 10  # interpreter start + imports; the failure itself takes well under a second
    assert "HF_HUB_OFFLINE=1 and the Hugging Face cache" in out.stderr
    assert_says_what_to_do(out.stderr)
    assert "qlora-kit fetch --recipe komt" in out.stderr
    assert "Traceback" not in out.stderr
    assert files_under(tmp_path / "kit") == []  # no partial raw folder, no half-built base
    assert_no_canary(tmp_path, out)


@pytest.mark.parametrize("what, revision", [("model", COMMIT), ("data", "main")])
def test_hub_unreachable_fails_fast(tmp_path, what, revision):
    # Left to itself huggingface_hub retries a refused connection for ~25 s (HEAD of a file, or
    # the tree listing of a pinned commit) before it looks in its cache; the kit must not wait.
    path = hub_recipe(tmp_path, what, revision)
    port = closed_port()
    out, elapsed = run_fetch(tmp_path, path, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert out.returncode == 2, out.stderr
    assert elapsed < 10
    assert f"cannot reach the Hugging Face Hub (http://127.0.0.1:{port}): connection to 127.0.0.1:{port} refused, " \
           "and the Hugging Face cache" in out.stderr
    assert_says_what_to_do(out.stderr)
    assert files_under(tmp_path / "kit") == []


def test_cli_url_fetch_writes_manifest_and_no_token(server, tmp_path):
    server.routes["/c/data.json"] = lambda h: send(h, 200, BODY)
    model_dir = tmp_path / "local-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    path = recipe_file(tmp_path, {"source": "url", "url": server.url + "/c/data.json", "sha256": sha256(BODY)},
                       {"source": "local", "name": str(model_dir), "arch": "llama"})
    out, _ = run_fetch(tmp_path, path, HF_TOKEN=CANARY)
    assert out.returncode == 0, out.stderr
    raw = tmp_path / "kit" / "data" / "netcheck" / "raw"
    man = json.loads((raw / "manifest.json").read_text())
    assert man["facts"]["files"][0]["sha256"] == sha256(BODY)
    assert (raw / "data.json").read_bytes() == BODY
    assert not any(".partial" in str(p) for p in files_under(tmp_path / "kit"))
    assert server.auth == [None]  # a raw URL download sends no credentials
    assert_no_canary(tmp_path, out)


# --- a minimal fake Hub ----------------------------------------------------------------------

def fake_hub(server, repo: str, files: dict[str, bytes], repo_type: str = "model",
             sizes: dict[str, int] | None = None) -> None:
    """Serve `files` of `repo` at COMMIT (revision `main` resolves to it) like the Hub API does;
    `sizes` overrides the sizes the listing reports (a 13 GB shard without 13 GB of bytes)."""
    api = f"/api/{repo_type}s/{repo}"
    res = f"/{'datasets/' if repo_type == 'dataset' else ''}{repo}/resolve/"

    def info(h):
        send(h, 200, json.dumps({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}).encode(),
             {"Content-Type": "application/json"})

    def tree(h):
        listing = [{"type": "file", "path": f, "size": (sizes or {}).get(f, len(b)), "oid": git_blob(b)}
                   for f, b in files.items()]
        send(h, 200, json.dumps(listing).encode(), {"Content-Type": "application/json"})

    def resolve(h):
        rev, _, name = h.path.split("?")[0][len(res):].partition("/")
        if rev not in (COMMIT, "main") or name not in files:
            return send(h, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        b = files[name]
        send(h, 200, b, {"X-Repo-Commit": COMMIT, "ETag": f'"{git_blob(b)}"'})

    server.routes[f"{api}/revision/main"] = info
    server.routes[f"{api}/tree/{COMMIT}"] = tree
    server.prefix_routes.append((res, resolve))


def test_fake_hub_model_and_dataset_then_offline_from_cache(server, tmp_path):
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    model_files = {
        "config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "tokenizer_config.json": b"{}",
        "tokenizer.model": b"spm", "README.md": b"# card", ".gitattributes": b"*",
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": b"W1" * 1000, "model-00002-of-00002.safetensors": b"W2" * 1000,
        "consolidated.safetensors": b"DUP" * 1000, "pytorch_model.bin": b"PICKLE", "modeling_x.py": b"import os",
        "original/params.json": b"{}",
    }
    parquet = b"PAR1 fake parquet bytes PAR1"
    fake_hub(server, "davidkim205/komt-llama2-7b-v1", model_files)
    fake_hub(server, "beomi/KoAlpaca-v1.1a", {"data/train-00000-of-00001-21df739eb88d711e.parquet": parquet},
             repo_type="dataset")
    data = {"source": "hub", "hub_dataset": "beomi/KoAlpaca-v1.1a", "hub_revision": "main", "format": "parquet",
            "path": "data/train-00000-of-00001-21df739eb88d711e.parquet", "git_blob": git_blob(parquet)}
    path = recipe_file(tmp_path, data, HUB_MODEL, name="komt")
    env = {"HF_ENDPOINT": server.url, "HF_TOKEN": CANARY}
    out, _ = run_fetch(tmp_path, path, **env)
    assert out.returncode == 0, out.stderr

    base = tmp_path / "kit" / "models" / "komt" / "base"
    want = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert sorted(p.name for p in base.iterdir()) == sorted(want + ["fetch_manifest.json"])
    # never downloaded: the duplicate consolidated weights, pickle, code, card
    got = {p for (m, p), n in server.hits.items() if m == "GET" and "/resolve/" in p}
    assert not any(x in p for p in got for x in ("consolidated", ".bin", ".py", "README", "original/"))
    shard = base / "model-00001-of-00002.safetensors"
    assert shard.read_bytes() == model_files[shard.name] and not shard.is_symlink()
    cached = list((tmp_path / "hf" / "hub").rglob(f"blobs/*"))
    assert shard.stat().st_nlink == 2 and any(c.samefile(shard) for c in cached)  # a hard link into the cache

    facts = json.loads((base / "fetch_manifest.json").read_text())["facts"]
    m = facts["model"]
    assert m["repo"] == "davidkim205/komt-llama2-7b-v1" and m["requested_revision"] == "main"
    assert m["resolved_commit"] == COMMIT and m["placed_by"] == "hardlink"
    assert {f["name"]: f["size"] for f in m["files"]}[shard.name] == 2000
    [entry] = facts["files"]
    assert entry["resolved_revision"] == COMMIT and entry["hub_dataset"] == "beomi/KoAlpaca-v1.1a"
    assert entry["git_blob"] == git_blob(parquet) and entry["format"] == "parquet"
    raw = tmp_path / "kit" / "data" / "komt" / "raw"
    assert (raw / "train-00000-of-00001-21df739eb88d711e.parquet").read_bytes() == parquet
    # huggingface_hub took the token from the environment itself, and sent it only to the Hub
    assert f"Bearer {CANARY}" in server.auth

    # Offline, from the now-filled cache: same result, no request reaches the server.
    before = sum(server.hits.values())
    out, _ = run_fetch(tmp_path, path, HF_HUB_OFFLINE="1", **env)
    assert out.returncode == 0, out.stderr
    assert sum(server.hits.values()) == before
    facts = json.loads((base / "fetch_manifest.json").read_text())["facts"]
    assert facts["model"]["resolved_commit"] == COMMIT and facts["model"]["hf_hub_offline"] is True
    assert sorted(p.name for p in base.iterdir()) == sorted(want + ["fetch_manifest.json"])
    assert_no_canary(tmp_path, out)

    # Hub unreachable and HF_HUB_OFFLINE unset: the kit notices at once and serves from the cache.
    out, elapsed = run_fetch(tmp_path, path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_TOKEN=CANARY)
    assert out.returncode == 0, out.stderr
    assert elapsed < 10 and "looking in the local Hugging Face cache instead" in out.stderr
    facts = json.loads((base / "fetch_manifest.json").read_text())["facts"]
    assert facts["model"]["resolved_commit"] == COMMIT and facts["model"]["from_cache_only"] is True
    assert facts["files"][0]["resolved_revision"] == COMMIT
    assert sum(server.hits.values()) == before


def test_preflight_stops_a_large_hub_model_before_its_weights_move(server, tmp_path):
    """The Hub lists a 13 GB shard; on a machine without CUDA fetch stops after the listing, in
    one line with what to do, having downloaded no weights and written nothing."""
    files = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "model.safetensors": b"W" * 100}
    fake_hub(server, "davidkim205/komt-llama2-7b-v1", files, sizes={"model.safetensors": 13 * 10**9})
    path = recipe_file(tmp_path, {"source": "tiny-sample"}, HUB_MODEL, name="komt")
    out, elapsed = run_fetch(tmp_path, path, HF_ENDPOINT=server.url, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "preflight for recipe komt: device: no CUDA device" in line and "12.1 GiB" in line, line
    assert "--set train.device=cpu" in line
    assert not any("model.safetensors" in p for (m, p) in server.hits if "/resolve/" in p)
    assert not (tmp_path / "kit" / "models" / "komt" / "base").exists()
    assert not (tmp_path / "kit" / "data" / "komt" / "raw").exists()
    assert elapsed < 60


def test_model_selection_rules():
    def select(files, index=None, **kw):
        return download._select_model_files(dict.fromkeys(files, 1), lambda n: index, kw.get("pickle", False),
                                            kw.get("code", False), "model")

    assert select(["config.json", "model.safetensors", "pytorch_model.bin"]) == ["config.json", "model.safetensors"]
    assert select(["config.json", "pytorch_model.bin"], pickle=True) == ["config.json", "pytorch_model.bin"]
    with pytest.raises(FetchError, match="set model.allow_pickle: true"):
        select(["config.json", "pytorch_model.bin"])
    with pytest.raises(FetchError, match="no config.json"):
        select(["model.safetensors"])
    with pytest.raises(FetchError, match="names shards the repo lacks"):
        select(["config.json", "model.safetensors.index.json"], {"weight_map": {"a": "model-1.safetensors"}})
    assert "modeling.py" in select(["config.json", "model.safetensors", "modeling.py"], code=True)
