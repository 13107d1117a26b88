"""The product ships without its development tools: the wheel (and so the images, which install it)
holds no eao_devtools, no local control plane or `make run` module and no Go sources from hack/.

The wheel is built from a copy of the checkout, the way the images build it (pip, the pinned
setuptools in an isolated build environment): an in-tree build would reuse a stale build/ folder,
which can still hold modules that have since moved out.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from pathlib import PurePosixPath

import pytest

from agent_operator.cli import build_parser
from tests.helpers import ROOT
from tests.packaging.sandbox import DOCKERFILE, dockerfile_stages

# Top-level wheel entries that belong to development only.
DEVELOPMENT_TOP_LEVEL = ("eao_devtools", "devtools", "hack", "tests", "bench")
# The local control plane and `make run` modules, which used to live in agent_operator.
DEVELOPMENT_MODULE_FILES = ("cluster.py", "dev.py")
# What a copy of the checkout leaves out: VCS data, the venv, caches and earlier build output.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", ".schemathesis"
)


def development_entries(names: Iterable[str]) -> list[str]:
    """The wheel entries that are development tooling rather than product."""
    found = []
    for name in names:
        path = PurePosixPath(name)
        top = path.parts[0]
        if (
            top in DEVELOPMENT_TOP_LEVEL
            or top.startswith("enterprise_agent_devtools")  # the devtools distribution's metadata
            or path.name in DEVELOPMENT_MODULE_FILES
        ):
            found.append(name)
    return found


@pytest.fixture(scope="module")
def product_wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    source = tmp_path_factory.mktemp("checkout") / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    wheels = tmp_path_factory.mktemp("wheels")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--wheel-dir", str(wheels), str(source)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = wheels.glob("enterprise_agent_operator-*.whl")
    return zipfile.ZipFile(wheel)


def test_the_product_wheel_holds_no_development_tools(product_wheel: zipfile.ZipFile) -> None:
    names = product_wheel.namelist()
    assert "agent_operator/cli.py" in names  # the listing is the product's, not an empty one
    assert development_entries(names) == []
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    scripts = product_wheel.read(entry_points).decode()
    assert "agent-operator" in scripts
    assert "eao-dev" not in scripts
    assert "eao_devtools" not in scripts


def test_the_check_finds_development_files() -> None:
    """The check above is a real one: it flags each kind of development file in a wheel listing."""
    listing = [
        "agent_operator/cli.py",
        "agent_operator/cluster.py",
        "agent_operator/dev.py",
        "eao_devtools/__init__.py",
        "enterprise_agent_devtools-0.1.0.dist-info/METADATA",
        "hack/tools/go.mod",
        "agent_runtime/app.py",
    ]
    assert development_entries(listing) == [
        "agent_operator/cluster.py",
        "agent_operator/dev.py",
        "eao_devtools/__init__.py",
        "enterprise_agent_devtools-0.1.0.dist-info/METADATA",
        "hack/tools/go.mod",
    ]


@pytest.mark.parametrize("module", ["agent_operator.cluster", "agent_operator.dev"])
def test_agent_operator_has_no_development_module(module: str) -> None:
    assert importlib.util.find_spec(module) is None, f"{module} is back in the product package"


@pytest.mark.parametrize("command", [["cluster", "status"], ["dev"]])
def test_the_product_cli_has_no_development_commands(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """They moved to eao-dev; agent-operator rejects them as it rejects any unknown command."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(command)
    assert exit_info.value.code == 2
    assert f"invalid choice: '{command[0]}'" in capsys.readouterr().err


def test_the_dockerfile_copies_no_development_sources() -> None:
    """The images install the product from what the Dockerfile copies in: never devtools/ or hack/."""
    copied = [
        source
        for stage in dockerfile_stages(DOCKERFILE.read_text()).values()
        for instruction, arguments in stage.instructions
        if instruction == "COPY" and not arguments.startswith("--from=")
        for source in [word for word in arguments.split() if not word.startswith("--")][:-1]
    ]
    assert copied, "no COPY found: the Dockerfile changed shape"
    for source in copied:
        top = (PurePosixPath(source).parts or (".",))[0]  # "." (the whole checkout) has no parts
        assert top not in (".", "devtools", "hack"), f"the images copy {source}"
