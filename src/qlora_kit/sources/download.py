"""Network side of the fetch stage: pinned raw URLs, Hub dataset files and Hub model snapshots.

    qlora-kit fetch --recipe komt            (calls fetch_remote_data / fetch_hub_model below)

`fetch.py` handles the offline sources (tiny, local) and calls in here for `data.source: url|hub`
and `model.source: hub`.

Data files (`data` and each `data.extra` entry) are written into the raw folder and verified:

- `url`: streamed by `http.py` to `NAME.partial` next to the final file, renamed into place only
  after the byte count matches Content-Length and the sha256 / git blob id (`git hash-object`)
  match the recipe; timeouts, an overall deadline, a size cap and retries are described there.
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

import errno
import fnmatch
import glob
import json
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from qlora_kit.artifacts import git_blob_id, sha256_file
from qlora_kit.config import Recipe, RecipeError
from qlora_kit.errors import DataError
from qlora_kit.sources.hub import _hub_mode, hub_errors, offline_help
from qlora_kit.sources.http import (  # noqa: F401  (re-exported: the fetch stage's one entry point)
    HTTP_TIMEOUT_ENV, MAX_ATTEMPTS, FetchError, OfflineError, Sleep, _log, download_url, http_timeout)

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
        if f.source == "hub" and (f.path.startswith("/") or ".." in PurePosixPath(f.path).parts):
            raise RecipeError(f"{f.label}.path: {f.path!r} leaves the dataset repo; give a path inside it")
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


# --- Hugging Face Hub ----------------------------------------------------------------------

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
                if src.is_symlink():  # a link could pull any file of this machine into data/NAME/raw
                    raise DataError(f"{f.label}.path: {src} is a symlink (to {os.readlink(src)}); give the file "
                                    "itself")
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


def _resolve_model_files(repo: str, rev: str | None, m: Any, local_only: bool, what: str,
                         before_weights: Callable[[int, bool], None] | None = None
                         ) -> tuple[Path, str, dict[str, int | None], list[str]]:
    """(snapshot folder, resolved commit, repo listing with sizes, chosen files), all in the HF cache.
    `before_weights(bytes of the chosen files, all of them cached already)` runs before the weights
    are downloaded (the preflight)."""
    from huggingface_hub import get_cached_repo_tree, hf_hub_download, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    # Step 1 resolves the revision (online: one API call; offline: the cache's refs) and, as a side
    # effect of snapshot_download, caches the commit's full file listing with sizes.
    snap = Path(snapshot_download(repo, revision=rev, allow_patterns=["config.json"], local_files_only=local_only))
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
    if before_weights is not None:
        before_weights(sum(files.get(n) or 0 for n in chosen), all((snap / n).is_file() for n in chosen))
    snap = Path(snapshot_download(repo, revision=commit, allow_patterns=[glob.escape(n) for n in chosen],
                                  local_files_only=local_only))
    return snap, commit, files, chosen


def _place_all(snap: Path, dest: Path, chosen: list[str], files: dict[str, int | None], what: str
               ) -> tuple[set[str], list[dict[str, Any]]]:
    """Link (or copy) every chosen file into `dest`, checking sizes; remove them all on error."""
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
    return placed, listing


def fetch_hub_model(recipe: Recipe, dest: Path) -> dict[str, Any]:
    """Snapshot `model.name` at `model.revision` into the HF cache and link it into `dest`.

    Returns facts for the manifest: repo, requested revision, resolved commit, files with sizes,
    how they were placed. Raises FetchError / OfflineError with what to do.
    """
    from huggingface_hub import constants

    m, dest = recipe.model, Path(dest)
    repo, rev, what = m.name, m.revision, "model"
    if not rev:
        _log(f"warning: model.revision is not set; using {repo}'s current main branch (the commit is recorded)")
    elif not COMMIT_RE.fullmatch(rev):
        _log(f"warning: model.revision {rev!r} is a branch or tag, not a commit; the commit is recorded")
    _log(f"model: hub {repo}@{rev or 'main'} -> {dest}")
    local_only, unreachable = _hub_mode(what)
    from qlora_kit.sources import preflight

    def check(size: int, cached: bool) -> None:  # before gigabytes move: can this machine run it?
        preflight.require(recipe, size, dest, base_present=cached)

    with hub_errors(what, repo, "model", rev, recipe.name, unreachable):
        snap, commit, files, chosen = _resolve_model_files(repo, rev, m, local_only, what, check)
    missing = [n for n in chosen if not (snap / n).is_file()]
    if missing:
        raise OfflineError(f"{what}: the cached snapshot of {repo}@{commit} lacks {', '.join(missing)}\n"
                           f"{offline_help(recipe.name)}")
    placed, listing = _place_all(snap, dest, chosen, files, what)
    return {
        "source": "hub", "repo": repo, "requested_revision": rev, "resolved_commit": commit,
        "files": listing, "total_bytes": sum(f["size"] for f in listing),
        "placed_by": placed.pop() if len(placed) == 1 else "mixed (hardlink and copy)",
        "allow_pickle": m.allow_pickle, "hf_hub_offline": constants.is_offline_mode(),
        "from_cache_only": local_only,
    }
