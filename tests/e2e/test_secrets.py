"""Secrets never reach an output: a full tiny run with canary tokens in the environment (issue 8).

Run: python -m pytest -q tests/test_secrets.py -p no:cacheprovider

The kit reads a Hugging Face token (HF_TOKEN, through huggingface_hub) and a judge API key
(QLORA_KIT_JUDGE_API_KEY) from the environment only. Here both hold canary values while all six
stages run through the real `qlora-kit` CLI; afterwards every file under data/, models/ (adapter
model card, checkpoints with the Trainer's pickled arguments, GGUF metadata), reports/, dvc.lock
and each stage's captured stdout/stderr is searched byte for byte - as UTF-8, UTF-16 and base64,
so a secret inside a binary file or an encoded blob is found too.

DVC is covered by a cheap `dvc repro fetch@tiny` in a copy of the repo, with the canaries set:
dvc.lock and the stage's outputs must not hold them. The same fixture starts a second
`dvc repro fetch@tiny` while the first is running, which must fail with DVC's lock message and
leave the first run's outputs intact (`dvc status` clean).
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from support.repo import BIN, copy_repo, kit_env, kit_root
from qlora_kit.cli import STAGES

CANARIES = {
    "HF_TOKEN": "hf_CanaryH8dontWriteMe0123456789abcdefXYZ",
    "HUGGING_FACE_HUB_TOKEN": "hf_CanaryH8legacyName9876543210fedcbaQRS",  # older name, still read
    "QLORA_KIT_JUDGE_API_KEY": "sk-canary-judge-H8-0123456789abcdefghijklmnop",
}
# a few steps of everything; checkpoints on (save_steps 2 < max_steps 3) so training_args.bin is scanned
FAST_RUN = ["--set", "train.max_steps=3", "--set", "data.limit=120", "--set", "eval.num_prompts=4",
            "--set", "train.save_steps=2", "--set", "eval.max_new_tokens=8", "--set", "quantize.types=[q8_0]"]


def needles(secret: str) -> dict[str, bytes]:
    """Byte patterns that reveal `secret`: as written, UTF-16, and base64 at each of the 3 alignments."""
    raw = secret.encode()
    out = {"utf-8": raw, "utf-16-le": secret.encode("utf-16-le"), "utf-16-be": secret.encode("utf-16-be")}
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + raw)
        # keep only the characters no neighbouring byte can change: from the first whole 6-bit
        # group inside the secret; the last 4 characters may hold bits of what follows it
        start = -(-8 * shift // 6)
        out[f"base64+{shift}"] = enc[start:len(enc) - 4]
    return out


def find_secrets(paths: list[Path], secrets: dict[str, str]) -> list[str]:
    """'file: NAME as ENCODING' for every secret found in any file under `paths` (files or folders)."""
    pats = {(name, how): pat for name, value in secrets.items() for how, pat in needles(value).items()}
    hits = []
    for top in paths:
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file() and not p.is_symlink())
        for f in files:
            data = f.read_bytes()
            hits += [f"{f}: {name} as {how}" for (name, how), pat in pats.items() if pat in data]
    return hits


def scanned_files(paths: list[Path]) -> list[Path]:
    return [f for top in paths for f in ([top] if top.is_file() else top.rglob("*")) if f.is_file()]


# --- the scanner can fail -------------------------------------------------------------------------

def test_the_scanner_finds_a_planted_secret_in_every_encoding(tmp_path):
    secret = CANARIES["HF_TOKEN"]
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "ok.json").write_text(json.dumps({"token": secret[:8] + "..."}))  # a masked prefix is fine
    assert find_secrets([clean], CANARIES) == []
    planted = {
        "nested/manifest.json": json.dumps({"env": {"HF_TOKEN": secret}}).encode(),
        "weights.bin": os.urandom(999) + secret.encode() + os.urandom(999),
        "log-utf16.txt": f"token={secret}".encode("utf-16"),
        "blob0.txt": base64.b64encode(secret.encode()),
        "blob1.txt": base64.b64encode(b"x" + secret.encode() + b"y"),
        "blob2.txt": base64.b64encode(b"xy" + secret.encode() + b"z"),
    }
    for name, data in planted.items():
        d = tmp_path / "dirty" / name
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_bytes(data)
    hits = find_secrets([tmp_path / "dirty"], CANARIES)
    for name in planted:
        assert any(h.startswith(str(tmp_path / "dirty" / name) + ":") for h in hits), (name, hits)


# --- a full tiny run through the CLI ---------------------------------------------------------------

@pytest.mark.slow
def test_full_tiny_run_writes_no_secret_anywhere(tmp_path):
    root = kit_root(tmp_path / "kit")
    logs = tmp_path / "logs"
    logs.mkdir()
    # offline, so the canary token is never sent anywhere either; a private HF_HOME
    env = kit_env(root, **CANARIES, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf"))
    for stage in STAGES:
        out = subprocess.run([str(BIN / "qlora-kit"), stage, "--recipe", "tiny", *FAST_RUN], cwd=root, env=env,
                             capture_output=True, timeout=600)
        (logs / f"{stage}.stdout").write_bytes(out.stdout)
        (logs / f"{stage}.stderr").write_bytes(out.stderr)
        assert out.returncode == 0, f"{stage} failed:\n{out.stderr.decode(errors='replace')[-3000:]}"

    targets = [root / "data", root / "models", root / "reports", logs]
    targets += [root / "dvc.lock"] if (root / "dvc.lock").exists() else []
    files = {str(f.relative_to(tmp_path)) for f in scanned_files(targets)}
    # the scan covers what a leak would most likely land in (else it would pass vacuously)
    for must in ("kit/models/tiny/adapter/README.md", "kit/models/tiny/adapter/manifest.json",
                 "kit/models/tiny/merged/config.json", "kit/models/tiny/gguf/model-q8_0.gguf",
                 "kit/reports/tiny/report.md", "kit/reports/tiny/metrics.json",
                 "kit/data/tiny/processed/manifest.json", "logs/train.stderr"):
        assert must in files, must
    assert any(f.endswith("training_args.bin") for f in files), "no checkpoint was scanned"
    assert len([f for f in files if f.endswith("manifest.json")]) >= 6
    assert find_secrets(targets, CANARIES) == []


# --- DVC: dvc.lock holds no secret; a second concurrent repro is refused by DVC's lock --------------

@pytest.fixture(scope="module")
def dvc_pair(tmp_path_factory):
    root = copy_repo(tmp_path_factory.mktemp("dvc-repo"))
    env = kit_env(root, **CANARIES, HF_HUB_OFFLINE="1")
    cmd = [str(BIN / "dvc"), "repro", "fetch@tiny"]
    first = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # start the second only once the first is inside the stage (our partial folder exists)
    deadline = time.monotonic() + 120
    while not list(root.glob("models/tiny/base.partial-*")) and first.poll() is None:
        assert time.monotonic() < deadline, "dvc repro fetch@tiny never reached the stage"
        time.sleep(0.01)
    second = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    first_out = first.communicate(timeout=300)[0].decode(errors="replace")
    status = subprocess.run([str(BIN / "dvc"), "status", "fetch@tiny"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    return {"root": root, "first": (first.returncode, first_out), "second": second, "status": status}


@pytest.mark.slow
def test_a_second_concurrent_dvc_repro_fails_with_the_lock_message(dvc_pair):
    code, out = dvc_pair["first"]
    assert code == 0, out
    second = dvc_pair["second"]
    assert second.returncode != 0, second.stdout + second.stderr
    # DVC's per-output read/write lock (.dvc/tmp/rwlock), naming the process that holds it
    assert "is busy, it is being blocked by" in second.stderr and "dvc repro fetch@tiny" in second.stderr, \
        second.stderr
    root = dvc_pair["root"]
    assert "up to date" in dvc_pair["status"].stdout, dvc_pair["status"].stdout + dvc_pair["status"].stderr
    assert (root / "data/tiny/raw/manifest.json").is_file() and (root / "models/tiny/base/model.safetensors").is_file()
    assert not list(root.glob("data/tiny/*.partial-*")) and not list(root.glob("models/tiny/*.partial-*"))


@pytest.mark.slow
def test_dvc_lock_and_stage_outputs_hold_no_secret(dvc_pair):
    root = dvc_pair["root"]
    assert dvc_pair["first"][0] == 0, dvc_pair["first"][1]
    assert "fetch@tiny" in (root / "dvc.lock").read_text()
    targets = [root / "dvc.lock", root / "data", root / "models", root / ".dvc"]
    assert find_secrets(targets, CANARIES) == []
    assert CANARIES["HF_TOKEN"] not in dvc_pair["first"][1] + dvc_pair["second"].stdout + dvc_pair["second"].stderr
