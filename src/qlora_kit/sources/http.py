"""Plain HTTP(S) downloads for the fetch stage: pinned raw URLs streamed to disk, bounded in time and size.

    download_url("https://raw.githubusercontent.com/OWNER/REPO/COMMIT/PATH", Path("data/x/raw/f.json"))

The body goes to `NAME.partial` next to the final file and is renamed into place only when complete.
Timeouts (connect and each read) come from `QLORA_KIT_HTTP_TIMEOUT` (seconds, default 30); the
whole download, retries included, must finish within `QLORA_KIT_HTTP_DEADLINE` (seconds, default
3600), so a server that trickles one byte at a time cannot hold the stage forever. A body larger
than its Content-Length, or than `QLORA_KIT_MAX_DOWNLOAD_MB` (default 4096) when there is none, is
refused as soon as it gets there, not after it was written in full. 429, 5xx, read timeouts and
dropped connections are retried with exponential backoff (at most 5 attempts and 120 s); 4xx is
not; a host that cannot be reached at all (DNS, refused, unreachable, connect timeout) is reported
at once as `OfflineError`. HTTP 404 says "not found", never "unreachable".
"""
from __future__ import annotations

import errno
import http.client
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from qlora_kit import __version__
from qlora_kit.config import RecipeError
from qlora_kit.errors import DataError

HTTP_TIMEOUT_ENV = "QLORA_KIT_HTTP_TIMEOUT"
DEADLINE_ENV = "QLORA_KIT_HTTP_DEADLINE"
MAX_MB_ENV = "QLORA_KIT_MAX_DOWNLOAD_MB"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_DEADLINE_S = 3600.0
DEFAULT_MAX_MB = 4096.0
MAX_ATTEMPTS = 5
BACKOFF_BASE_S = 1.0  # delays 1, 2, 4, 8 s between the 5 attempts
BACKOFF_MAX_S = 16.0
RETRY_BUDGET_S = 120.0  # no retry that would take attempts plus waits past this many seconds
CHUNK = 1 << 20

Sleep = Callable[[float], None]


class FetchError(DataError):
    """A download that failed or did not verify; the message names the file and what to do."""


class OfflineError(FetchError):
    """The host or the Hub cannot be reached (or HF_HUB_OFFLINE=1 with nothing cached)."""


def _log(msg: str) -> None:
    print(f"fetch: {msg}", file=sys.stderr, flush=True)


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise RecipeError(f"{name}={raw!r}: expected a number > 0")
    return value


class _Transient(Exception):
    """A failure worth another attempt (429, 5xx, read timeout, connection dropped, truncation)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def http_timeout() -> float:
    return _env_number(HTTP_TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After", "") if headers is not None else ""
    return float(value) if value and value.strip().isdigit() else None  # HTTP-date form: use our backoff


def _proxy_note() -> str:
    # Name the variable only: a proxy URL can carry credentials.
    return " (a proxy is configured in the environment; check it)" if urllib.request.getproxies() else ""


def _unreachable(host: str, reason: object, timeout: float) -> str | None:
    """Why `host` cannot be reached at all, or None when the failure may be transient."""
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve host {host} ({reason.strerror or reason})"
    if isinstance(reason, ConnectionRefusedError):
        return f"connection to {host} refused"
    if isinstance(reason, TimeoutError):
        return f"no answer from {host} within {timeout:g} s (connect timeout)"
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN):
        return f"network unreachable for {host} ({reason.strerror})"
    return None


def _stream(resp: Any, partial: Path, url: str, deadline: float, cap: int) -> int:
    """Copy the body into `partial`, stopping at the deadline or past the size cap."""
    length = resp.headers.get("Content-Length", "").strip()
    expected = int(length) if length.isdigit() else None
    limit = min(expected, cap) if expected is not None else cap
    if expected is not None and expected > cap:
        raise FetchError(f"{url}: Content-Length {expected} bytes is over the {cap} byte cap ({MAX_MB_ENV} sets "
                         "it); not downloaded")
    n = 0
    with open(partial, "wb") as f:
        while chunk := resp.read1(CHUNK):  # read1: one recv at most, so the deadline is checked often
            n += len(chunk)
            if n > limit:
                why = "its Content-Length" if limit == expected else f"the size cap; {MAX_MB_ENV} sets it"
                raise FetchError(f"{url}: the body is over {limit} bytes ({why}); stopped and removed")
            f.write(chunk)
            if time.monotonic() > deadline:
                raise FetchError(f"{url}: not finished within the deadline ({n} bytes so far; {DEADLINE_ENV} sets "
                                 "it, in seconds); stopped and removed")
    if expected is not None and n != expected:
        raise _Transient(f"truncated body: got {n} of {expected} bytes (Content-Length)")
    return n


def _attempt(url: str, partial: Path, timeout: float, deadline: float = float("inf"),
             cap: int = 1 << 62) -> tuple[int, str]:
    """One GET streamed into `partial`; returns (bytes, final URL after redirects)."""
    host = urllib.parse.urlsplit(url).netloc
    # identity: Content-Length must count the bytes we hash, not a gzip stream
    req = urllib.request.Request(url, headers={"User-Agent": f"qlora-kit/{__version__}",
                                               "Accept-Encoding": "identity"})
    try:
        with urllib.request.urlopen(req, timeout=min(timeout, max(deadline - time.monotonic(), 0.01))) as resp:
            encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise FetchError(f"{url}: server sent Content-Encoding {encoding!r} although identity was asked")
            return _stream(resp, partial, url, deadline, cap), resp.geturl()
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 429 or 500 <= e.code <= 599:
            raise _Transient(f"HTTP {e.code} {e.reason}", _retry_after(e.headers)) from None
        hint = {404: "not found: no such file; check the commit and path pinned in the recipe",
                401: "needs authentication; pinned public URLs should not",
                403: "forbidden (private, or rate-limited without Retry-After); not retried"}.get(e.code, "not retried")
        raise FetchError(f"{url}: HTTP {e.code} {e.reason} - {hint}") from None
    except urllib.error.URLError as e:
        why = _unreachable(host, e.reason, timeout)
        if why:
            raise OfflineError(why + _proxy_note()) from None
        if isinstance(e.reason, ssl.SSLError):
            raise FetchError(f"{url}: TLS error ({e.reason}){_proxy_note()}; check certificates/proxy") from None
        raise _Transient(f"connection failed ({e.reason})") from None
    except TimeoutError:
        raise _Transient(f"read timed out after {timeout:g} s ({HTTP_TIMEOUT_ENV} sets the timeout)") from None
    except (http.client.HTTPException, ConnectionError) as e:
        raise _Transient(f"connection dropped ({type(e).__name__}: {e})") from None


def download_url(url: str, final: Path, *, label: str = "data", timeout: float | None = None,
                 attempts: int = MAX_ATTEMPTS, backoff: float = BACKOFF_BASE_S, budget: float = RETRY_BUDGET_S,
                 sleep: Sleep = time.sleep) -> dict[str, Any]:
    """Stream `url` to `final` through `final.partial`; retry transient failures; never leave a partial.

    Returns facts for the manifest (url, final_url, bytes, attempts). Raises OfflineError when the
    host cannot be reached, FetchError for anything else that does not end in a complete file.
    """
    timeout = http_timeout() if timeout is None else timeout
    deadline = time.monotonic() + _env_number(DEADLINE_ENV, DEFAULT_DEADLINE_S)
    cap = int(_env_number(MAX_MB_ENV, DEFAULT_MAX_MB) * 2**20)
    partial = final.with_name(final.name + ".partial")
    attempt, spent = 0, 0.0  # spent: time in attempts plus time asked of `sleep` (tests inject it)
    try:
        while True:
            attempt += 1
            t0 = time.monotonic()
            try:
                n, final_url = _attempt(url, partial, timeout, deadline, cap)
                break
            except OfflineError:
                raise
            except FetchError as e:  # 4xx, TLS: retrying would not help
                raise FetchError(f"{label}: {e}") from None
            except _Transient as t:
                partial.unlink(missing_ok=True)
                spent += time.monotonic() - t0
                delay = min(backoff * 2 ** (attempt - 1), BACKOFF_MAX_S)
                if t.retry_after is not None:
                    delay = min(max(delay, t.retry_after), BACKOFF_MAX_S)
                if attempt >= attempts or spent + delay > budget or time.monotonic() + delay > deadline:
                    raise FetchError(f"{label}: {url}: gave up after {attempt} attempt(s) in {spent:.1f} s; "
                                     f"last error: {t.reason}") from None
                _log(f"{label}: {t.reason}; retry {attempt}/{attempts - 1} in {delay:g} s")
                sleep(delay)
                spent += delay
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, final)
    return {"url": url, **({"final_url": final_url} if final_url != url else {}), "bytes": n, "attempts": attempt}
