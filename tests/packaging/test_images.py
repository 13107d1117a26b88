"""images/Dockerfile: linted by hadolint, shaped as the issue asks, and its programs run the way the
images run them (see sandbox.py): uid 10001, read-only root, only /tmp and the pod's emptyDirs
writable. The images themselves are built by buildah and run as real pods in tests/realnode."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent_contract.config import SigningAlgorithm
from agent_contract.keyfiles import new_key_files
from agent_operator.analysis import operator_token
from agent_operator.render import RenderPlan, build_children
from eao_devtools.imagebuild import CONTEXT_PATHS
from eao_devtools.testkit.operator_process import free_port
from tests.helpers import ROOT, example_agent
from tests.packaging.sandbox import (
    DOCKERFILE,
    IMAGE_UID,
    IMAGE_VENV_COMMANDS,
    build_context,
    dockerfile_stages,
    entrypoint,
    pod_env,
    run,
    sandboxed,
    stage_chain,
)

HADOLINT = str(Path(sys.executable).parent / "hadolint")
FINAL_TARGETS = ("operator", "runtime")


def test_the_dockerfile_passes_hadolint_with_no_finding_at_all() -> None:
    result = run([HADOLINT, "--failure-threshold", "style", "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_find_faults() -> None:
    """The lint above is a real check: the same call rejects a careless Dockerfile."""
    careless = "FROM python\nRUN apt-get install gcc\nRUN pip install flask\n"
    result = run([HADOLINT, "--failure-threshold", "style", "--no-color", "-"], input=careless)
    assert result.returncode == 1
    assert {"DL3006", "DL3008", "DL3013"} <= {line.split()[1] for line in result.stdout.splitlines()}


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_final_images_are_non_root_pinned_and_carry_no_build_tools(target: str) -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    chain = stage_chain(stages, target)
    instructions = [(i, a) for stage in chain for i, a in stage.instructions]
    users = [arguments for instruction, arguments in instructions if instruction == "USER"]
    assert users, f"{target} image sets no USER"
    assert users[0] == f"{IMAGE_UID}:{IMAGE_UID}"  # the nearest USER wins
    # Multi-stage: the venv is copied from the build stage; nothing is installed in the final image.
    assert ("COPY", "--from=build /opt/venv /opt/venv") in instructions
    runs = " ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    for tool in ("pip install", "apt-get install", "gcc", "build-essential"):
        assert tool not in runs, f"{target} image runs {tool!r}"
    # ...and the base image's own installer is removed.
    assert "/usr/local/lib/python3.11/site-packages/pip*" in runs
    assert "/usr/local/bin/pip*" in runs
    # The base is pinned to a patch release (a digest pin is documented for users' registries).
    text = DOCKERFILE.read_text()
    base = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG PYTHON_IMAGE="))
    assert base.startswith("python:3.11."), base
    assert base.endswith("-slim-bookworm"), base
    assert chain[-1].base == "${PYTHON_IMAGE}"


def test_the_build_stage_makes_the_venv_the_tests_run() -> None:
    """The programs below run from a venv built by these commands; the Dockerfile must run them too."""
    build = dockerfile_stages(DOCKERFILE.read_text())["build"]
    runs = " ".join(arguments for instruction, arguments in build.instructions if instruction == "RUN")
    for command in IMAGE_VENV_COMMANDS:
        assert command in runs, command


def test_the_sandbox_is_as_tight_as_the_pod(tmp_path: Path) -> None:
    """The harness' own claims: uid 10001, root read-only, /tmp and declared volumes writable."""
    data = tmp_path / "data"
    data.mkdir()
    script = (
        "id -u; id -g; touch /tmp/ok && echo tmp-writable; touch /var/lib/agent/ok && echo volume-writable; "
        f"touch {ROOT}/nope 2>/dev/null || echo repo-read-only; touch /etc/nope 2>/dev/null || echo etc-read-only"
    )
    result = run(sandboxed(["sh", "-c", script], env={}, writable={"/var/lib/agent": data}))
    assert result.stdout.split() == [
        "10001",
        "10001",
        "tmp-writable",
        "volume-writable",
        "repo-read-only",
        "etc-read-only",
    ]
    assert (data / "ok").exists()


def rendered_pod() -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """The example agent's first Deployment's pod spec, its container, and the ConfigMap's data."""
    children = build_children(
        example_agent("minimal"), RenderPlan.initial(example_agent("minimal"), operator_namespace="ops")
    )
    deployment = next(c for c in children if c["kind"] == "Deployment")
    config_map = next(c for c in children if c["kind"] == "ConfigMap")
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0], config_map["data"]


@contextmanager
def runtime_pod(tmp_path: Path, venv_bin: Path) -> Iterator[tuple[str, dict[str, Path], dict[str, bytes]]]:
    """The runtime started from the rendered pod spec inside the sandbox; yields its base URL, the
    host directories behind its emptyDir volumes and its key files."""
    pod, container, config_data = rendered_pod()
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    keys = new_key_files(SigningAlgorithm.EDDSA)
    read_only: dict[str, Path] = {}
    writable: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        host = tmp_path / mount["name"]
        if "emptyDir" in volume:
            host.mkdir()
            writable[mount["mountPath"]] = host
        elif "configMap" in volume:
            host.mkdir()
            (host / mount["subPath"]).write_text(config_data[mount["subPath"]])
            read_only[mount["mountPath"]] = host / mount["subPath"]
        elif "secret" in volume:
            host.mkdir()
            for name, content in keys.items():
                (host / name).write_bytes(content)
            read_only[mount["mountPath"]] = host
        assert mount.get("readOnly", False) == (mount["mountPath"] in read_only), mount
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsUser"] == IMAGE_UID
    port = free_port()
    env = pod_env(container, {"metadata.namespace": "default", "metadata.name": "hello-agent-blue-0"})
    # The pod listens on all interfaces; here only loopback.
    env |= {"AGENT_PORT": str(port), "AGENT_HOST": "127.0.0.1"}
    command = [*entrypoint("runtime"), *container.get("args", [])]
    log = tmp_path / "runtime.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            sandboxed(command, env=env, read_only=read_only, writable=writable, venv_bin=venv_bin),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while status_of(f"{base}/healthz") != 200:
            assert process.poll() is None, f"the runtime exited ({process.returncode}): {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the runtime did not start: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield base, writable, keys
    finally:
        process.kill()
        process.wait()


def status_of(url: str, token: str | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def test_the_runtime_serves_as_uid_10001_with_a_read_only_root(tmp_path: Path, image_venv: Path) -> None:
    with runtime_pod(tmp_path, image_venv) as (base, writable, keys):
        assert status_of(f"{base}/readyz") == 200
        assert status_of(f"{base}/metrics") == 200
        key_data = {name: base64.b64encode(content).decode() for name, content in keys.items()}
        token = operator_token(example_agent("minimal"), key_data)
        call = json.dumps({"input": {"data": [{"v": 1}, {"v": 3}]}}).encode()
        assert status_of(f"{base}/v1/operations/analyze_data", token, call) == 200
        assert status_of(f"{base}/v1/operations/analyze_data", None, call) == 401
    # It wrote its audit trail where the pod spec gives it room (the data volume), nowhere else.
    written = {path.relative_to(tmp_path).parts[0] for path in tmp_path.rglob("*") if path.is_file()}
    assert "data" in written, sorted(tmp_path.rglob("*"))
    assert set(writable) == {"/tmp", "/var/lib/agent"}


def test_the_build_context_holds_every_package_of_the_distribution(tmp_path: Path) -> None:
    """pip installs from what the Dockerfile copies: a package it forgets fails the image build."""
    context = build_context(tmp_path / "context")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in setuptools["package-dir"].items():
        assert (context / folder / "__init__.py").is_file(), f"the Dockerfile does not copy {folder} ({package})"


def test_the_image_builds_cache_key_covers_everything_the_dockerfile_copies() -> None:
    """eao-dev rebuilds the images when a file they copy changes: its key must read every COPY source."""
    copied = {
        source.rstrip("/")
        for stage in dockerfile_stages(DOCKERFILE.read_text()).values()
        for instruction, arguments in stage.instructions
        if instruction == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    }
    assert copied
    assert copied | {"images/Dockerfile"} == set(CONTEXT_PATHS)
