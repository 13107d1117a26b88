"""An operator given a namespace glob (`agent-operator run -n 'team-*'`): every matching namespace
is watched, including one made while the operator starts, and nothing outside the glob is reconciled."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess
from tests.cluster.agents import get, wait_phase

pytestmark = pytest.mark.cluster
# How long namespaces keep being made after the operator answers /healthz. kopf starts its watches
# after that; the namespaces made meanwhile land before, between and after its first lists.
STARTING_SECONDS = 6.0


def _namespace_with_agent(kube: Kube, namespace: str) -> None:
    objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}, agent_manifest(namespace)]
    kube.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))


def test_agents_in_namespaces_made_as_the_operator_starts_are_all_watched_and_others_left_alone(
    crd_installed: Kube, tmp_path: Path
) -> None:
    kube = crd_installed
    prefix = f"nw{uuid.uuid4().hex[:6]}"
    outside = f"{prefix}x"  # not matched by "<prefix>-*"
    made = [outside]
    # Its resync never comes during the test: an agent it does not watch stays without a status.
    operator = OperatorProcess(
        kube.kubeconfig,
        tmp_path / "operator.log",
        namespaces=[f"{prefix}-*"],
        lease_namespace="default",
        lease_name=f"eao-{prefix}",
        lease_seconds=6,
        resync_seconds=3600,
    )
    try:
        _namespace_with_agent(kube, outside)
        operator.start()
        watched: list[str] = []
        until = time.monotonic() + STARTING_SECONDS
        while time.monotonic() < until or len(watched) < 5:  # a slow kubectl still makes five
            watched.append(f"{prefix}-{len(watched)}")
            made.append(watched[-1])
            _namespace_with_agent(kube, watched[-1])

        # Ready needs the Deployment's status, which only its watch brings (no resync comes).
        not_ready = []
        for namespace in watched:
            try:
                wait_phase(kube, namespace, "hello-agent", "Ready", timeout=90)
            except AssertionError as error:
                not_ready.append(str(error))
        assert not not_ready, f"{len(not_ready)} of {len(watched)} agents never Ready: {not_ready[:3]}"

        assert (get(kube, outside, "ea", "hello-agent") or {}).get("status") is None
        assert get(kube, outside, "deployment", "hello-agent-blue") is None
    finally:
        operator.stop()
        for namespace in made:
            kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
