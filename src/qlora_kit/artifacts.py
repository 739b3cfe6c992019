"""Stage outputs: atomic writes, content hashes and the manifest every stage leaves behind.

A stage builds its output in a temporary sibling (`<name>.partial-<pid>`) and renames it into
place only when complete, so an interrupted stage never leaves something that looks finished.
`manifest.json` records the resolved config sections the stage read, input hashes, package
versions and the torch thread count: all functions of the inputs, so an identical rerun writes
identical bytes and DVC reruns nothing downstream. Timings, host and other volatile facts go to
`reports/NAME/STAGE_run.json` (`StageRun.write_run_report`), which no stage depends on. Neither
records environment variables (tokens live there).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from qlora_kit.config import Recipe, RecipeError
from qlora_kit.errors import IntegrityError, OutputError

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets",
            "huggingface-hub", "sentencepiece", "tokenizers", "safetensors", "llama-cpp-python", "dvc")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def git_blob_id(path: Path, chunk: int = 1 << 20) -> str:
    """`git hash-object` of a file: sha1 over `blob <size>\\0<bytes>`."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


INCOMPLETE = "INCOMPLETE"  # marker inside a folder still being written; removed last
HASH_LIMIT = 256 << 20  # larger files (weight shards) are named by size: DVC hashes them already


def _file_id(p: Path, full: bool = False) -> str:
    size = p.stat().st_size
    return sha256_file(p) if full or size <= HASH_LIMIT else f"size:{size}"


def hash_tree(path: Path, full: bool = False) -> dict[str, str]:
    """sha256 of every file under a folder (or of the file itself), by relative path; files over
    HASH_LIMIT are named by size unless `full`."""
    path = Path(path)
    if path.is_file():
        return {path.name: _file_id(path, full)}
    return {str(p.relative_to(path)): _file_id(p, full) for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", INCOMPLETE)}


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _partial_name(final: Path) -> Path:
    return final.with_name(f"{final.name}.partial-{os.getpid()}")


def clear_stale_partials(final: Path) -> None:
    for stale in final.parent.glob(f"{final.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def clear_dead_partials(folders: Iterator[Path] | list[Path]) -> list[Path]:
    """Remove every `*.partial-PID` under `folders` whose process is gone (a killed run's leftovers)."""
    removed = []
    for top in folders:
        for stale in sorted(Path(top).glob("**/*.partial-*")) if Path(top).is_dir() else ():
            pid = stale.name.rpartition(".partial-")[2]
            if pid.isdigit() and not _alive(int(pid)) and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def check_target(final: Path) -> None:
    """Refuse an output that is a symlink, or whose folder leads out of the checkout."""
    from qlora_kit.layout import root

    if final.is_symlink():
        raise OutputError(f"{final}: the output is a symlink (to {os.readlink(final)}); the kit replaces an output "
                          "whole, so it refuses symlinked outputs. Remove the link (a folder on another disk: "
                          "point QLORA_KIT_ROOT or the DVC cache there instead)")
    top = root().absolute()
    if final.absolute().is_relative_to(top) and not final.parent.resolve().is_relative_to(top.resolve()):
        raise OutputError(f"{final}: its folder resolves to {final.parent.resolve()}, outside the checkout "
                          f"{top}; refusing to write there")


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT) or
                                       bool(re.search(r"\d+ requested and \d+ written", str(e))))


def _disk_full_error(e: BaseException, where: Path, written: Path) -> OutputError:
    free = shutil.disk_usage(where if where.exists() else where.parent).free
    size = sum(p.stat().st_size for p in written.rglob("*") if p.is_file()) if written.is_dir() else 0
    return OutputError(f"disk full while writing {getattr(e, 'filename', None) or where}: {free / 2**20:.0f} MiB "
                       f"free on that disk, and the output had reached {size / 2**20:.0f} MiB (the partial output "
                       f"was removed); free more than that, then rerun")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `final`, on error it is removed.

    The temporary folder holds an INCOMPLETE marker until the last moment, so a folder left by a
    killed run never looks finished (and the next stage run removes it: `clear_dead_partials`).
    """
    final = Path(final)
    check_target(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_partials(final)
    tmp = _partial_name(final)
    tmp.mkdir()
    (tmp / INCOMPLETE).write_text("this folder is from a run that did not finish; delete it\n", encoding="utf-8")
    try:
        yield tmp
        (tmp / INCOMPLETE).unlink(missing_ok=True)
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
    except BaseException as e:
        err = _disk_full_error(e, final, tmp) if disk_full(e) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if err is not None:
            raise err from None
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    path = Path(path)
    check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(path)
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise _disk_full_error(e, path, tmp) from None
        raise


def verify_recorded(folder: Path, recorded: dict[str, str], stage: str, recipe: str) -> None:
    """Check files against the sha256 (or size) a stage's manifest recorded; name the damaged one."""
    for name, want in recorded.items():
        p = Path(folder) / name
        if not p.is_file():
            got = "missing"
        else:  # the same kind of id as recorded: a full sha256 (quantize), or size: for big files (hash_tree)
            got = f"size:{p.stat().st_size}" if want.startswith("size:") else sha256_file(p)
        if got != want:
            what = "is missing" if got == "missing" else f"is damaged: {got[:19]} differs from {want[:19]}"
            raise IntegrityError(f"{p} {what} (recorded by the {stage} stage's manifest); rerun "
                                 f"`qlora-kit {stage} --recipe {recipe}` (or `dvc repro -f {stage}@{recipe}`)")


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


THREADS_ENV = "QLORA_KIT_THREADS"
DEFAULT_THREADS = 1  # README "Threads": on a small CPU one thread is the reproducible default


def torch_threads() -> int:
    """The torch thread count for train, merge and evaluate: QLORA_KIT_THREADS, else 1.

    The count changes float reduction order, so results (the tiny run's loss included) depend on
    it: it is recorded in each manifest and is part of the train run key."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return DEFAULT_THREADS
    if not raw.isdigit() or int(raw) < 1:
        raise RecipeError(f"{THREADS_ENV}={raw!r}: expected a whole number of threads, 1 or more")
    return int(raw)


class StageRun:
    """Collects what a stage's manifest records; `manifest()` returns the dict to write.

    `facts` go into the manifest (deterministic: a function of the inputs); `volatile` facts,
    timings and the host go to the run report (`write_run_report`)."""

    def __init__(self, stage: str, recipe: Recipe, overrides: dict[str, Any] | None = None):
        self.stage, self.recipe = stage, recipe
        self.overrides = dict(overrides or {})
        self.started = time.time()
        self.timings: dict[str, float] = {}
        self.inputs: dict[str, Any] = {}
        self.facts: dict[str, Any] = {}
        self.volatile: dict[str, Any] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._t, 3)
        self._t = now

    def add_input(self, label: str, path: Path) -> None:
        self.inputs[label] = hash_tree(Path(path))

    def use_threads(self) -> int:
        """Set torch's thread count from `torch_threads()` and record it."""
        import torch

        n = torch_threads()
        torch.set_num_threads(n)
        self.facts["threads"] = n
        return n

    def manifest(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "recipe": self.recipe.name,
            "config": self.recipe.sections_for(self.stage),
            "overrides": self.overrides,
            "inputs": self.inputs,
            "facts": self.facts,
            "packages": package_versions(),
        }

    def run_report(self) -> dict[str, Any]:
        cpu_s = sum(os.times()[:4])
        return {"stage": self.stage, "recipe": self.recipe.name, "threads": self.facts.get("threads"),
                **self.volatile,
                "host": {"platform": platform.platform(), "machine": platform.machine(),
                         "node": platform.node(), "cpus": os.cpu_count(), "argv0": Path(sys.argv[0]).name},
                "timings_s": {**self.timings, "total": round(time.time() - self.started, 3)},
                "cpu_s": round(cpu_s, 2)}

    def write_run_report(self, reports: Path) -> Path:
        """reports/NAME/STAGE_run.json: what this run took and where it ran (dvc: cache: false)."""
        path = Path(reports) / f"{self.stage}_run.json"
        write_json(path, self.run_report())
        return path


KEY_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets",
                "tokenizers", "llama-cpp-python", "lm-eval", "dvc")


def environment() -> dict[str, Any]:
    """What ran this evaluation: every installed distribution, platform and device, and a
    fingerprint (sha256 of all of it) that changes whenever any of them does."""
    import hashlib
    import os
    import platform
    from importlib import metadata

    import torch

    pkgs = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                   if d.metadata and d.metadata["Name"]}, key=str.lower)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
           "cpus": os.cpu_count(), "device": device,
           "cuda": torch.version.cuda or "none"}
    versions = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    blob = json.dumps({"packages": pkgs, **{k: env[k] for k in ("python", "platform", "device", "cuda")}},
                      sort_keys=True)
    return {"fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16], **env, "packages": versions,
            "all_packages": pkgs}
