"""Evaluation inputs a recipe references by repo@commit (prompt sets, baselines, reference curves).

    from qlora_kit.sources.prompt_sets import load_prompt_set, locate
    loaded = load_prompt_set(recipe.eval.prompt_sets[0], cache_dir, allow_download=False)

An `EvalFile` (config.py) names a file of a public source repository, pinned by commit and
sha256. It is never copied into this repository. `locate` finds a verified copy, in this order:

1. a local mirror folder, `<mirror>/<repo with "/" -> "-">/<path>`, where `<mirror>` is
   `$QLORA_KIT_SHARED_DATA` when it is set (nothing outside the checkout is looked at otherwise);
2. an earlier download in the evaluate stage's cache folder (`reports/NAME/prompt_sets/`);
3. a download of `https://raw.githubusercontent.com/<repo>/<commit>/<path>` with
   `download.download_url` (retries, no partial files) into that cache, when the caller allows it.

Every copy is checked against the recipe's sha256 (and git blob id when given) before use; a copy
that does not match is skipped (a cached one is deleted). When no verified copy can be had the
file is *unavailable* (`Unavailable`, with the reason): the evaluate stage reports that and goes
on. A verified file whose records do not fit the recipe's field mapping is a recipe error
(`DataError` naming file, line and field), raised before the stage spends any time.

Pure standard library plus the kit's download helper; no torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from qlora_kit.artifacts import git_blob_id, sha256_file
from qlora_kit.config import EvalFile, PromptSet
from qlora_kit.errors import DataError

SHARED_DATA_ENV = "QLORA_KIT_SHARED_DATA"
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
KIT_FIELDS = ("id", "instruction", "input", "answer")


class Unavailable(Exception):
    """No verified copy of an evaluation file could be had; `str()` says why."""


def shared_data_dirs() -> list[Path]:
    """The local mirror folder ($QLORA_KIT_SHARED_DATA) when it is set and exists, else []."""
    mirror = os.environ.get(SHARED_DATA_ENV)
    return [Path(mirror)] if mirror and Path(mirror).is_dir() else []


def relative_path(f: EvalFile) -> PurePosixPath:
    """`<repo with "/" -> "-">/<path>`: the file's place under the shared folder and the cache."""
    path = PurePosixPath(f.path)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DataError(f"evaluation file {f.repo}:{f.path}: path must be relative, without '..'")
    return PurePosixPath(f.repo.replace("/", "-")) / path


def raw_url(f: EvalFile) -> str:
    return RAW_URL.format(repo=f.repo, commit=f.commit, path=f.path)


def _mismatch(path: Path, f: EvalFile) -> str | None:
    got = sha256_file(path)
    if got != f.sha256:
        return f"sha256 {got[:12]}... differs from the recipe's {f.sha256[:12]}..."
    if f.git_blob:
        blob = git_blob_id(path)
        if blob != f.git_blob:
            return f"git blob {blob[:12]}... differs from the recipe's {f.git_blob[:12]}..."
    return None


def locate(f: EvalFile, cache_dir: Path | None, *, allow_download: bool) -> tuple[Path, dict[str, Any]]:
    """A verified local copy of `f` and how it was found; raise Unavailable with the reason."""
    rel = relative_path(f)
    tried: list[str] = []
    for base in shared_data_dirs():
        path = base / rel
        if path.is_file():
            bad = _mismatch(path, f)
            if bad is None:
                return path, {"from": "shared", "path": str(path), "sha256": f.sha256}
            tried.append(f"{path}: {bad}")
    if cache_dir is not None:
        cached = Path(cache_dir) / rel
        if cached.is_file():
            bad = _mismatch(cached, f)
            if bad is None:
                return cached, {"from": "cache", "path": str(cached), "sha256": f.sha256}
            cached.unlink()
            tried.append(f"{cached}: {bad} (removed)")
    url = raw_url(f)
    if not allow_download or cache_dir is None:
        where = ", ".join(str(d) for d in shared_data_dirs()) or f"no local mirror (set {SHARED_DATA_ENV})"
        why = f"not found under {where}" + (f"; {'; '.join(tried)}" if tried else "")
        raise Unavailable(f"{why}; download of {url} not attempted (downloads happen only when a judge is configured)")
    from qlora_kit.sources.download import FetchError, download_url

    target = Path(cache_dir) / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        facts = download_url(url, target, label=f"{f.repo}:{f.path}")
    except FetchError as e:  # OfflineError included: no network is an answer, not a crash
        raise Unavailable(f"download of {url} failed: {str(e).splitlines()[0]}") from None
    bad = _mismatch(target, f)
    if bad is not None:
        target.unlink()
        raise Unavailable(f"downloaded {url} but {bad}")
    return target, {"from": "download", "path": str(target), "sha256": f.sha256, "url": url,
                    "bytes": facts.get("bytes")}


# --- reading records ------------------------------------------------------------------------

def read_records(f: EvalFile, path: Path) -> list[tuple[str, Any]]:
    """(where, record) for every record of the file: `file:line` for JSON lines and text, `file: record N`
    for a JSON array."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from None
    out: list[tuple[str, Any]] = []
    if f.format == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records")
        out = [(f"{path}: record {i}", rec) for i, rec in enumerate(data)]
    elif f.format == "jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    else:  # txt: one prompt per non-empty line
        out = [(f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if f.rows is not None and len(out) != f.rows:
        raise DataError(f"{path}: {len(out)} records, the recipe says rows: {f.rows}")
    return out


def lookup(record: Any, dotted: str) -> Any:
    """`record["a"][0]["b"]` for "a.0.b"; KeyError naming the part that is missing."""
    cur = record
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(part)
    return cur


def rows_of(f: EvalFile, path: Path, want: tuple[str, ...] = KIT_FIELDS) -> list[dict[str, Any]]:
    """Records mapped to kit names: instruction (required), input ("" when unmapped), answer, id.

    Only the kit names in `want` are resolved, so a mapping the caller does not use (e.g. a
    baseline's `input`, stored there as a Python repr string) cannot fail the load.
    """
    rows = []
    for i, (where, rec) in enumerate(read_records(f, path)):
        row: dict[str, Any] = {"id": i, "input": "", "where": where}
        if f.format == "txt":
            row["instruction"] = rec
        for kit in want:
            key = f.fields.get(kit)
            if key is None or f.format == "txt":
                continue
            try:
                value = lookup(rec, key)
            except KeyError as e:
                raise DataError(f"{where}: field {key!r} (kit name {kit}) missing at {e.args[0]!r}") from None
            if kit == "id":
                if not isinstance(value, (str, int)) or isinstance(value, bool):
                    raise DataError(f"{where}: field {key!r} (id) is not a string or integer")
            elif value is None and kit == "input":
                value = ""
            elif not isinstance(value, str):
                raise DataError(f"{where}: field {key!r} (kit name {kit}) is not a string")
            row[kit] = value
        if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise DataError(f"{where}: no instruction (map it with fields: {{instruction: KEY}})")
        rows.append(row)
    return rows


@dataclass
class LoadedSet:
    """A prompt set as the evaluate stage uses it; `unavailable` is the reason when it cannot."""

    spec: PromptSet
    rows: list[dict[str, Any]] = field(default_factory=list)
    baseline: list[str] | None = None  # pairwise judge: the recorded answer for each row
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    unavailable: str = ""

    @property
    def name(self) -> str:
        return self.spec.name


def load_prompt_set(ps: PromptSet, cache_dir: Path | None, *, allow_download: bool) -> LoadedSet:
    """Locate, verify and read one prompt set (and its baseline answers, for the pairwise judge).

    The baseline is matched to the prompts by position, because the sources' ids differ between
    the two files (koala_0.. in the prompts, koala_1.. in AG2's answers); every row's instruction
    must then be the same text in both, or the files do not belong together (DataError).
    """
    out = LoadedSet(ps)
    try:
        path, prov = locate(ps.prompts, cache_dir, allow_download=allow_download)
        out.files["prompts"] = prov
        base_path = None
        if ps.baseline is not None:
            base_path, out.files["baseline"] = locate(ps.baseline, cache_dir, allow_download=allow_download)
    except Unavailable as e:
        out.unavailable = str(e)
        return out
    out.rows = rows_of(ps.prompts, path)
    if base_path is not None and ps.baseline is not None:
        if "answer" not in ps.baseline.fields:
            raise DataError(f"{base_path}: baseline of prompt set {ps.name!r} maps no answer field")
        base = rows_of(ps.baseline, base_path, want=("instruction", "answer"))
        if len(base) != len(out.rows):
            raise DataError(f"{base_path}: {len(base)} baseline answers for {len(out.rows)} prompts in {path}")
        for p, b in zip(out.rows, base):
            if p["instruction"].strip() != b["instruction"].strip():
                raise DataError(f"{b['where']}: instruction differs from {p['where']}; the baseline's rows "
                                "must follow the prompt file's order")
        out.baseline = [b["answer"] for b in base]
    return out
