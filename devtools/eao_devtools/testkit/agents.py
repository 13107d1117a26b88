"""EnterpriseAgent manifests for tests and benchmarks, made from the repository's minimal example."""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

from eao_devtools.checkout import repo_root

# On kwok any image "runs"; on a real cluster (make e2e-kind) set an image the nodes can pull.
TEST_IMAGE = os.environ.get("EAO_TEST_IMAGE")

# Rollouts in tests skip the waiting: no analysis window, no scale-down delay (unless a test sets them).
FAST_ROLLOUT = {"analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0}


def agent_manifest(namespace: str, name: str = "hello-agent", **spec: Any) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((repo_root() / "examples" / "minimal.yaml").read_text())
    document = copy.deepcopy(document)
    document["metadata"] = {"name": name, "namespace": namespace}
    if TEST_IMAGE:
        document["spec"]["image"] = TEST_IMAGE
    document["spec"]["rollout"] = copy.deepcopy(FAST_ROLLOUT)
    document["spec"].update(spec)
    return document
