"""Hostile servers and Hub answers (issue 14): a trickling or endless body is bounded by an overall
deadline and a size cap, and a 404 says "not found", never "cannot reach". All on 127.0.0.1.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from qlora_kit.config import RecipeError, load_recipe
from qlora_kit.sources import http
from qlora_kit.sources.download import FetchError, data_files, download_url
from support.repo import REPO


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests.append(self.path)
        self.server.route(self)

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve():
    """serve(route) -> base URL of a 127.0.0.1 server answering every request with route(handler)."""
    servers = []

    def start(route) -> str:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.daemon_threads, srv.route, srv.requests, srv.sent = True, route, [], [0]
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                http.HTTP_TIMEOUT_ENV, http.DEADLINE_ENV, http.MAX_MB_ENV):
        monkeypatch.delenv(var, raising=False)


def headers(h: BaseHTTPRequestHandler, length: int | None) -> None:
    h.send_response(200)
    if length is not None:
        h.send_header("Content-Length", str(length))
    h.send_header("Connection", "close")
    h.end_headers()


def trickle(h: BaseHTTPRequestHandler) -> None:
    headers(h, 1000)
    try:
        for _ in range(1000):  # one byte every 50 ms: 50 s in all, each read well inside the timeout
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.05)
    except OSError:
        pass


def endless(h: BaseHTTPRequestHandler) -> None:
    headers(h, None)  # no Content-Length: the body ends when the connection does, here never
    try:
        while True:
            h.wfile.write(b"y" * 65536)
            h.server.sent[0] += 65536
    except OSError:
        pass


def test_a_trickling_server_is_stopped_at_the_overall_deadline(serve, tmp_path, monkeypatch):
    url = serve(trickle)
    monkeypatch.setenv(http.DEADLINE_ENV, "1")
    t0 = time.monotonic()
    with pytest.raises(FetchError, match=r"not finished within the deadline .*QLORA_KIT_HTTP_DEADLINE"):
        download_url(url + "/f.json", tmp_path / "f.json", timeout=3, sleep=lambda s: None)
    assert time.monotonic() - t0 < 10  # bounded by the 1 s deadline, not by the 50 s body
    assert list(tmp_path.iterdir()) == []


def test_an_endless_body_stops_at_the_size_cap_and_leaves_nothing(serve, tmp_path, monkeypatch):
    url = serve(endless)
    monkeypatch.setenv(http.MAX_MB_ENV, "1")
    with pytest.raises(FetchError, match=r"the body is over 1048576 bytes \(the size cap; QLORA_KIT_MAX_DOWNLOAD_MB"):
        download_url(url + "/f.json", tmp_path / "f.json", timeout=5, sleep=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_a_content_length_over_the_cap_is_refused_before_reading(serve, tmp_path, monkeypatch):
    def big(h):
        headers(h, 50 << 20)
        h.wfile.write(b"z" * 1024)

    url = serve(big)
    monkeypatch.setenv(http.MAX_MB_ENV, "2")
    with pytest.raises(FetchError, match=r"Content-Length 52428800 bytes is over the 2097152 byte cap"):
        download_url(url + "/f.json", tmp_path / "f.json", timeout=5, sleep=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_deadline_or_cap_setting_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(http.DEADLINE_ENV, "never")
    with pytest.raises(RecipeError, match="QLORA_KIT_HTTP_DEADLINE='never': expected a number > 0"):
        download_url("http://127.0.0.1:9/x", tmp_path / "x")


def test_a_url_404_says_not_found(serve, tmp_path):
    def missing(h):
        h.send_response(404)
        h.send_header("Content-Length", "0")
        h.end_headers()

    url = serve(missing)
    with pytest.raises(FetchError, match=r"HTTP 404 Not Found - not found"):
        download_url(url + "/f.json", tmp_path / "f.json", timeout=5, sleep=lambda s: None)


def test_a_hub_data_path_cannot_leave_the_dataset_repo(tmp_path):
    doc = {"model": {"source": "tiny", "name": "t", "arch": "llama"}, "template": {"prompt": "{instruction}"},
           "data": {"source": "hub", "hub_dataset": "o/d", "path": "../../../../etc/passwd", "format": "json"}}
    p = tmp_path / "hubpath.yaml"
    p.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"data.path: '../../../../etc/passwd' leaves the dataset repo"):
        data_files(load_recipe(str(p)))


@pytest.mark.parametrize("what", ["model", "data"])
def test_a_hub_404_says_not_found_not_unreachable(serve, tmp_path, what):
    def bare_404(h):  # a Hub (or mirror) that knows nothing of the repo, without huggingface's error headers
        h.send_response(404)
        h.send_header("Content-Length", "9")
        h.end_headers()
        h.wfile.write(b"not found")

    url = serve(bare_404)
    model = {"source": "hub", "name": "nobody/no-such-model", "arch": "llama", "revision": "main"}
    data = {"source": "hub", "hub_dataset": "nobody/no-such-data", "hub_revision": "main", "path": "d.json"}
    doc = {"model": model if what == "model" else {"source": "tiny", "name": "t", "arch": "llama"},
           "data": data if what == "data" else {"source": "tiny-sample"}, "template": {"prompt": "{instruction}"}}
    recipe = tmp_path / "hub404.yaml"
    recipe.write_text(yaml.safe_dump(doc), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QLORA_KIT")) and "proxy" not in k.lower()}
    env.update(QLORA_KIT_ROOT=str(tmp_path / "kit"), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=url,
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "qlora_kit", "fetch", "--recipe", str(recipe)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    err = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and "not found on" in err[0] and "HTTP 404" in err[0], out.stderr
    assert "cannot reach" not in out.stderr and "Traceback" not in out.stderr
    kit = tmp_path / "kit"
    assert not kit.exists() or not [p for p in kit.rglob("*") if p.is_file()]
