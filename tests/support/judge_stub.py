"""A canned OpenAI-compatible judge on 127.0.0.1 for the judge tests."""
from __future__ import annotations

import http.server
import json
import threading
import time


class StubServer:
    """http.server in a thread; `script` holds behaviours for the next requests."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[str] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with stub.lock:
                    action = stub.script.pop(0) if stub.script else "ok"
                    stub.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": json.loads(body), "action": action}
                    )
                if action == "drop":  # close the connection without any response
                    self.close_connection = True
                    return
                if action == "sleep":  # longer than the client's timeout, then hang up
                    time.sleep(0.6)
                    self.close_connection = True
                    return
                if action in ("500", "429", "400"):
                    payload = json.dumps({"error": {"message": f"stub {action}"}}).encode()
                    self.send_response(int(action))
                    if action == "429":
                        self.send_header("Retry-After", "0.01")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                content = canned_reply(json.loads(body)["messages"])
                payload = json.dumps(
                    {
                        "id": "chatcmpl-stub",
                        "object": "chat.completion",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def canned_reply(messages):
    """Scores answers that contain GOOD high, others low, in each style's format."""
    user = messages[-1]["content"]
    if messages[0]["role"] == "system":  # AlpaGasus pairwise
        answer_1 = user.split("[The Start of Assistant 1's Answer]\n", 1)[1].split("\n\n[The End", 1)[0]
        answer_2 = user.split("[The Start of Assistant 2's Answer]\n", 1)[1].split("\n\n[The End", 1)[0]
        s1 = 9 if "GOOD" in answer_1 else 4
        s2 = 9 if "GOOD" in answer_2 else 4
        return f"{s1} {s2}\nStub explanation."
    answer = user.split("[Candidate Answer]\n", 1)[1]
    return "Score: 5\n좋습니다." if "GOOD" in answer else "1\n부족합니다."
