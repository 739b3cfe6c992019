"""The checkout under test, the real data beside it, and throwaway copies of the checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
# Real data from the sources (read in place, never copied into the repo): the folder named by
# QLORA_KIT_TEST_DATA, else ../shared/data beside the checkout. Tests that need it skip without it.
SHARED_DATA = Path(os.environ.get("QLORA_KIT_TEST_DATA") or REPO.parent / "shared" / "data")
FIXTURES = REPO / "tests" / "fixtures"
BIN = Path(sys.executable).parent


def copy_repo(dest: Path) -> Path:
    """A clean copy of the checkout (tracked + untracked-not-ignored files) as its own git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest


def kit_env(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "QLORA_KIT_ROOT": str(root),
            "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def kit_root(dest: Path) -> Path:
    """A bare output root for in-process stage runs: just the recipes the kit reads from it."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "recipes", dest / "recipes", dirs_exist_ok=True)
    return dest


def terminate(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a server a test started: SIGTERM, then SIGKILL after `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
