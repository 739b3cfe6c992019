"""`qlora-kit serve`: a recipe's model behind an OpenAI-compatible HTTP API, for any OpenAI client.

    qlora-kit serve --recipe tiny [--gguf q4_k_m | --merged] [--port 8000] [--host 127.0.0.1]
    make serve RECIPE=tiny

Serves one GGUF of `models/NAME/gguf` (llama-cpp-python; checked against the sha256 the quantize
stage recorded before it is loaded) or the merged Hugging Face model (`--merged`, transformers).
Endpoints: GET /v1/models, POST /v1/chat/completions and POST /v1/completions, both with
`"stream": true` (server-sent events). Bound to 127.0.0.1 unless `--host` says otherwise; there
is no authentication, so any API key is accepted.

A chat request becomes one Alpaca row by the chat convention (text/chat.py: an optional second
user message is the input; a system message only where the recipe's prompt has {system}) and is
rendered with the recipe's inference template and tokenized by the kit's tokenizer, BOS as an id:
the very ids `qlora-kit evaluate` generates from. Generation defaults are the recipe's `eval`
settings (greedy unless the source sampled; `eval.max_new_tokens`), so an answer equals the
kit's own generation; `max_tokens`, `temperature`, `top_p`, `seed` and `stop` of a request apply.
Answers end at the model's EOS (finish_reason "stop") or at max_tokens ("length").
`/v1/completions` takes the prompt text as is (the recipe's BOS id in front when it adds one).

Why not llama-cpp-python's own server: it loads quantized GGUFs with llama.cpp's extra buffer
types, which segfault on AMX CPUs (gguf/runtime.py), and its chat handler drops every message key
but role and content while the kit needs exact prompts. This is the kit's generation loop
(scoring/generation.py's settings) behind the stdlib's http.server; requests run one at a time.
"""
from __future__ import annotations

import argparse
import http.server
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from qlora_kit.config import Recipe
from qlora_kit.errors import DataError
from qlora_kit.text.chat import ChatError, chat_row

DEFAULT_PORT = 8000


def add_cli(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve the recipe's GGUF (or merged model) with an OpenAI-compatible API",
                       description=__doc__.splitlines()[0])
    p.add_argument("--gguf", metavar="TYPE", help="which GGUF to serve (default: q4_k_m, else the recipe's first "
                   "quantize.types entry)")
    p.add_argument("--merged", action="store_true", help="serve the merged Hugging Face model instead of a GGUF")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--ctx", type=int, default=0, metavar="TOKENS",
                   help="context size: prompt + answer tokens (default: the context the model was trained with)")
    return p


# --- the model: one prompt's ids in, tokens out -----------------------------------------------

class Model:
    """The kit's tokenizer and one backend (GGUF or merged HF model), with the recipe's settings."""

    def __init__(self, recipe: Recipe, tok, name: str, path: Path):
        self.recipe, self.tok, self.name, self.path = recipe, tok, name, path
        self.eos_ids = {tok.eos_id}
        self.lock = threading.Lock()

    def settings(self, body: dict[str, Any]) -> dict[str, Any]:
        """The recipe's generation settings, with what the request sets (checked)."""
        e = self.recipe.eval
        s = {"max_tokens": e.max_new_tokens, "sample": e.do_sample, "temperature": e.temperature,
             "top_p": e.top_p, "top_k": e.top_k, "repeat_penalty": e.repetition_penalty, "seed": 0}
        for key, kind, lo in (("max_tokens", int, 1), ("max_completion_tokens", int, 1), ("temperature", float, 0),
                              ("top_p", float, 0), ("seed", int, None)):
            v = body.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) or \
                    (lo is not None and v < lo):
                raise ChatError(f"{key}: {v!r} is not a valid value")
            s["max_tokens" if key == "max_completion_tokens" else key] = kind(v)
        if body.get("temperature") is not None:
            s["sample"] = s["temperature"] > 0
        if body.get("n", 1) != 1:
            raise ChatError("n: only one choice per request (n = 1)")
        return s

    n_ctx = 0  # the context the backend holds (tokens); 0: unknown

    def check_length(self, prompt: int, s: dict[str, Any]) -> None:
        if self.n_ctx and prompt + s["max_tokens"] > self.n_ctx:
            raise ChatError(f"the prompt ({prompt} tokens) plus max_tokens ({s['max_tokens']}) exceeds the "
                            f"{self.n_ctx}-token context; shorten the prompt or lower max_tokens")

    def tokens(self, ids: list[int], s: dict[str, Any]) -> Iterator[int]:
        raise NotImplementedError

    def detokenize(self, ids: list[int]) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class GgufModel(Model):
    def __init__(self, recipe: Recipe, tok, name: str, path: Path, ctx: int = 0):
        super().__init__(recipe, tok, name, path)
        from qlora_kit.gguf.runtime import open_gguf

        self._open = open_gguf(path, n_ctx=ctx, seed=0)  # 0: the context the model was trained with
        self.llm = self._open.__enter__()
        self.eos_ids.add(self.llm.token_eos())  # as gguf_generate: the tokenizer's EOS or the GGUF's
        self.n_ctx = self.llm.n_ctx()

    def tokens(self, ids: list[int], s: dict[str, Any]) -> Iterator[int]:
        # the same call as scoring/generation.gguf_generate: llama.cpp's sampler, greedy unless sampling
        self.llm.reset()
        self.llm.set_seed(s["seed"])
        yield from self.llm.generate(ids, temp=s["temperature"] if s["sample"] else 0.0, top_p=s["top_p"],
                                     top_k=s["top_k"] if s["sample"] else 1, repeat_penalty=s["repeat_penalty"],
                                     reset=True)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def close(self) -> None:
        self._open.__exit__(None, None, None)


class MergedModel(Model):
    def __init__(self, recipe: Recipe, tok, name: str, path: Path, ctx: int = 0):
        super().__init__(recipe, tok, name, path)
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code,
            use_safetensors=not recipe.model.allow_pickle or None).eval()
        self.n_ctx = ctx or int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    def tokens(self, ids: list[int], s: dict[str, Any]) -> Iterator[int]:
        # the same call as scoring/generation.hf_generate; generated whole, then streamed
        import torch

        kw: dict[str, Any] = dict(max_new_tokens=s["max_tokens"], do_sample=s["sample"], eos_token_id=self.tok.eos_id,
                                  pad_token_id=self.tok.pad_id, repetition_penalty=s["repeat_penalty"])
        if s["sample"]:
            kw.update(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"])
        torch.manual_seed(s["seed"])
        with torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                      dtype=torch.long), **kw)
        yield from out[0, len(ids):].tolist()

    def detokenize(self, ids: list[int]) -> str:
        return self.tok.hf.decode(ids, skip_special_tokens=True)


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise ChatError("stop: a string or a list of non-empty strings is required")
    return stop


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    at = min((text.find(x) for x in stops if x in text), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def generate(model: Model, ids: list[int], s: dict[str, Any], stops: list[str]
             ) -> Iterator[tuple[str, str | None, int]]:
    """Yield (text delta, None, 0) while generating, then ("", finish_reason, tokens) once."""
    new: list[int] = []
    sent, finish = "", "length"
    hold = max((len(x) for x in stops), default=1) - 1  # text that may still become a stop string
    for t in model.tokens(ids, s) if s["max_tokens"] > 0 else ():
        if t in model.eos_ids:
            finish = "stop"
            break
        new.append(t)
        text, cut = _cut(model.detokenize(new), stops)
        ready = text if cut else text[: len(text) - hold]
        if len(ready) > len(sent) and not ready.endswith("\ufffd"):  # never half a UTF-8 character
            yield ready[len(sent):], None, 0
            sent = ready
        if cut:
            finish = "stop"
        if cut or len(new) >= s["max_tokens"]:
            break
    text, _ = _cut(model.detokenize(new), stops)
    if len(text) > len(sent):
        yield text[len(sent):], None, 0
    yield "", finish, len(new)


# --- the OpenAI protocol -------------------------------------------------------------------------

def _prompt(model: Model, path: str, body: dict[str, Any]) -> list[int]:
    from qlora_kit.text.templates import render_inference

    tok, tpl = model.tok, model.recipe.template
    bos = [tok.bos_id] if (tpl.add_bos and tok.bos_id is not None) else []
    if path == "/v1/chat/completions":
        row, tpl = chat_row(body.get("messages"), tpl)
        return bos + tok.encode(render_inference(tpl, row, bos=tok.bos, eos=tok.eos))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ChatError("prompt: one string is required")
    return bos + tok.encode(prompt)


def _choice(chat: bool, text: str, finish: str | None, stream: bool) -> dict[str, Any]:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    msg = {"role": "assistant", "content": text}
    if stream:
        return {"index": 0, "delta": msg if text else {}, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    model: Model  # set on the subclass that serve() makes
    served = 0

    def log_message(self, fmt, *args):  # one short line per request on stderr
        sys.stderr.write(f"qlora-kit serve: {self.command} {self.path} {args[1] if len(args) > 1 else ''}\n")

    headers_sent = False

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.headers_sent = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def do_GET(self):
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [
                {"id": self.model.name, "object": "model", "created": 0, "owned_by": "qlora-kit"}]})
        else:
            self._error(404, f"{self.path}: not found (GET /v1/models, POST /v1/chat/completions, /v1/completions)",
                        "not_found_error")

    def do_POST(self):
        self.headers_sent = False  # one handler serves every request of a kept-alive connection
        path = "/v1" + self.path.removeprefix("/v1").rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._error(404, f"{self.path}: not found (POST /v1/chat/completions or /v1/completions)",
                        "not_found_error")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            if not isinstance(body, dict):
                raise ChatError("the request body must be a JSON object")
            ids, s, stops = _prompt(self.model, path, body), self.model.settings(body), _stops(body)
            self.model.check_length(len(ids), s)
        except (ValueError, ChatError) as e:  # json's errors are ValueErrors too
            self._error(400, str(e) if isinstance(e, ChatError) else f"the request body is not JSON: {e}")
            return
        with self.model.lock:
            try:
                self._answer(path == "/v1/chat/completions", ids, s, stops, bool(body.get("stream")))
            except (BrokenPipeError, ConnectionResetError):  # the client went away; nothing to tell it
                pass
            except Exception as e:  # one line to the caller and on stderr, and the server goes on
                sys.stderr.write(f"qlora-kit serve: error: {type(e).__name__}: {e}\n")
                if not self.headers_sent:
                    self._error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")

    def _answer(self, chat: bool, ids: list[int], s: dict[str, Any], stops: list[str], stream: bool) -> None:
        Handler.served += 1
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{Handler.served}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model.name}
        if not stream:
            parts = list(generate(self.model, ids, s, stops))
            text, (_, finish, n) = "".join(p[0] for p in parts), parts[-1]
            self._json(200, {**head, "choices": [_choice(chat, text, finish, False)], "usage": {
                "prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}})
            return
        self.headers_sent = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if chat:
            head["object"] = "chat.completion.chunk"
        for delta, finish, _ in generate(self.model, ids, s, stops):
            event = {**head, "choices": [_choice(chat, delta, finish, True)]}
            self.wfile.write(b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


# --- the command -------------------------------------------------------------------------------

def _recorded_gguf(gguf: Path, qtype: str | None, recipe: Recipe) -> tuple[str, Path]:
    """The GGUF to serve and the file name; checked against the quantize manifest's sha256."""
    from qlora_kit.artifacts import verify_recorded

    try:
        files = json.loads((gguf / "manifest.json").read_text(encoding="utf-8"))["facts"]["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{gguf}/manifest.json: no GGUF recorded yet; run `make quantize RECIPE={recipe.name}` "
                        "(or `make reproduce`) first") from None
    qtype = qtype or ("q4_k_m" if "q4_k_m" in files else next(iter(files), ""))
    if qtype not in files:
        raise DataError(f"--gguf {qtype}: not among this recipe's GGUFs ({', '.join(files) or 'none'})")
    verify_recorded(gguf, {files[qtype]["file"]: files[qtype]["sha256"]}, "quantize", recipe.name)
    return qtype, gguf / files[qtype]["file"]


def load_model(recipe: Recipe, args: argparse.Namespace) -> Model:
    from qlora_kit import layout
    from qlora_kit.sources import model_safety
    from qlora_kit.text.tokenizer import load_tokenizer

    p = layout.paths(recipe.name)
    if not (p.merged / "config.json").is_file():
        raise DataError(f"{p.merged}: no merged model yet; run `make merge RECIPE={recipe.name}` (or `make "
                        "reproduce`) first")
    model_safety.check(p.merged, recipe.model)
    if not args.merged:  # checked before anything is loaded
        qtype, path = _recorded_gguf(p.gguf, args.gguf, recipe)
    tok = load_tokenizer(p.merged, recipe.template, trust_remote_code=recipe.model.trust_remote_code)
    if args.merged:
        return MergedModel(recipe, tok, f"{recipe.name}-merged", p.merged, args.ctx)
    return GgufModel(recipe, tok, f"{recipe.name}-{qtype}", path, args.ctx)


def run(recipe: Recipe, args: argparse.Namespace) -> int:
    if args.merged and args.gguf:
        raise DataError("serve: --gguf and --merged exclude each other; pick one")
    if args.ctx < 0:
        raise DataError(f"--ctx {args.ctx}: a context size is a positive number of tokens (0: the model's own)")
    model = load_model(recipe, args)
    handler = type("BoundHandler", (Handler,), {"model": model})
    try:
        httpd = http.server.ThreadingHTTPServer((args.host, args.port), handler)
    except OSError as e:
        model.close()
        raise DataError(f"--port {args.port}: cannot listen on {args.host} ({e.strerror}); pick another port") from None
    httpd.daemon_threads = True
    host, port = httpd.server_address[:2]
    base = f"http://{host}:{port}/v1"
    example = json.dumps({"model": model.name, "messages": [{"role": "user", "content": "What is 3 plus 4?"}]})
    print(f"qlora-kit serve: {model.name} ({model.path}) at {base}", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"qlora-kit serve: warning: listening on {host} without authentication", flush=True)
    print(f"  curl {base}/chat/completions -H 'Content-Type: application/json' -d '{example}'", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        print("qlora-kit serve: stopped", flush=True)
    finally:
        httpd.server_close()
        model.close()
    return 0
