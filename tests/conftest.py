"""Session fixtures: the shipped sample rows and tiny models built once; the gpu marker skips without CUDA."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.repo import SHARED_DATA

# The kit reads the sources' published files only from the local mirror the environment names
# (never from a folder beside the checkout); the suite points it at the real data when present.
if SHARED_DATA.is_dir():
    os.environ.setdefault("QLORA_KIT_SHARED_DATA", str(SHARED_DATA))


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_rows():
    from qlora_kit.tiny.data import generate

    return generate(0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, sample_rows) -> Path:
    from qlora_kit.tiny.model import build, sample_texts

    return build("llama", tmp_path_factory.mktemp("tiny-llama"), sample_texts(sample_rows))


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory, sample_rows) -> Path:
    from qlora_kit.tiny.model import build, sample_texts

    return build("gpt_neox", tmp_path_factory.mktemp("tiny-neox"), sample_texts(sample_rows))


