"""`agent-operator render` as a person types it, from the venv's console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_operator.manifest import load_agents
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


def agent_yaml(spec: str) -> str:
    """An EnterpriseAgent manifest whose spec is the minimal example's plus the ``spec`` lines
    (YAML text, two-space indented under spec:, written as a person would type them)."""
    head = "apiVersion: agents.enterprise.io/v1alpha1\nkind: EnterpriseAgent\nmetadata:\n  name: hostile\n"
    lines = spec.strip().splitlines()
    base = [
        f"{key}: {value}"
        for key, value in (("image", "registry.example/agent:1.0.0"), ("operations", "[analyze_data]"))
    ]
    given = {line.split(":", 1)[0] for line in lines}
    return (
        head
        + "spec:\n"
        + "".join(f"  {line}\n" for line in [*(b for b in base if b.split(":")[0] not in given), *lines])
    )


# Values the API server refuses (checked against a real one in tests/cluster/test_operator.py),
# which pydantic's lax mode or PyYAML's YAML 1.1 resolution would let through. Each: the spec
# lines, and the field path the refusal must name.
REFUSED_BY_KUBECTL = [
    ('replicas: "3"', "spec.replicas"),  # a string for an integer
    ("replicas: 2.5", "spec.replicas"),  # a fraction for an integer
    ("replicas: true", "spec.replicas"),  # a boolean for an integer
    ("replicas: -1", "spec.replicas"),  # out of range
    ("image: 1", "spec.image"),  # an integer for a string
    ('autoscaling: {enabled: "yes"}', "spec.autoscaling.enabled"),  # a string for a boolean
    ('networkPolicy: {enabled: "true"}', "spec.networkPolicy.enabled"),
    ("autoscaling: {enabled: 1}", "spec.autoscaling.enabled"),  # an integer for a boolean
    ("autoscaling: {minReplicas: true}", "spec.autoscaling.minReplicas"),
    ("resources: {requests: {cpu: true}}", "spec.resources.requests.cpu"),  # int-or-string
    ("resources: {requests: {cpu: 1.5}}", "spec.resources.requests.cpu"),
    ('observability: {traceSampleRatio: "0.5"}', "spec.observability.traceSampleRatio"),  # a string for a number
    ("observability: {traceSampleRatio: .nan}", "spec.observability.traceSampleRatio"),  # JSON has no NaN
    ('networkPolicy: {egressPorts: ["443"]}', "spec.networkPolicy.egressPorts[0]"),
    ("replicaz: 1", "spec.replicaz"),  # an unknown field
    ("env: [{name: A, value: y}]", "spec.env[0].value"),  # go-yaml reads y as a boolean
    ("env: [{name: A, value: 1e3}]", "spec.env[0].value"),  # ... and 1e3 as a number
    ("env: [{name: A, value: 0o17}]", "spec.env[0].value"),
]

# Oddities the API server accepts, so offline render must too: each, and the spec it amounts to.
ACCEPTED_BY_KUBECTL = [
    ("replicas: 3.0", {"replicas": 3}),  # kubectl sends 3
    ("replicas: null", {"replicas": 1}),  # a null field is pruned, then defaulted
    ("env: [{name: A, value: 2026-01-01}]", {"env": [{"name": "A", "value": "2026-01-01"}]}),  # not a timestamp
    ("env: [{name: A, value: 1:20}]", {"env": [{"name": "A", "value": "1:20"}]}),  # not sexagesimal 80
]


@pytest.mark.parametrize(("spec", "field"), REFUSED_BY_KUBECTL, ids=[spec for spec, _ in REFUSED_BY_KUBECTL])
def test_render_refuses_what_the_api_server_refuses_and_names_the_field(spec: str, field: str, tmp_path: Path) -> None:
    manifest = tmp_path / "agent.yaml"
    manifest.write_text(agent_yaml(spec))
    result = run("render", "-f", str(manifest))
    assert result.returncode == 2, result.stdout[:200]
    assert f"{field}:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(("spec", "expected"), ACCEPTED_BY_KUBECTL, ids=[spec for spec, _ in ACCEPTED_BY_KUBECTL])
def test_render_accepts_what_the_api_server_accepts(spec: str, expected: dict[str, Any]) -> None:
    (agent,) = load_agents(agent_yaml(spec))
    dumped = agent.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert {key: dumped[key] for key in expected} == expected
