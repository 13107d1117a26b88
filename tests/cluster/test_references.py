"""Referenced Secrets on the local control plane: the operator notices a change to a Secret an agent
references by watching it (its resync is set far beyond the test), so rotating the model's API key
starts a blue-green rollout with no edit to the agent; a deleted one stalls the agent naming the
field, and the agent carries on by itself once the Secret is back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess
from tests.cluster.agents import apply, condition, get, wait_phase, wait_until
from tests.cluster.conftest import temporary_namespace

pytestmark = pytest.mark.cluster
MODEL = {
    "baseUrl": "https://llm.example/v1",
    "model": "test-model",
    "apiKeySecretRef": {"name": "model-credentials", "key": "api-key"},
}
# Manual promotion: the rollout a rotation starts waits for approval, where it can be looked at.
MANUAL = {"promotion": "Manual", "analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0}


@pytest.fixture(scope="module")
def watching_operator(crd_installed: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """An operator whose periodic resync never comes during a test: what it notices, it was told."""
    process = OperatorProcess(
        crd_installed.kubeconfig,
        tmp_path_factory.mktemp("references-operator") / "operator.log",
        namespaces=["rf-*"],
        lease_namespace="default",
        lease_name="eao-reference-tests",
        lease_seconds=6,
        resync_seconds=3600,
    ).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def ns(crd_installed: Kube) -> Iterator[str]:
    yield from temporary_namespace(crd_installed, "rf")


def model_secret(kube: Kube, namespace: str, **data: str) -> None:
    """Creates or replaces the model's key Secret, as `kubectl apply` of a rotated one does."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "model-credentials", "namespace": namespace},
        "stringData": data,
    }
    kube.kubectl("apply", "-f", "-", stdin=json.dumps(secret))


def status(kube: Kube, namespace: str) -> dict[str, Any]:
    return dict((get(kube, namespace, "ea", "hello-agent") or {}).get("status") or {})


def rollouts_started(kube: Kube, namespace: str) -> int:
    events = json.loads(kube.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    return sum(1 for e in events if e["reason"] == "RolloutStarted")


def test_rotating_the_model_key_rolls_out_and_a_deleted_key_secret_stalls_until_it_is_back(
    crd_installed: Kube, watching_operator: OperatorProcess, ns: str
) -> None:
    kube = crd_installed
    model_secret(kube, ns, **{"api-key": "sk-first"})
    apply(kube, agent_manifest(ns, model=MODEL, rollout=MANUAL))
    ready = wait_phase(kube, ns, "hello-agent", "Ready")
    first = ready["status"]["activeRevision"]
    blue = get(kube, ns, "deployment", "hello-agent-blue") or {}
    env = {v["name"]: v for v in blue["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MODEL_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "model-credentials", "key": "api-key"}}

    model_secret(kube, ns, **{"api-key": "sk-second"})
    paused = wait_phase(kube, ns, "hello-agent", "Paused")
    second = paused["status"]["previewRevision"]
    assert second != first
    assert paused["status"]["activeRevision"] == first
    assert paused["metadata"]["generation"] == ready["metadata"]["generation"]  # the agent was not edited
    green = get(kube, ns, "deployment", "hello-agent-green") or {}
    assert green["metadata"]["labels"]["agents.enterprise.io/revision"] == second

    # Waiting for approval, nothing else happens to the agent: only the watch can tell it that a
    # key its pods do not read changed (nothing to do), then the one they do (a newer revision).
    model_secret(kube, ns, **{"api-key": "sk-second", "note": "rotating again"})
    model_secret(kube, ns, **{"api-key": "sk-third", "note": "rotating again"})
    superseded = wait_until(
        lambda: (found := status(kube, ns)).get("previewRevision") not in (None, second) and found,
        timeout=30,
        what="a newer preview revision",
    )
    third = superseded["previewRevision"]
    assert superseded["activeRevision"] == first  # a newer preview; traffic stays where it was
    paused = wait_phase(kube, ns, "hello-agent", "Paused")
    assert (paused["status"]["activeRevision"], paused["status"]["previewRevision"]) == (first, third)
    assert rollouts_started(kube, ns) == 2
    # Neither key nor a hash of it alone is in anything the operator wrote.
    written = kube.kubectl("get", "ea,deployments,configmaps,controllerrevisions", "-n", ns, "-o", "json").stdout
    for key in ("sk-first", "sk-second", "sk-third"):
        assert key not in written

    # The Secret is deleted: Stalled, naming the field; nothing is torn down.
    kube.kubectl("delete", "secret", "model-credentials", "-n", ns)
    stalled = wait_phase(kube, ns, "hello-agent", "Stalled", timeout=30)
    assert condition(stalled, "Stalled")["reason"] == "MissingReference"
    assert condition(stalled, "Stalled")["message"] == (
        f"spec.model.apiKeySecretRef.name: Secret 'model-credentials' not found in namespace '{ns}'"
    )
    assert (stalled["status"]["activeRevision"], stalled["status"]["previewRevision"]) == (first, third)
    assert get(kube, ns, "deployment", "hello-agent-green") is not None

    # Back without the key: still Stalled, now on the key.
    model_secret(kube, ns, other="x")
    wait_until(
        lambda: (
            "spec.model.apiKeySecretRef.key: Secret 'model-credentials' has no (or an empty) key 'api-key'"
            in status(kube, ns).get("message", "")
        ),
        timeout=30,
        what="stalled on the missing key",
    )
    # Back as it was: the same rollout carries on, with no edit to the agent.
    kube.kubectl("delete", "secret", "model-credentials", "-n", ns)
    model_secret(kube, ns, **{"api-key": "sk-third", "note": "rotating again"})
    again = wait_phase(kube, ns, "hello-agent", "Paused", timeout=30)
    assert (again["status"]["activeRevision"], again["status"]["previewRevision"]) == (first, third)
    assert again["status"]["rollout"]["startedAt"] == paused["status"]["rollout"]["startedAt"]
    assert again["metadata"]["generation"] == ready["metadata"]["generation"]
    assert rollouts_started(kube, ns) == 2
