"""Network side of the fetch stage: pinned raw URLs, Hub dataset files and Hub model snapshots.

    qlora-kit fetch --recipe komt            (calls fetch_remote_data / fetch_hub_model below)

`fetch.py` handles the offline sources (tiny, local) and calls in here for `data.source: url|hub`
and `model.source: hub`.

Data files (`data` and each `data.extra` entry) are written into the raw folder and verified:

- `url`: streamed with urllib to `NAME.partial` next to the final file, renamed into place only
  after the byte count matches Content-Length and the sha256 / git blob id (`git hash-object`)
  match the recipe. Timeouts (connect and each read) come from `QLORA_KIT_HTTP_TIMEOUT` (seconds,
  default 30). 429, 5xx, read timeouts and connections dropped mid-transfer are retried with
  exponential backoff (at most 5 attempts and 120 s in all); 4xx is not retried. Failing to reach
  the host at all (DNS, refused, unreachable, connect timeout) is not retried either: a machine
  without network must hear so in seconds, not after minutes of backoff.
- `hub`: one file of a Hub dataset repo (`data.hub_dataset`, `data.path`, `data.hub_revision`),
  through `huggingface_hub.hf_hub_download`; the commit it resolved to is recorded.

The base model comes from `huggingface_hub.snapshot_download` at `model.revision`: config,
tokenizer files and safetensors weights only (pickle `.bin` weights only when the repo has no
safetensors and the recipe sets `model.allow_pickle`; `*.py` only with `model.trust_remote_code`).
The files are hard-linked from the HF cache into `models/NAME/base`, falling back to a copy where
the cache is on another filesystem. Hard links, not symlinks, because `base` must be a plain HF
folder for every later reader (merge, llama.cpp's converter, DVC, a Docker bind mount of the
checkout that does not mount the HF cache at the same path) and must survive `hf cache delete`;
yet on one filesystem they cost no space, so 26 GB of weights are not stored twice.

Tokens: gated repos need a token, which huggingface_hub reads itself from `HF_TOKEN` or from the
`hf auth login` cache. This module never takes a token from a flag or a file in the checkout, never
passes one explicitly, and writes none anywhere (manifests record repo, revisions and files only).

Offline: the Hub client honours `HF_HUB_OFFLINE=1` and then serves from a filled HF cache
(`HF_HOME`). Every network failure ends in a `FetchError` (a `DataError`, so the CLI prints it and
exits 2) that says what to do instead.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from qlora_kit import __version__
from qlora_kit.artifacts import git_blob_id, sha256_file
from qlora_kit.config import Recipe, RecipeError
from qlora_kit.errors import DataError

HTTP_TIMEOUT_ENV = "QLORA_KIT_HTTP_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 5
BACKOFF_BASE_S = 1.0  # delays 1, 2, 4, 8 s between the 5 attempts
BACKOFF_MAX_S = 16.0
RETRY_BUDGET_S = 120.0  # no retry that would take attempts plus waits past this many seconds
CHUNK = 1 << 20

COMMIT_RE = re.compile(r"[0-9a-f]{40}")

# Files a transformers model folder needs besides the weights. Top level of the repo only.
MODEL_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "*.tiktoken", "chat_template.jinja", "chat_template.json",
)
SAFETENSORS = ("model.safetensors.index.json", "model.safetensors")
PICKLE = ("pytorch_model.bin.index.json", "pytorch_model.bin")

Sleep = Callable[[float], None]


class FetchError(DataError):
    """A download that failed or did not verify; the message names the file and what to do."""


class OfflineError(FetchError):
    """The host or the Hub cannot be reached (or HF_HUB_OFFLINE=1 with nothing cached)."""


def _log(msg: str) -> None:
    print(f"fetch: {msg}", file=sys.stderr, flush=True)


def offline_help(recipe: str) -> str:
    return (
        "This step needs the network. Without it, either:\n"
        f"  - pre-download on a networked machine (`qlora-kit fetch --recipe {recipe}`) and copy\n"
        f"    data/{recipe}/raw and models/{recipe}/base (or the Hugging Face cache, below) here;\n"
        "  - use files you already have: --set data.source=local --set data.path=FILE\n"
        "    (and --set model.source=local --set model.name=DIR for the base model);\n"
        "  - fill the Hugging Face cache on a networked machine (`hf download REPO --revision REV`,\n"
        "    add `--repo-type dataset FILE` for a dataset file), copy it here, point HF_HOME at it\n"
        "    and set HF_HUB_OFFLINE=1."
    )


# --- which files a recipe asks for ---------------------------------------------------------

_EXTRA_KEYS = {"source", "url", "sha256", "git_blob", "hub_dataset", "hub_revision", "path", "split",
               "format", "fields"}
_FORMATS = ("json", "jsonl", "parquet")


@dataclass(frozen=True)
class DataFile:
    label: str  # where the recipe names it: "data" or "data.extra.N"
    source: str  # url | hub | local
    url: str = ""
    sha256: str = ""
    git_blob: str = ""
    hub_dataset: str = ""
    hub_revision: str | None = None
    path: str = ""
    split: str = "train"
    format: str = "json"
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """File name in the raw folder: `path`'s name, else the URL's last path segment."""
        if self.path:
            return PurePosixPath(self.path).name
        return PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(self.url).path)).name


def data_files(recipe: Recipe) -> list[DataFile]:
    """The main data file and every `data.extra` entry, checked; raise RecipeError."""
    d = recipe.data
    out = [DataFile("data", d.source, d.url, d.sha256, d.git_blob, d.hub_dataset, d.hub_revision,
                    d.path, d.split, d.format, dict(d.fields))]
    for i, raw in enumerate(d.extra):
        label = f"data.extra.{i}"
        unknown = sorted(set(raw) - _EXTRA_KEYS)
        if unknown:
            raise RecipeError(f"{label}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_EXTRA_KEYS))})")
        source = raw.get("source") or ("url" if raw.get("url") else "hub" if raw.get("hub_dataset") else "local")
        suffix = PurePosixPath(raw.get("path") or urllib.parse.urlsplit(raw.get("url", "")).path).suffix.lstrip(".")
        fmt = raw.get("format") or (suffix if suffix in _FORMATS else d.format)
        if fmt not in _FORMATS:
            raise RecipeError(f"{label}.format: {fmt!r} is not one of {', '.join(_FORMATS)}")
        fields = raw.get("fields", d.fields)
        if not isinstance(fields, dict):
            raise RecipeError(f"{label}.fields: expected a mapping like {{input: context}}")
        out.append(DataFile(label, source, raw.get("url", ""), raw.get("sha256", ""), raw.get("git_blob", ""),
                            raw.get("hub_dataset", ""), raw.get("hub_revision") or None, raw.get("path", ""),
                            raw.get("split", "train"), fmt, dict(fields)))
    names: dict[str, str] = {}
    for f in out:
        if f.source == "url" and urllib.parse.urlsplit(f.url).scheme not in ("http", "https"):
            raise RecipeError(f"{f.label}.url: {f.url!r}: need an http(s) URL pinned to a commit")
        if f.source == "hub" and not (f.hub_dataset and f.path):
            raise RecipeError(f"{f.label}: source hub needs hub_dataset and path (the file inside the dataset "
                              "repo, e.g. data/train-00000-of-00001-21df739eb88d711e.parquet)")
        if f.source not in ("url", "hub", "local"):
            raise RecipeError(f"{f.label}.source: {f.source!r} is not one of url, hub, local")
        name = f.name
        if not name or name.startswith(".") or name == "manifest.json":
            raise RecipeError(f"{f.label}: cannot derive a file name from {f.url or f.path!r}; set path: NAME")
        if name in names:
            raise RecipeError(f"{f.label}: file name {name!r} is also used by {names[name]}; "
                              "set path: OTHER_NAME on one of them")
        names[name] = f.label
    return out


# --- verification --------------------------------------------------------------------------

def verify(path: Path, sha256: str, git_blob: str, label: str) -> dict[str, str]:
    """sha256 and git blob id of `path`; raise FetchError (and delete it) when a pin differs."""
    got = {"sha256": sha256_file(path), "git_blob": git_blob_id(path)}
    for key, want in (("sha256", sha256), ("git_blob", git_blob)):
        if want and got[key] != want.lower():
            path.unlink(missing_ok=True)
            raise FetchError(f"{label}: {key} mismatch: expected {want}, got {got[key]} "
                             "(the file was removed; check the pinned commit/URL in the recipe)")
    if not (sha256 or git_blob):
        _log(f"warning: {label} has no sha256 or git_blob in the recipe; recorded {got['sha256']} unverified")
    return got


# --- plain HTTP(S) -------------------------------------------------------------------------

class _Transient(Exception):
    """A failure worth another attempt (429, 5xx, read timeout, connection dropped, truncation)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def http_timeout() -> float:
    raw = os.environ.get(HTTP_TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise RecipeError(f"{HTTP_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


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


def _attempt(url: str, partial: Path, timeout: float) -> tuple[int, str]:
    """One GET streamed into `partial`; returns (bytes, final URL after redirects)."""
    host = urllib.parse.urlsplit(url).netloc
    # identity: Content-Length must count the bytes we hash, not a gzip stream
    req = urllib.request.Request(url, headers={"User-Agent": f"qlora-kit/{__version__}",
                                               "Accept-Encoding": "identity"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise FetchError(f"{url}: server sent Content-Encoding {encoding!r} although identity was asked")
            length = resp.headers.get("Content-Length", "").strip()
            expected = int(length) if length.isdigit() else None
            n = 0
            with open(partial, "wb") as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    n += len(chunk)
            if expected is not None and n != expected:
                raise _Transient(f"truncated body: got {n} of {expected} bytes (Content-Length)")
            return n, resp.geturl()
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 429 or 500 <= e.code <= 599:
            raise _Transient(f"HTTP {e.code} {e.reason}", _retry_after(e.headers)) from None
        hint = {404: "no such file: check the commit and path pinned in the recipe",
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
    partial = final.with_name(final.name + ".partial")
    attempt, spent = 0, 0.0  # spent: time in attempts plus time asked of `sleep` (tests inject it)
    try:
        while True:
            attempt += 1
            t0 = time.monotonic()
            try:
                n, final_url = _attempt(url, partial, timeout)
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
                if attempt >= attempts or spent + delay > budget:
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


# --- Hugging Face Hub ----------------------------------------------------------------------

def _short(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    if cause is not None and not isinstance(e, OfflineError):
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def hub_unreachable() -> str | None:
    """Why the Hub endpoint cannot be reached (one TCP connect), or None when it can.

    huggingface_hub retries a failed connection for ~25 s before it falls back to its cache; this
    probe lets the kit tell "no network" at once and go straight to the cache (local_files_only).
    Behind a proxy the probe would prove nothing, so it is skipped there.
    """
    from huggingface_hub import constants

    u = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    if urllib.request.getproxies().get(u.scheme) and not urllib.request.proxy_bypass(host):
        return None
    timeout = min(http_timeout(), 10.0)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        where = host if u.port is None else f"{host}:{port}"
        return _unreachable(where, e, timeout) or f"cannot connect to {where} ({e})"


def _hub_mode(what: str) -> tuple[bool, str | None]:
    """(local_files_only, why the Hub is unreachable): offline mode or a failed probe use the cache only."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return True, None
    why = hub_unreachable()
    if why:
        _log(f"{what}: {why}; looking in the local Hugging Face cache instead")
    return why is not None, why


@contextlib.contextmanager
def hub_errors(what: str, repo: str, repo_type: str, revision: str | None, recipe: str,
               unreachable: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into FetchError messages that say what to do."""
    from huggingface_hub import constants, errors

    try:
        import httpx2
        transport: tuple[type[BaseException], ...] = (httpx2.TransportError,)
    except ImportError:  # the transport library is huggingface_hub's business; stay importable without it
        transport = ()
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
    at = f"{repo}@{revision or 'main'}"
    try:
        yield
    except errors.GatedRepoError as e:
        raise FetchError(f"{what}: {at} is gated. Accept its licence at {page} with your account, then give the "
                         "token through the HF_TOKEN environment variable or `hf auth login` (the kit reads no "
                         "token from flags or files in the checkout).") from e
    except errors.RepositoryNotFoundError as e:
        raise FetchError(f"{what}: {repo_type} repo {repo} not found (or private: set HF_TOKEN or run "
                         "`hf auth login`)") from e
    except errors.RevisionNotFoundError as e:
        raise FetchError(f"{what}: revision {revision!r} not found in {repo}; check the pinned revision") from e
    except errors.RemoteEntryNotFoundError as e:
        raise FetchError(f"{what}: {at} has no such file ({_short(e)})") from e
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, *transport) as e:
        cache = f"the Hugging Face cache ({constants.HF_HUB_CACHE}) does not hold {at} (or holds it incompletely)"
        if unreachable:
            why = f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}): {unreachable}, and {cache}"
        elif constants.is_offline_mode():
            why = f"HF_HUB_OFFLINE=1 and {cache}"
        else:
            why = f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) for {at}: {_short(e)}{_proxy_note()}"
        raise OfflineError(f"{what}: {why}\n{offline_help(recipe)}") from e
    except errors.HfHubHTTPError as e:
        raise FetchError(f"{what}: {at}: {str(e).splitlines()[0]}") from e


def _commit_of(snapshot: Path, what: str) -> str:
    """The commit a snapshot resolved to: the cache lays it out as .../snapshots/<commit>/."""
    if snapshot.parent.name == "snapshots" and COMMIT_RE.fullmatch(snapshot.name):
        return snapshot.name
    raise FetchError(f"{what}: cannot tell the resolved commit from the cache path {snapshot}")


def fetch_hub_data_file(f: DataFile, dest: Path, recipe: str) -> dict[str, Any]:
    """Copy one file of a Hub dataset repo (at its pinned revision) into `dest`."""
    from huggingface_hub import snapshot_download

    if not f.hub_revision:
        _log(f"warning: {f.label}.hub_revision is not set; using the dataset's current main branch")
    local_only, unreachable = _hub_mode(f.label)
    with hub_errors(f.label, f.hub_dataset, "dataset", f.hub_revision, recipe, unreachable):
        snap = Path(snapshot_download(f.hub_dataset, repo_type="dataset", revision=f.hub_revision,
                                      allow_patterns=[glob.escape(f.path)], local_files_only=local_only))
    cached, commit = snap / f.path, _commit_of(snap, f.label)
    if not cached.is_file():
        raise FetchError(f"{f.label}: dataset {f.hub_dataset}@{commit} has no file {f.path!r} (check data.path)")
    partial = dest / (f.name + ".partial")
    try:
        # a copy, not a link: data files are small and DVC tracks the raw folder by content
        shutil.copyfile(cached, partial)
        hashes = verify(partial, f.sha256, f.git_blob, f"{f.label} ({f.hub_dataset}/{f.path})")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest / f.name)
    return {**hashes, "hub_dataset": f.hub_dataset, "hub_path": f.path, "requested_revision": f.hub_revision,
            "resolved_revision": commit, "split": f.split}


# --- entry points called by fetch.py -------------------------------------------------------

def fetch_remote_data(recipe: Recipe, dest: Path, *, sleep: Sleep = time.sleep) -> list[dict[str, Any]]:
    """Download and verify every data file of the recipe into `dest`; the raw manifest's file list.

    On any error the files this call wrote are removed (fetch.py also discards the whole folder).
    """
    dest = Path(dest)
    written: list[Path] = []
    entries: list[dict[str, Any]] = []
    try:
        for f in data_files(recipe):
            target = dest / f.name
            if f.source == "url":
                _log(f"{f.label}: {f.url} -> {target.name}")
                try:
                    prov = download_url(f.url, target, label=f.label, sleep=sleep)
                except OfflineError as e:
                    raise OfflineError(f"{f.label}: {f.url}: {e}\n{offline_help(recipe.name)}") from None
                written.append(target)
                info = {**verify(target, f.sha256, f.git_blob, f"{f.label} ({f.url})"), **prov}
            elif f.source == "hub":
                _log(f"{f.label}: hub dataset {f.hub_dataset}@{f.hub_revision or 'main'} {f.path} -> {target.name}")
                info = fetch_hub_data_file(f, dest, recipe.name)
                written.append(target)
            else:
                src = Path(f.path)
                if not src.is_file():
                    raise DataError(f"{f.label}.path: {src}: no such file")
                shutil.copyfile(src, target)
                written.append(target)
                info = {**verify(target, f.sha256, f.git_blob, f"{f.label} ({src})"), "path": str(src)}
            entries.append({"name": f.name, "format": f.format, "fields": f.fields, **info})
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return entries


def _select_model_files(files: dict[str, int | None], read_index: Callable[[str], dict],
                        allow_pickle: bool, trust_remote_code: bool, what: str) -> list[str]:
    """Which repo files make the base folder: configs, tokenizer, one set of weights."""
    top = [n for n in files if "/" not in n]
    chosen = [n for n in top if any(fnmatch.fnmatchcase(n, p) for p in MODEL_FILES)]
    if trust_remote_code:
        chosen += [n for n in top if n.endswith(".py")]
    if "config.json" not in files:
        raise FetchError(f"{what}: the repo has no config.json; not a transformers model")
    # Prefer safetensors even when pickle is allowed; and take only the shards the index names, so a
    # repo that also ships e.g. consolidated.safetensors is not downloaded twice.
    kinds = [SAFETENSORS] + ([PICKLE] if allow_pickle else [])
    for index, single in kinds:
        if index in files:
            shards = sorted(set(read_index(index).get("weight_map", {}).values()))
            missing = [s for s in shards if s not in files]
            if not shards or missing:
                raise FetchError(f"{what}: {index} names shards the repo lacks: {missing or 'none listed'}")
            return sorted(set(chosen) | {index, *shards})
        if single in files:
            return sorted(set(chosen) | {single})
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in top)
    hint = (" It has pickle weights (.bin); set model.allow_pickle: true to accept them (unpickling can run code)."
            if has_pickle and not allow_pickle else "")
    raise FetchError(f"{what}: no model.safetensors(.index.json) in the repo.{hint}")


def _place(src: Path, dst: Path) -> str:
    """Hard-link `src` (a cache symlink, resolved to its blob) at `dst`; copy across filesystems."""
    blob = src.resolve()
    try:
        os.link(blob, dst)
        return "hardlink"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP,
                           errno.EOPNOTSUPP):
            raise
    shutil.copyfile(blob, dst)
    return "copy"


def fetch_hub_model(recipe: Recipe, dest: Path) -> dict[str, Any]:
    """Snapshot `model.name` at `model.revision` into the HF cache and link it into `dest`.

    Returns facts for the manifest: repo, requested revision, resolved commit, files with sizes,
    how they were placed. Raises FetchError / OfflineError with what to do.
    """
    from huggingface_hub import constants, get_cached_repo_tree, hf_hub_download, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    m, dest = recipe.model, Path(dest)
    repo, rev, what = m.name, m.revision, "model"
    if not rev:
        _log(f"warning: model.revision is not set; using {repo}'s current main branch (the commit is recorded)")
    elif not COMMIT_RE.fullmatch(rev):
        _log(f"warning: model.revision {rev!r} is a branch or tag, not a commit; the commit is recorded")
    _log(f"model: hub {repo}@{rev or 'main'} -> {dest}")
    local_only, unreachable = _hub_mode(what)
    with hub_errors(what, repo, "model", rev, recipe.name, unreachable):
        # Step 1 resolves the revision (online: one API call; offline: the cache's refs) and, as a side
        # effect of snapshot_download, caches the commit's full file listing with sizes.
        snap = Path(snapshot_download(repo, revision=rev, allow_patterns=["config.json"],
                                      local_files_only=local_only))
        commit = _commit_of(snap, what)
        try:
            files: dict[str, int | None] = {f.path: f.size for f in get_cached_repo_tree(repo, revision=commit)}
        except CachedRepoTreeNotFoundError:
            # a cache filled by an older client has no listing: what is on disk is all we can use
            files = {p.relative_to(snap).as_posix(): p.stat().st_size for p in snap.rglob("*") if p.is_file()}

        def read_index(name: str) -> dict:
            path = hf_hub_download(repo, name, revision=commit, local_files_only=local_only)
            return json.loads(Path(path).read_text(encoding="utf-8"))

        chosen = _select_model_files(files, read_index, m.allow_pickle, m.trust_remote_code, what)
        snap = Path(snapshot_download(repo, revision=commit, allow_patterns=[glob.escape(n) for n in chosen],
                                      local_files_only=local_only))
    missing = [n for n in chosen if not (snap / n).is_file()]
    if missing:
        raise OfflineError(f"{what}: the cached snapshot of {repo}@{commit} lacks {', '.join(missing)}\n"
                           f"{offline_help(recipe.name)}")
    placed, listing = set(), []
    try:
        for name in chosen:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            placed.add(_place(snap / name, target))
            size = target.stat().st_size
            if files.get(name) is not None and files[name] != size:
                raise FetchError(f"{what}: {name}: {size} bytes in the cache, the Hub lists {files[name]}")
            listing.append({"name": name, "size": size})
    except BaseException:
        for name in chosen:
            (dest / name).unlink(missing_ok=True)
        raise
    return {
        "source": "hub", "repo": repo, "requested_revision": rev, "resolved_commit": commit,
        "files": listing, "total_bytes": sum(f["size"] for f in listing),
        "placed_by": placed.pop() if len(placed) == 1 else "mixed (hardlink and copy)",
        "allow_pickle": m.allow_pickle, "hf_hub_offline": constants.is_offline_mode(),
        "from_cache_only": local_only,
    }
