"""The generated CRD: fresh, structural, described, and accepting every example."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_operator.crd import build_crd
from tests.helpers import CRD_FILE, EXAMPLES
from tests.kube_schema import api_errors, crd_schema


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        nodes += _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        nodes += _walk(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        nodes += _walk(schema["items"], f"{path}[]")
    return nodes


def test_committed_crd_matches_the_models() -> None:
    committed = yaml.safe_load(CRD_FILE.read_text())
    assert committed == build_crd(), "crds/ is stale: run `make crds` and commit the result"


def test_every_spec_and_status_field_has_a_description() -> None:
    missing = [
        path
        for path, node in _walk(crd_schema())
        if path.startswith((".spec", ".status")) and not path.endswith(("*", "[]")) and not node.get("description")
    ]
    assert missing == []


def test_schema_is_structural() -> None:
    """Every node has a type (or is int-or-string / preserve-unknown) and uses no JSON-Schema-only keyword."""
    forbidden = {"$ref", "anyOf", "oneOf", "allOf", "patternProperties", "propertyNames", "const", "title"}
    for path, node in _walk(crd_schema()):
        assert not forbidden & node.keys(), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if "properties" in node:
            assert "additionalProperties" not in node, path


def test_crd_names_printer_columns_and_subresources() -> None:
    crd = build_crd()
    assert crd["spec"]["names"]["shortNames"] == ["ea"]
    version = crd["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Active", "Ready", "Image", "Age"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]


def test_defaults_are_applied_like_pydantic() -> None:
    """The API server's defaults (from the schema) and the models' defaults agree."""
    from agent_operator.spec import EnterpriseAgentSpec
    from tests.kube_schema import apply_defaults

    spec_schema = crd_schema()["properties"]["spec"]
    defaulted = apply_defaults({"image": "registry.example/a:1"}, spec_schema)
    from_models = EnterpriseAgentSpec(image="registry.example/a:1").model_dump(
        by_alias=True, exclude_none=True, mode="json"
    )
    # Empty lists and maps are not defaulted by the API (they stay absent); compare the rest.
    assert defaulted == {k: v for k, v in from_models.items() if v not in ([], {})}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_accepted_by_the_crd(example: Path) -> None:
    assert api_errors(yaml.safe_load(example.read_text())) == []


def test_every_cel_field_path_resolves_in_the_schema() -> None:
    """The API server refuses a CRD whose fieldPath names a property the schema does not have."""
    for path, node in _walk(crd_schema()):
        for rule in node.get("x-kubernetes-validations", []):
            target = node
            for part in rule.get("fieldPath", "").split(".")[1:]:
                assert part in target.get("properties", {}), f"{path}: {rule['fieldPath']}"
                target = target["properties"][part]
