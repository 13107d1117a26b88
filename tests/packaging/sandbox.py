"""Our programs run the way the images run them, without a container engine.

bubblewrap gives the process uid/gid 10001 in a user namespace, the whole filesystem read-only,
and writable only what the pod spec makes writable: /tmp and the emptyDir volumes. ConfigMaps and
Secrets are bound read-only at their mount paths, the command is the Dockerfile's ENTRYPOINT and
the program comes from a venv built by the Dockerfile's build commands (the image's /opt/venv). The
network is shared, so it listens on loopback where the test reaches it. uid 10001 in the sandbox is
root's uid outside it: this shows a read-only root and a uid without a passwd entry, not host-level
unprivilege.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import ROOT

DOCKERFILE = ROOT / "images" / "Dockerfile"
IMAGE_UID = 10001
VENV_BIN = Path(sys.executable).parent
# The image's build stage, as commands (a test checks the Dockerfile runs these): a venv without pip,
# the project and its pinned dependencies installed into it from wheels only, no editable install.
IMAGE_VENV_COMMANDS = (
    "python -m venv --without-pip /opt/venv",
    "python -m pip --python /opt/venv/bin/python install --only-binary=:all: --no-binary=enterprise-agent-operator .",
)


def build_context(target: Path) -> Path:
    """What the build stage sees: only the paths its COPY instructions copy from the context, so a
    package the Dockerfile forgets to copy is missing here too."""
    for instruction, arguments in dockerfile_stages(DOCKERFILE.read_text())["build"].instructions:
        if instruction != "COPY" or arguments.startswith("--from"):
            continue
        *sources, destination = arguments.split()
        for source in sources:
            origin = ROOT / source
            placed = target / (destination if destination.endswith("/") and source.endswith("/") else source)
            placed.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(origin, placed, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, placed)
    return target


def build_image_venv(venv: Path) -> Path:
    """The image's /opt/venv built at ``venv`` by IMAGE_VENV_COMMANDS from the Dockerfile's build
    context (the base interpreter makes the venv, pip installs into it from outside); returns its
    bin folder."""
    context = build_context(venv.parent / "context")
    steps = (
        [str(Path(sys.base_prefix) / "bin" / "python3"), "-m", "venv", "--without-pip", str(venv)],
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
         "--only-binary=:all:", "--no-binary=enterprise-agent-operator", str(context)],
    )  # fmt: skip
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, f"{' '.join(step)}: {result.stdout}{result.stderr}"
    return venv / "bin"


@dataclass(frozen=True)
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(text: str) -> dict[str, Stage]:
    """The stages of a Dockerfile by name, each with its (INSTRUCTION, arguments) lines; continuation
    lines are joined. Enough for our own Dockerfile's structure, not a general parser."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        pending += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(pending.strip())
            pending = ""
    for line in lines:
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = arguments.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            current = Stage(name, words[0])
            stages[name] = current
        elif current is not None:
            current.instructions.append((instruction, arguments))
    return stages


def stage_chain(stages: Mapping[str, Stage], name: str) -> list[Stage]:
    """A stage and the stages it is built FROM, nearest first."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def entrypoint(target: str) -> list[str]:
    """The ENTRYPOINT the image of ``target`` runs (exec form)."""
    for stage in stage_chain(dockerfile_stages(DOCKERFILE.read_text()), target):
        for instruction, arguments in reversed(stage.instructions):
            if instruction == "ENTRYPOINT":
                command: list[str] = json.loads(arguments)
                return command
    raise AssertionError(f"no ENTRYPOINT for target {target}")


def bwrap() -> str:
    path = shutil.which("bwrap")
    assert path, "bubblewrap is not installed; `make test` installs it from Debian's packages"
    return path


def sandboxed(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    read_only: Mapping[str, Path] = {},
    writable: Mapping[str, Path] = {},
    workdir: str = "/tmp",
    venv_bin: Path = VENV_BIN,
) -> list[str]:
    """The bwrap command line running ``command`` as uid 10001 with only /tmp and ``writable``
    (sandbox path -> host directory, made writable for the sandbox user) writable."""
    targets = [*writable, *read_only, "/tmp", "/proc", "/dev"]
    args = [bwrap(), *_read_only_host(targets), "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev"]
    args += ["--unshare-user", "--uid", str(IMAGE_UID), "--gid", str(IMAGE_UID), "--unshare-pid", "--unshare-ipc",
             "--die-with-parent", "--clearenv", "--chdir", workdir]  # fmt: skip
    for target, source in writable.items():
        os.chmod(source, 0o777)  # noqa: S103 - the sandbox's uid maps to no owner on the host
        args += ["--bind", str(source), target]
    for target, source in read_only.items():
        args += ["--ro-bind", str(source), target]
    # A checkout under /tmp (CI clones into mktemp -d) holds the program itself: over whatever
    # now covers /tmp, put it back, read-only.
    for program in sorted({ROOT, venv_bin.parent.resolve()}):
        if program.is_relative_to("/tmp"):
            args += ["--ro-bind", str(program), str(program)]
    args += ["--remount-ro", "/"]
    environment = {"PATH": f"{venv_bin}:/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1",
                   "PYTHONUNBUFFERED": "1", **env}  # fmt: skip
    for name, value in environment.items():
        args += ["--setenv", name, value]
    return [*args, "--", *command]


def _read_only_host(targets: Sequence[str]) -> list[str]:
    """bwrap arguments showing the host's filesystem read-only, with room for ``targets``.

    Binding / whole would leave no way to create mount points the host lacks (/var/lib/agent), so
    the directories on the way to a target are recreated in the sandbox's own root and everything
    else in them is bound read-only from the host, symlinks kept as symlinks.
    """
    on_the_way = {"/"}
    for target in targets:
        on_the_way |= {str(parent) for parent in Path(target).parents}
    args: list[str] = []
    for directory in sorted(on_the_way, key=lambda d: d.count("/") if d != "/" else 0):
        if directory != "/":
            args += ["--dir", directory]
        if not Path(directory).is_dir():
            continue
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.path in on_the_way or entry.path in targets:
                continue
            if entry.is_symlink():
                args += ["--symlink", os.readlink(entry.path), entry.path]
            else:
                args += ["--ro-bind", entry.path, entry.path]
    return args


def pod_env(container: Mapping[str, Any], field_values: Mapping[str, str]) -> dict[str, str]:
    """The container's env; fieldRef values come from ``field_values`` (what the kubelet would fill)."""
    env = {}
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
        else:
            env[variable["name"]] = field_values[variable["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kwargs)
