"""Hostile and malformed manifests: each is refused, and the refusal names the field.

Every file in tests/bad says which field its error must name (``# expect:``). The operator's own
validation (pydantic, used by the reconciler and ``agent-operator render``) must always refuse it.
The API server's schema and CEL rules must refuse it too, unless the file says ``# api: accepts``
(then only the operator can judge it, and it sets Stalled) or ``# api: skip`` (it never parses
into an object the API server could see).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent_operator.manifest import ManifestError, load_agents
from tests.helpers import BAD, header_values
from tests.kube_schema import api_errors


def test_there_are_bad_manifests() -> None:
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_operator_refuses_and_names_the_field(path: Path) -> None:
    (expected,) = header_values(path, "expect")
    with pytest.raises(ManifestError) as caught:
        load_agents(path.read_text(), path.name)
    assert caught.value.errors, "a refusal must say why"
    assert expected in str(caught.value), f"{path.name}: error does not name {expected!r}:\n{caught.value}"


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_api_server_schema_and_cel(path: Path) -> None:
    (expected,) = header_values(path, "expect")
    api = header_values(path, "api")
    if api == ["skip"]:
        pytest.skip("not an object the API server could decode")
    errors = api_errors(yaml.safe_load(path.read_text()))
    if api == ["accepts"]:
        assert errors == [], "the schema now rejects this: drop '# api: accepts' from the file"
    else:
        assert errors, f"{path.name} is accepted by the CRD schema and CEL rules"
        assert any(expected in error for error in errors), f"no error names {expected!r}: {errors}"
