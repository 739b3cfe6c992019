"""Faults between and inside stages (issue 14): damaged adapters and GGUFs are named with what to
rerun, killed runs leave nothing that looks complete and are cleaned at the next start, symlinked
outputs are refused before any work, and a full disk says "disk full" with the path.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qlora_kit import artifacts, cli
from qlora_kit.errors import DataError, IntegrityError, MergeError, OutputError
from support.repo import REPO, kit_root


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    r = kit_root(tmp_path / "kit")
    monkeypatch.setenv("QLORA_KIT_ROOT", str(r))
    monkeypatch.chdir(r)
    return r


def one_line_exit(capsys, *argv: str, code: int = 2) -> str:
    got = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert got == code, err
    assert len([line for line in err.splitlines() if not line.startswith("qlora-kit: warning")]) == 1, err
    return err


# --- integrity between stages --------------------------------------------------------------

def flip_a_bit_in_the_tensor_data(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    raw[8 + header_len + 5] ^= 0x10  # inside the first tensor's data: the header still parses
    path.write_bytes(bytes(raw))


@pytest.fixture
def merged_root(tmp_path, monkeypatch, tiny_llama):
    """A kit root with base, processed rows and an adapter whose train manifest records its files."""
    from support.stages import stage_root

    root, recipe = stage_root(tmp_path / "kit", "tiny", tiny_llama)
    monkeypatch.setenv("QLORA_KIT_ROOT", str(root))
    monkeypatch.chdir(root)
    adapter = root / "models" / "tiny" / "adapter"
    files = artifacts.hash_tree(adapter)
    artifacts.write_json(adapter / "manifest.json", {"stage": "train", "facts": {"files": files}})
    return root


def test_merge_refuses_an_adapter_with_one_flipped_bit_and_says_what_to_rerun(merged_root, capsys):
    weights = merged_root / "models" / "tiny" / "adapter" / "adapter_model.safetensors"
    flip_a_bit_in_the_tensor_data(weights)
    err = one_line_exit(capsys, "merge", "--recipe", "tiny")
    assert f"{weights} is damaged" in err and "rerun `qlora-kit train --recipe tiny`" in err
    assert not (merged_root / "models" / "tiny" / "merged").exists()


def test_a_corrupt_adapter_header_is_one_line_not_a_traceback(merged_root, capsys):
    weights = merged_root / "models" / "tiny" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes((10**12).to_bytes(8, "little") + weights.read_bytes()[8:])
    (merged_root / "models" / "tiny" / "adapter" / "manifest.json").unlink()  # no hashes to check it against
    err = one_line_exit(capsys, "merge", "--recipe", "tiny", code=1)
    assert f"{weights}: not a readable safetensors file" in err and "Traceback" not in err


def test_the_raw_safetensors_reader_names_a_bad_header(tmp_path):
    from qlora_kit.weights.safetensors_io import read_st_header

    bad = tmp_path / "x.safetensors"
    bad.write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 31)
    with pytest.raises(MergeError, match=rf"{bad}: not a readable safetensors file"):
        read_st_header(bad)


def gguf_root(root: Path, tiny_llama: Path, body: bytes, recorded: bytes) -> Path:
    import hashlib
    import shutil

    for name in ("base", "merged"):
        shutil.copytree(tiny_llama, root / "models" / "tiny" / name)
    gguf = root / "models" / "tiny" / "gguf"
    gguf.mkdir(parents=True)
    (gguf / "model-f16.gguf").write_bytes(body)
    files = {"f16": {"file": "model-f16.gguf", "sha256": hashlib.sha256(recorded).hexdigest()}}
    artifacts.write_json(gguf / "manifest.json", {"stage": "quantize", "facts": {"files": files}})
    return gguf / "model-f16.gguf"


def test_evaluate_refuses_a_truncated_gguf_before_loading_anything(root, tiny_llama, capsys):
    whole = b"GGUF" + os.urandom(4096)
    damaged = gguf_root(root, tiny_llama, whole[:1000], whole)
    err = one_line_exit(capsys, "evaluate", "--recipe", "tiny")
    assert f"{damaged} is damaged" in err and "rerun `qlora-kit quantize --recipe tiny`" in err
    assert not (root / "reports" / "tiny" / "evaluate").exists()


def test_the_gguf_reader_turns_a_bad_file_into_one_line(tmp_path):
    from qlora_kit.gguf.runtime import open_gguf

    bad = tmp_path / "model-q4_k_m.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(IntegrityError, match=rf"{bad}: llama.cpp cannot load this GGUF .*rerun `qlora-kit quantize`"):
        with open_gguf(bad):
            pass


# --- leftovers -----------------------------------------------------------------------------

KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qlora_kit.artifacts import atomic_dir
    with atomic_dir(Path(sys.argv[1])) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)
        print("written", flush=True)
        time.sleep(60)
""")


def test_a_killed_run_leaves_a_marked_partial_that_the_next_stage_start_removes(root, capsys):
    merged = root / "models" / "tiny" / "merged"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(merged)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    [partial] = list(merged.parent.glob("merged.partial-*"))
    assert (partial / artifacts.INCOMPLETE).is_file() and not merged.exists()  # never looks complete
    live = merged.parent / f"adapter.partial-{os.getppid()}"  # a run still going is left alone
    live.mkdir()
    one_line_exit(capsys, "merge", "--recipe", "tiny")  # fails (no adapter), but cleans first
    assert not partial.exists() and live.is_dir()


def test_a_symlinked_output_folder_is_refused_before_any_work(root, tmp_path, capsys):
    elsewhere = tmp_path / "other-disk"
    elsewhere.mkdir()
    gguf = root / "models" / "tiny" / "gguf"
    gguf.parent.mkdir(parents=True)
    gguf.symlink_to(elsewhere)
    t0 = time.monotonic()
    err = one_line_exit(capsys, "quantize", "--recipe", "tiny")
    assert f"{gguf}: the output is a symlink (to {elsewhere})" in err
    assert list(elsewhere.iterdir()) == [] and not list(gguf.parent.glob("gguf.partial-*"))
    assert time.monotonic() - t0 < 30


def test_an_output_folder_leading_out_of_the_checkout_is_refused(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "models").symlink_to(outside)
    with pytest.raises(OutputError, match="outside the checkout"):
        with artifacts.atomic_dir(root / "models" / "tiny" / "merged"):
            pass
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device", "model.safetensors"),
                                 OSError("262144 requested and 32768 written")])
def test_disk_full_says_disk_full_with_the_path_and_leaves_nothing(root, exc):
    final = root / "models" / "tiny" / "merged"
    with pytest.raises(OutputError, match=r"disk full while writing .*MiB free on that disk") as e:
        with artifacts.atomic_dir(final) as tmp:
            (tmp / "part").write_bytes(b"x" * 4096)
            raise exc
    assert isinstance(e.value, DataError)  # the CLI prints it as one line and exits 2
    assert not final.exists() and not list(final.parent.glob("merged.partial-*"))


def test_disk_full_in_a_single_file_write_is_named_too(root, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OutputError, match="disk full while writing"):
        artifacts.write_json(root / "reports" / "tiny" / "x.json", {"a": 1})
    monkeypatch.undo()
    assert not list((root / "reports" / "tiny").glob("*"))


def test_cli_turns_disk_full_into_exit_2(root, monkeypatch, capsys):
    import qlora_kit.preprocess as pre

    def full(recipe, overrides=None):
        with artifacts.atomic_dir(root / "data" / "tiny" / "processed"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pre, "run", full)
    (root / "data" / "tiny" / "raw").mkdir(parents=True, exist_ok=True)  # the CLI checks a stage's inputs first
    err = one_line_exit(capsys, "preprocess", "--recipe", "tiny")
    assert "disk full while writing" in err


def test_a_big_file_is_checked_by_the_kind_of_id_its_manifest_recorded(tmp_path):
    # hash_tree names files over HASH_LIMIT by size; quantize records a full sha256 whatever the size
    import hashlib

    f = tmp_path / "model-q8_0.gguf"
    f.write_bytes(b"q" * 1000)
    artifacts.verify_recorded(tmp_path, {f.name: hashlib.sha256(b"q" * 1000).hexdigest()}, "quantize", "tiny")
    artifacts.verify_recorded(tmp_path, {f.name: "size:1000"}, "train", "tiny")
    with pytest.raises(IntegrityError, match="is damaged: size:1000 differs from size:999"):
        artifacts.verify_recorded(tmp_path, {f.name: "size:999"}, "train", "tiny")
    with pytest.raises(IntegrityError, match=r"model-f16.gguf is missing .*rerun `qlora-kit quantize --recipe tiny`"):
        artifacts.verify_recorded(tmp_path, {"model-f16.gguf": "0" * 64}, "quantize", "tiny")


def test_a_damaged_base_shard_is_one_line_naming_it(tmp_path, tiny_llama):
    import shutil

    from qlora_kit.weights.safetensors_io import tensor_shapes

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    shard = base / "model.safetensors"
    shard.write_bytes((10**12).to_bytes(8, "little") + shard.read_bytes()[8:])
    with pytest.raises(MergeError, match=rf"{shard}: not a readable safetensors file .*fetch the base again"):
        tensor_shapes(base)
