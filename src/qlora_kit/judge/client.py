"""The live judge: an OpenAI-compatible endpoint over urllib, with retries and a resumable cache."""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from qlora_kit.judge.prompts import DEFAULT_API_KEY_ENV


logger = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """A judge call failed for good (bad response, non-retryable HTTP status, retries spent)."""


class JudgeNotConfigured(JudgeError):
    pass


class JudgeCacheError(JudgeError):
    pass


@dataclass(frozen=True)
class JudgeStatus:
    configured: bool
    message: str

    def __str__(self) -> str:
        return self.message


def judge_status(
    base_url: str | None,
    model: str | None,
    api_key_env: str = DEFAULT_API_KEY_ENV,
    *,
    require_api_key: bool = True,
    environ: Mapping[str, str] | None = None,
) -> JudgeStatus:
    """Is the live judge usable? The message is meant for the report, e.g.

    "judge not configured: set the environment variable QLORA_KIT_JUDGE_API_KEY; give a judge
    base URL". It names what is missing and never shows the key. A local server that needs no
    key (llama-cpp-python without --api_key) can pass require_api_key=False.
    """
    env = os.environ if environ is None else environ
    missing = []
    if require_api_key and not env.get(api_key_env):
        missing.append(f"set the environment variable {api_key_env} (the judge API key)")
    if not base_url:
        missing.append("give a judge base URL (an OpenAI-compatible endpoint, e.g. .../v1)")
    if not model:
        missing.append("give a judge model name")
    if missing:
        return JudgeStatus(False, "judge not configured: " + "; ".join(missing))
    key_note = f"API key from ${api_key_env}" if env.get(api_key_env) else "no API key"
    return JudgeStatus(True, f"judge configured: model {model} at {base_url} ({key_note})")


def cache_key(model: str, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> str:
    """sha256 over (model, messages, generation params), canonical JSON."""
    payload = json.dumps(
        {"model": model, "messages": list(messages), "params": dict(params)},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """Append-only JSONL of judged items: {"key", "model", "params", "content"} per line.

    Every record is written with one write() followed by flush + fsync, so a crash loses at
    most the line being written. On load a truncated last line (an interrupted write) is
    ignored and counted in `truncated_lines`; before the next append the partial line is cut
    off so the file stays valid JSONL. A broken line anywhere else is an error (it means the
    file was edited or is not our cache). One writer at a time.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.entries: dict[str, str] = {}
        self.truncated_lines = 0
        self._good_end: int | None = None  # byte offset to cut back to before appending
        self._needs_newline = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        offset = 0
        for index, raw in enumerate(lines):
            line_no = index + 1
            is_last = index == len(lines) - 1  # after the final "\n" this is b""
            line_end = offset + len(raw) + (0 if is_last else 1)
            if raw.strip():
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    if is_last:
                        self.truncated_lines += 1
                        self._good_end = offset
                        logger.warning(
                            "%s:%d: truncated last cache line ignored", self.path, line_no
                        )
                        break
                    raise JudgeCacheError(f"{self.path}:{line_no}: not valid JSON ({exc})") from exc
                for name in ("key", "content"):
                    if not isinstance(record, dict) or not isinstance(record.get(name), str):
                        raise JudgeCacheError(
                            f"{self.path}:{line_no}: field {name!r} missing or not a string"
                        )
                self.entries[record["key"]] = record["content"]
                if is_last:  # a complete record whose newline never made it to disk
                    self._needs_newline = True
            offset = line_end

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, model: str, params: Mapping[str, Any], content: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._good_end is not None:
            with open(self.path, "r+b") as fh:
                fh.truncate(self._good_end)
            self._good_end = None
        record = {"key": key, "model": model, "params": dict(params), "content": content}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._needs_newline:
            line = "\n" + line
            self._needs_newline = False
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.entries[key] = content


_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ClientStats:
    http_requests: int = 0  # attempts sent, including failed ones
    retries: int = 0
    cache_hits: int = 0
    completions: int = 0  # successful HTTP completions
    errors: list[str] = field(default_factory=list)  # one line per failed attempt


class JudgeClient:
    """Minimal OpenAI-compatible chat client with retries and a resumable cache.

    Sends exactly `model`, `messages`, `temperature`, `max_tokens`, `top_p` (what both the
    OpenAI API and llama-cpp-python's server accept). Retries connection errors, timeouts,
    HTTP 429 and 5xx up to `max_attempts` in all, sleeping backoff_s * 2**(attempt-1) (capped
    at max_backoff_s, raised to a numeric Retry-After); `sleep` is injectable for tests.
    Hand-written on urllib rather than the openai package to keep the kit's install small and
    the request body exactly what we cite.
    """

    def __init__(
        self,
        base_url: str | None,
        model: str | None,
        *,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        require_api_key: bool = True,
        cache_path: str | os.PathLike[str] | None = None,
        timeout_s: float = 120.0,
        max_attempts: int = 6,
        backoff_s: float = 2.0,
        max_backoff_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        environ: Mapping[str, str] | None = None,
    ):
        status = judge_status(
            base_url, model, api_key_env, require_api_key=require_api_key, environ=environ
        )
        if not status.configured:
            raise JudgeNotConfigured(status.message)
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        env = os.environ if environ is None else environ
        self.base_url = str(base_url).rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = str(model)
        self.api_key_env = api_key_env
        # Read once, kept only in this attribute; never part of repr, errors, logs or the cache.
        self._api_key = env.get(api_key_env) or None
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep
        self.cache = JudgeCache(cache_path) if cache_path is not None else None
        self.stats = ClientStats()
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # A judge on this machine is never reached through a proxy, whatever http_proxy says.
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"JudgeClient(url={self.url!r}, model={self.model!r}, key_env={self.api_key_env!r})"

    def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        temperature: float,
        max_tokens: int,
        top_p: float,
    ) -> str:
        """The judge's reply text for `messages`, from the cache when present."""
        params = {"temperature": temperature, "max_tokens": max_tokens, "top_p": top_p}
        key = cache_key(self.model, messages, params)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self.stats.cache_hits += 1
                return cached
        content = self._post_with_retries({"model": self.model, "messages": list(messages), **params})
        if self.cache is not None:
            self.cache.put(key, self.model, params, content)
        return content

    def _post_with_retries(self, body: dict[str, Any]) -> str:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last_error = ""
        for attempt in range(1, self.max_attempts + 1):
            self.stats.http_requests += 1
            retry_after: float | None = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    payload = response.read()
                reply = json.loads(payload.decode("utf-8"))
            except urllib.error.HTTPError as exc:
                detail = _http_error_detail(exc)
                if exc.code != 429 and exc.code < 500:
                    hint = f" (check ${self.api_key_env})" if exc.code in (401, 403) else ""
                    raise JudgeError(f"judge {self.url}: HTTP {exc.code}{hint}: {detail}") from None
                last_error = f"HTTP {exc.code}: {detail}"
                retry_after = _retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                # URLError wraps refused/reset connections; RemoteDisconnected, IncompleteRead and
                # socket timeouts can escape urlopen as HTTPException / OSError while reading.
                reason = getattr(exc, "reason", exc)
                last_error = f"{type(exc).__name__}: {reason}"
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                last_error = f"reply is not JSON ({exc})"  # e.g. a proxy's error page; retry
            else:
                self.stats.completions += 1
                return _reply_content(reply, self.url)
            self.stats.errors.append(f"attempt {attempt}: {last_error}")
            if attempt == self.max_attempts:
                break
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.max_backoff_s))
            logger.warning(
                "judge %s attempt %d/%d failed (%s); retrying in %.1fs",
                self.url, attempt, self.max_attempts, last_error, delay,
            )
            self.stats.retries += 1
            self.sleep(delay)
        raise JudgeError(f"judge {self.url}: gave up after {self.max_attempts} attempts: {last_error}")


def _http_error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode("utf-8", "replace")
    except Exception:
        text = ""
    return (text.strip() or str(exc.reason))[:300]


def _retry_after_seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _reply_content(reply: Any, url: str) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge {url}: reply has no choices[0].message.content: {str(reply)[:300]}")
    if not isinstance(content, str):
        raise JudgeError(f"judge {url}: choices[0].message.content is not a string")
    return content


JUDGE_BASE_URL_ENV = "QLORA_KIT_JUDGE_BASE_URL"


JUDGE_MODEL_ENV = "QLORA_KIT_JUDGE_MODEL"


def redact_url(url: str) -> str:
    """scheme://host[:port]/path of a URL, without user:password@ or a query (either may carry a key)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class Endpoint:
    """Where the evaluate stage's judge lives. `message` is the report's judge status line."""

    base_url: str
    model: str
    configured: bool
    require_api_key: bool
    message: str


def resolve_endpoint(
    base_url: str = "",
    model: str = "",
    *,
    api_key_env: str = DEFAULT_API_KEY_ENV,
    environ: Mapping[str, str] | None = None,
) -> Endpoint:
    """Judge endpoint for the evaluate stage: the environment wins over the recipe's eval values.

    The environment wins so that a user can point a run at their own judge (a hosted API, or
    llama-cpp-python's server on 127.0.0.1) without editing the recipe. The API key only ever
    comes from the environment; a judge on this machine (loopback) needs none.
    """
    env = os.environ if environ is None else environ
    url = env.get(JUDGE_BASE_URL_ENV) or base_url
    name = env.get(JUDGE_MODEL_ENV) or model
    host = (urllib.parse.urlsplit(url).hostname or "") if url else ""
    require_key = host not in _LOOPBACK
    missing = []
    if not url:
        missing.append(f"{JUDGE_BASE_URL_ENV} (or eval.judge_base_url) to an OpenAI-compatible /v1 URL")
    if not name:
        missing.append(f"{JUDGE_MODEL_ENV} (or eval.judge_model)")
    if require_key and not env.get(api_key_env):
        missing.append(f"{api_key_env} (the API key of a judge that is not on 127.0.0.1)")
    if missing:
        return Endpoint(url, name, False, require_key, "judge: not configured: set " + "; set ".join(missing))
    origin = "environment" if env.get(JUDGE_BASE_URL_ENV) else "recipe"
    key_note = f"API key from ${api_key_env}" if env.get(api_key_env) else "no API key"
    return Endpoint(url, name, True, require_key,
                    f"judge: configured: {name} at {redact_url(url)} (endpoint from the {origin}; {key_note})")
