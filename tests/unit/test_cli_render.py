"""`agent-operator render` as a person types it, from the venv's console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import BAD, EXAMPLES, ROOT, header_values

AGENT_OPERATOR = str(Path(sys.executable).parent / "agent-operator")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT_OPERATOR, *args], capture_output=True, text=True, input=stdin, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_render_prints_every_child_as_yaml(example: Path) -> None:
    result = run("render", "-f", str(example))
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout)]
    assert {"Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "PodDisruptionBudget"} <= set(kinds)


def test_render_json_is_a_list_and_reads_stdin() -> None:
    result = run("render", "-f", "-", "-o", "json", stdin=(ROOT / "examples" / "minimal.yaml").read_text())
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["kind"] == "List"
    assert any(item["kind"] == "Deployment" for item in document["items"])


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_manifest_exits_2_with_the_field_and_no_traceback(path: Path) -> None:
    (expected,) = header_values(path, "expect")
    result = run("render", "-f", str(path))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_missing_file_is_a_clear_error() -> None:
    result = run("render", "-f", "no/such/file.yaml")
    assert result.returncode == 2
    assert "cannot read no/such/file.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_crd_command_prints_the_committed_crd() -> None:
    result = run("crd")
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout) == yaml.safe_load(
        (ROOT / "crds" / "enterpriseagents.agents.enterprise.io.yaml").read_text()
    )


def test_number_like_strings_stay_strings_for_go_yaml_readers() -> None:
    """kubectl, Argo CD and Flux read YAML 1.2, where 1e10234567 is a number; PyYAML does not
    quote it by itself. A revision hash of that shape must come out quoted."""
    from agent_operator.manifest import dump_yaml_all

    text = dump_yaml_all([{"revision": "1e10234567", "digits": "0123456789", "version": "0.1.0", "plain": "abc"}])
    assert 'revision: "1e10234567"' in text
    assert 'digits: "0123456789"' in text
    assert "plain: abc" in text
    assert yaml.safe_load(text) == {
        "revision": "1e10234567",
        "digits": "0123456789",
        "version": "0.1.0",
        "plain": "abc",
    }
