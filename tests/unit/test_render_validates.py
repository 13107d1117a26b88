"""Every rendered object is a valid Kubernetes object for the version the local control plane runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from agent_operator.manifest import load_agents
from agent_operator.render import RenderPlan, build_children
from tests.helpers import EXAMPLES, KUBERNETES_VERSION

# Kinds of other projects' CRDs, which kubernetes-validate has no schema for.
NOT_CORE_KINDS = {"ServiceMonitor"}


def validate_strict(manifest: dict[str, Any]) -> None:
    if manifest["kind"] not in NOT_CORE_KINDS:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_rendered_children_pass_strict_validation(example: Path) -> None:
    (agent,) = load_agents(example.read_text())
    children = build_children(agent, RenderPlan.initial(agent))
    assert children
    for child in children:
        validate_strict(child)


def test_strict_validation_catches_a_broken_object() -> None:
    """The check above can fail: an unknown field in a Deployment is refused."""
    (agent,) = load_agents(EXAMPLES[0].read_text())
    deployment = next(c for c in build_children(agent, RenderPlan.initial(agent)) if c["kind"] == "Deployment")
    deployment["spec"]["replicaz"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strict(deployment)
