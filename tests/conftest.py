"""Shared fixtures: repo paths, tiny models built once per session, temporary repo copies."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_rows():
    from qlora_kit.tiny_data import generate

    return generate(0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, sample_rows) -> Path:
    from qlora_kit.tiny_model import build, sample_texts

    return build("llama", tmp_path_factory.mktemp("tiny-llama"), sample_texts(sample_rows))


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory, sample_rows) -> Path:
    from qlora_kit.tiny_model import build, sample_texts

    return build("gpt_neox", tmp_path_factory.mktemp("tiny-neox"), sample_texts(sample_rows))


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


class CharTok:
    """One id per character (BOS 1, EOS 2 for "</s>", pad 0): keeps preprocess tests pure and fast."""

    bos_id, eos_id, pad_id, bos, eos = 1, 2, 0, "<s>", "</s>"

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if text.startswith("</s>", i):
                out.append(2)
                i += 4
            else:
                out.append(3 + ord(text[i]) % 5000)
                i += 1
        return out
