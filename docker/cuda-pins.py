#!/usr/bin/env python3
"""Keep the image's extra pins inside the one lock, and read them back out per consumer.

`requirements.lock` is the single lock of the project. Its first part is the `pip freeze` of the
CPU install that `make setup` creates. Two delimited sections follow it, for the Docker image only:

    # --- cuda (image only) ---
        What the image installs on top of the CPU part: torch from PyPI is the CUDA 13.0 build on
        Linux x86_64 and needs the nvidia-* / cuda-* / triton wheels listed here. The CPU install
        here resolves torch to a local `+cpu` wheel that needs none of them, so they cannot come
        from the freeze.
    # --- build (image builder stage only) ---
        The complete, pinned environment of the builder stage (cmake, ninja, scikit-build-core,
        setuptools, ...), which compiles llama-cpp-python with CUDA. Never in the final image.
        A name may repeat a CPU pin here only at the same version.

Commands (stdlib only, so the Dockerfile's builder can run it with the distribution's Python):

    python docker/cuda-pins.py generate [--lock requirements.lock] [--out FILE]
        Resolve, from PyPI metadata only (PEP 658; no multi-GB download), what the image's
        platform adds to the CPU part, and the builder's tool chain. Rewrites the two sections of
        the lock in place, or writes them to FILE (e.g. docker/cuda.lock.part) with --out.
    python docker/cuda-pins.py select --stage {cpu,image,sdist,builder} LOCK
        Print the `name==version` lines one consumer installs:
          cpu     the CPU part (what `make setup` installs)
          image   CPU part + cuda section, with a `+cpu` local label removed (final stage)
          sdist   the image packages that PyPI ships only as sdists (built into wheels in the builder)
          builder the build section (builder stage's tool chain)
    python docker/cuda-pins.py verify --stage image LOCK
        Compare the running environment with `select`: any missing, extra or differently versioned
        distribution is an error (exit 1). The image build runs it, so a drifted image never ships.

Bad lock lines are reported as FILE:LINE with the reason, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CUDA_MARKER = "# --- cuda (image only) ---"
BUILD_MARKER = "# --- build (image builder stage only) ---"

# PyPI has no wheel for these at the pinned versions, so the builder stage builds them from their
# sdists (llama-cpp-python needs CUDA anyway; antlr4-python3-runtime 4.9.3, a dvc -> hydra
# dependency, is pure Python). The final stage then installs wheels only (--only-binary=:all:).
SDIST_ONLY = ("llama-cpp-python", "antlr4-python3-runtime",
              # lm-eval's pure-Python dependencies without wheels at their pins
              "rouge-score", "sqlitedict", "word2number")

# What the builder stage needs to build the sdists above (llama-cpp-python: scikit-build-core
# with a CMake and Ninja recent enough for CUDA 13; antlr4: setuptools), and pip itself, so the
# builder does not depend on the pip that Ubuntu's python3.11-venv happens to bundle.
BUILD_TOOLS = ("pip", "scikit-build-core", "cmake", "ninja", "setuptools")

# The final stage is python:3.11 on Debian bookworm (glibc 2.36); the builder is the CUDA devel
# image on Ubuntu 22.04 (glibc 2.35) with Ubuntu's python3.11. Wheels are resolved for exactly
# these. pip evaluates environment markers (python_version < "3.11", ...) with the interpreter
# that runs it, not with --python-version, so `generate` must run on CPython 3.11 as well.
IMAGE_PYTHON, IMAGE_GLIBC_MINOR = "3.11", 36
BUILDER_PYTHON, BUILDER_GLIBC_MINOR = "3.11", 35

# Local version labels of CPU-only builds that the image replaces with the PyPI (CUDA) build.
CPU_LOCAL_LABEL = re.compile(r"\+cpu$")

REQ_LINE = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==(?P<version>[^\s;,\[\]]+)$")


class LockError(Exception):
    """A lock line that is not a plain `name==version` pin, or an inconsistent section."""


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Lock:
    path: Path
    # section -> {canonical name: (name as written, version)}
    sections: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)

    def pins(self, section: str) -> dict[str, tuple[str, str]]:
        return self.sections.get(section, {})


def parse_lock(path: Path) -> Lock:
    """Parse the lock into its cpu / cuda / build sections; raise LockError naming file:line."""
    lock = Lock(path=path, sections={"cpu": {}})
    section = "cpu"
    seen_markers: list[str] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        where = f"{path}:{lineno}"
        if line in (CUDA_MARKER, BUILD_MARKER):
            name = "cuda" if line == CUDA_MARKER else "build"
            if name in seen_markers:
                raise LockError(f"{where}: section marker {line!r} appears twice")
            if name == "cuda" and "build" in seen_markers:
                raise LockError(f"{where}: the cuda section must come before the build section")
            seen_markers.append(name)
            section = name
            lock.sections[section] = {}
            continue
        if not line or line.startswith("#"):
            continue
        line = re.split(r"\s+#", line, maxsplit=1)[0].strip()
        match = REQ_LINE.match(line)
        if not match:
            raise LockError(
                f"{where}: {raw.strip()!r} is not a plain 'name==version' pin "
                "(the lock must hold exact pins only: no -e/URL/path lines, ranges, extras or "
                "markers; write it with `pip freeze --exclude-editable`)"
            )
        key = canonical(match["name"])
        if key in lock.sections[section]:
            raise LockError(f"{where}: {match['name']} is pinned twice in the {section} section")
        lock.sections[section][key] = (match["name"], match["version"])

    cpu = lock.pins("cpu")
    for key, (name, version) in lock.pins("cuda").items():
        if key in cpu:
            raise LockError(
                f"{path}: {name}=={version} is in the cuda section but {cpu[key][0]} is already "
                "pinned in the CPU part; the cuda section holds only what the image adds"
            )
    for key, (name, version) in lock.pins("build").items():
        if key in cpu and strip_cpu_label(cpu[key][1]) != version:
            raise LockError(
                f"{path}: build section pins {name}=={version} but the CPU part pins "
                f"{cpu[key][0]}=={cpu[key][1]}; one name, one version"
            )
    return lock


def strip_cpu_label(version: str) -> str:
    return CPU_LOCAL_LABEL.sub("", version)


def select(lock: Lock, stage: str) -> list[tuple[str, str]]:
    """The (name, version) pins one consumer installs; raise LockError if a section is missing."""
    for needed in {"image": ("cuda",), "sdist": ("cuda",), "builder": ("build",)}.get(stage, ()):
        if needed not in lock.sections:
            marker = CUDA_MARKER if needed == "cuda" else BUILD_MARKER
            raise LockError(
                f"{lock.path}: no {marker!r} section; generate it with "
                "`python docker/cuda-pins.py generate` (see docker/README.md)"
            )
    if stage == "cpu":
        return list(lock.pins("cpu").values())
    if stage == "image":
        cpu = [(name, strip_cpu_label(version)) for name, version in lock.pins("cpu").values()]
        return cpu + list(lock.pins("cuda").values())
    if stage == "sdist":
        image = {canonical(name): (name, version) for name, version in select(lock, "image")}
        missing = [name for name in SDIST_ONLY if canonical(name) not in image]
        if missing:
            raise LockError(f"{lock.path}: {', '.join(missing)} not pinned; the image builds them")
        return [image[canonical(name)] for name in SDIST_ONLY]
    if stage == "builder":
        return list(lock.pins("build").values())
    raise LockError(f"unknown stage {stage!r}")


# ----------------------------------------------------------------------------------------------
# generate


def manylinux_platforms(glibc_minor: int) -> list[str]:
    """Every manylinux tag a glibc 2.<minor> x86_64 system accepts (pip does not expand them)."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc_minor, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def pip_resolve(requirements: list[str], constraints: list[str], python: str, glibc_minor: int,
                index_url: str) -> dict[str, tuple[str, str]]:
    """Resolve for another platform from index metadata only; return {canonical: (name, version)}.

    `pip install --dry-run --report` with --platform/--python-version never installs, and with an
    index that serves PEP 658 metadata (PyPI does) it downloads no wheel. The local pip config is
    ignored on purpose: a find-links directory holding a CPU torch wheel would win otherwise.
    """
    with tempfile.TemporaryDirectory() as tmp:
        req_file, con_file = Path(tmp, "req.txt"), Path(tmp, "con.txt")
        report = Path(tmp, "report.json")
        req_file.write_text("\n".join(requirements) + "\n", encoding="utf-8")
        con_file.write_text("\n".join(constraints) + "\n", encoding="utf-8")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--report", str(report), "--target", str(Path(tmp, "target")),
               "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
               "--index-url", index_url, "-r", str(req_file), "-c", str(con_file)]
        for platform in manylinux_platforms(glibc_minor):
            cmd += ["--platform", platform]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"pip could not resolve {requirements} for Python {python} "
                             f"(glibc 2.{glibc_minor}); see the pip output above")
        data = json.loads(report.read_text(encoding="utf-8"))
    resolved = {}
    for item in data["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        resolved[canonical(name)] = (name, version)
    return resolved


def render_sections(cuda: dict[str, tuple[str, str]], build: dict[str, tuple[str, str]],
                    torch_pin: str) -> str:
    lines = [
        CUDA_MARKER,
        f"# What the image adds to the CPU part above: {torch_pin} from PyPI is the CUDA build on",
        f"# Linux x86_64 (resolved for cp{IMAGE_PYTHON.replace('.', '')}, glibc 2.{IMAGE_GLIBC_MINOR})."
        " The CPU install (make setup) skips this section.",
        "# Generated by `python docker/cuda-pins.py generate`; do not edit by hand.",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(cuda.values(), key=lambda p: canonical(p[0]))]
    lines += [
        BUILD_MARKER,
        "# The builder stage's complete tool chain (Python "
        f"{BUILDER_PYTHON}, glibc 2.{BUILDER_GLIBC_MINOR}) for {', '.join(SDIST_ONLY)};",
        "# never installed in the final image. Generated by `python docker/cuda-pins.py generate`.",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(build.values(), key=lambda p: canonical(p[0]))]
    return "\n".join(lines) + "\n"


def generate(lock_path: Path, out: Path | None, index_url: str) -> str:
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if running != IMAGE_PYTHON:
        raise LockError(f"run generate with Python {IMAGE_PYTHON} (this is {running}): pip evaluates "
                        "environment markers with the running interpreter")
    lock = parse_lock(lock_path)
    cpu = lock.pins("cpu")
    if "torch" not in cpu:
        raise LockError(f"{lock_path}: no torch pin in the CPU part")
    # The CPU install runs on the same platform as the image (Linux x86_64, CPython 3.11), so
    # every environment marker evaluates the same; what differs is only the build of the
    # packages that the CPU install takes as a local `+cpu` wheel (torch). Their PyPI builds'
    # dependency closure, with every other name held at its CPU pin, is what the image adds.
    sdist_only = {canonical(name) for name in SDIST_ONLY}
    variants = [f"{name}=={strip_cpu_label(version)}" for name, version in cpu.values()
                if CPU_LOCAL_LABEL.search(version)] or [f"torch=={cpu['torch'][1]}"]
    constraints = [f"{name}=={version}" for key, (name, version) in cpu.items()
                   if key not in sdist_only and not CPU_LOCAL_LABEL.search(version)]
    resolved = pip_resolve(variants, constraints, IMAGE_PYTHON, IMAGE_GLIBC_MINOR, index_url)
    cuda = {key: pin for key, pin in resolved.items() if key not in cpu}

    # Builder tool chain: CPU pins constrain the names they share (setuptools, packaging, ...).
    build = pip_resolve(list(BUILD_TOOLS), constraints, BUILDER_PYTHON, BUILDER_GLIBC_MINOR, index_url)

    torch_pin = f"torch=={strip_cpu_label(cpu['torch'][1])}"
    sections = render_sections(cuda, build, torch_pin)
    if out is not None:
        out.write_text(sections, encoding="utf-8")
        return sections
    text = lock_path.read_text(encoding="utf-8")
    head = text.split(CUDA_MARKER, 1)[0].rstrip("\n") + "\n"
    lock_path.write_text(head + sections, encoding="utf-8")
    parse_lock(lock_path)  # what we wrote must read back
    return sections


# ----------------------------------------------------------------------------------------------
# verify


def verify(lock: Lock, stage: str) -> list[str]:
    """Differences between the running environment and the stage's pins (empty = identical)."""
    from importlib import metadata

    wanted = {canonical(name): (name, version) for name, version in select(lock, stage)}
    installed = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            installed[canonical(name)] = (name, dist.version)
    problems = []
    for key, (name, version) in sorted(wanted.items()):
        if key not in installed:
            problems.append(f"missing: {name}=={version}")
        elif installed[key][1] != version:
            problems.append(f"version: {name} is {installed[key][1]}, lock pins {version}")
    for key, (name, version) in sorted(installed.items()):
        # pip itself comes with the venv; it is checked only when the lock pins it.
        if key not in wanted and key != "pip":
            problems.append(f"not in the lock: {name}=={version}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="regenerate the cuda and build sections")
    gen.add_argument("--lock", type=Path, default=Path("requirements.lock"))
    gen.add_argument("--out", type=Path, help="write the sections here instead of into the lock")
    gen.add_argument("--index-url", default="https://pypi.org/simple")
    sel = sub.add_parser("select", help="print one consumer's pins")
    sel.add_argument("--stage", required=True, choices=("cpu", "image", "sdist", "builder"))
    sel.add_argument("lock", type=Path)
    ver = sub.add_parser("verify", help="compare this environment with the lock")
    ver.add_argument("--stage", required=True, choices=("image", "builder"))
    ver.add_argument("lock", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            sys.stdout.write(generate(args.lock, args.out, args.index_url))
        elif args.command == "select":
            for name, version in select(parse_lock(args.lock), args.stage):
                print(f"{name}=={version}")
        else:
            problems = verify(parse_lock(args.lock), args.stage)
            for problem in problems:
                print(f"{args.lock}: {problem}", file=sys.stderr)
            if problems:
                return 1
            print(f"environment matches {args.lock} ({args.stage})")
    except (LockError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
