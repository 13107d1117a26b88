"""The operator on a real API server: create, update, delete, drift, zero-write resync, bad input,
kill -9 and leader failover. Everything is observed through kubectl, /metrics and the audit log."""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess
from tests.cluster.agents import (
    apply,
    children,
    condition,
    get,
    operator_writes,
    wait_phase,
    wait_until,
)
from tests.cluster.conftest import temporary_namespace
from tests.gitops import assert_gitops_reads
from tests.unit.test_cli_render import ACCEPTED_BY_KUBECTL, REFUSED_BY_KUBECTL, agent_yaml
from tests.unit.test_cli_render import run as render

pytestmark = pytest.mark.cluster

EXPECTED_KINDS = {
    "Deployment",
    "Service",
    "ConfigMap",
    "Secret",
    "ServiceAccount",
    "PodDisruptionBudget",
    "NetworkPolicy",
}


def test_create_reaches_ready_with_owned_children(
    crd_installed: Kube, operator: OperatorProcess, namespace: str
) -> None:
    apply(crd_installed, agent_manifest(namespace, autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 4}))
    agent = wait_phase(crd_installed, namespace, "hello-agent", "Ready")

    status = agent["status"]
    assert status["activeColor"] == "blue"
    assert status["readyReplicas"] == 1
    assert status["observedGeneration"] == agent["metadata"]["generation"]
    assert condition(agent, "Ready")["status"] == "True"
    assert condition(agent, "Stalled")["status"] == "False"
    assert condition(agent, "Reconciling")["status"] == "False"
    found = children(crd_installed, namespace, "hello-agent")
    assert set(found) == EXPECTED_KINDS | {"HorizontalPodAutoscaler"}
    assert len(found["Service"]) == 2
    for kind, objects in found.items():
        for obj in objects:
            (owner,) = obj["metadata"]["ownerReferences"]
            assert owner["uid"] == agent["metadata"]["uid"], kind
            assert owner["controller"] is True
    (secret,) = found["Secret"]
    active = json.loads(base64.b64decode(secret["data"]["active.json"]))
    assert f"jwt-{active['jwt']}" in secret["data"]
    assert f"dek-{active['dek']}" in secret["data"]
    columns = crd_installed.kubectl("get", "ea", "hello-agent", "-n", namespace).stdout
    assert "Ready" in columns
    assert "blue" in columns
    events = json.loads(
        crd_installed.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "involvedObject.kind=EnterpriseAgent", "-o", "json"
        ).stdout
    )
    # A new agent that becomes available posts no Event (its status says it; one write fewer).
    assert [e["reason"] for e in events["items"] if e["type"] == "Normal"] == []


def test_update_changes_revision_and_replicas(crd_installed: Kube, operator: OperatorProcess, namespace: str) -> None:
    apply(crd_installed, agent_manifest(namespace))
    first = wait_phase(crd_installed, namespace, "hello-agent", "Ready")
    apply(crd_installed, agent_manifest(namespace, image="registry.example/enterprise-agent-runtime:0.2.0", replicas=2))
    second = wait_phase(crd_installed, namespace, "hello-agent", "Ready")

    assert second["status"]["activeRevision"] != first["status"]["activeRevision"]
    assert second["status"]["readyReplicas"] == 2
    # A new revision is rolled out blue-green: green runs it, blue is kept at zero for undo.
    assert (first["status"]["activeColor"], second["status"]["activeColor"]) == ("blue", "green")
    green = get(crd_installed, namespace, "deployment", "hello-agent-green")
    blue = get(crd_installed, namespace, "deployment", "hello-agent-blue")
    assert green is not None
    assert blue is not None
    assert (
        green["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/enterprise-agent-runtime:0.2.0"
    )
    assert blue["spec"]["template"]["spec"]["containers"][0]["image"] == agent_manifest(namespace)["spec"]["image"]
    assert (green["spec"]["replicas"], blue["spec"]["replicas"]) == (2, 0)
    config_maps = children(crd_installed, namespace, "hello-agent")["ConfigMap"]
    assert [c["metadata"]["name"] for c in config_maps] == [f"hello-agent-config-{second['status']['activeRevision']}"]


def test_delete_removes_every_child(crd_installed: Kube, operator: OperatorProcess, namespace: str) -> None:
    apply(crd_installed, agent_manifest(namespace))
    wait_phase(crd_installed, namespace, "hello-agent", "Ready")
    crd_installed.kubectl("delete", "ea", "hello-agent", "-n", namespace)
    wait_until(
        lambda: not children(crd_installed, namespace, "hello-agent"), timeout=60, what="children garbage-collected"
    )


def test_drift_edited_child_is_repaired(crd_installed: Kube, operator: OperatorProcess, namespace: str) -> None:
    apply(crd_installed, agent_manifest(namespace))
    wait_phase(crd_installed, namespace, "hello-agent", "Ready")
    crd_installed.kubectl("scale", "deployment", "hello-agent-blue", "-n", namespace, "--replicas=4")
    crd_installed.kubectl(
        "patch",
        "service",
        "hello-agent",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"selector":{"agents.enterprise.io/color":"green"}}}',
    )

    def repaired() -> bool:
        deployment = get(crd_installed, namespace, "deployment", "hello-agent-blue") or {}
        service = get(crd_installed, namespace, "service", "hello-agent") or {}
        return bool(
            deployment.get("spec", {}).get("replicas") == 1
            and service.get("spec", {}).get("selector", {}).get("agents.enterprise.io/color") == "blue"
        )

    wait_until(repaired, timeout=20, what="drift repaired")


def test_drift_deleted_child_is_recreated(crd_installed: Kube, operator: OperatorProcess, namespace: str) -> None:
    apply(crd_installed, agent_manifest(namespace))
    wait_phase(crd_installed, namespace, "hello-agent", "Ready")
    secret_before = get(crd_installed, namespace, "secret", "hello-agent-keys")
    crd_installed.kubectl("delete", "service", "hello-agent-preview", "-n", namespace)
    crd_installed.kubectl("delete", "networkpolicy", "hello-agent", "-n", namespace)
    wait_until(
        lambda: get(crd_installed, namespace, "service", "hello-agent-preview"), timeout=20, what="Service recreated"
    )
    wait_until(
        lambda: get(crd_installed, namespace, "networkpolicy", "hello-agent"),
        timeout=20,
        what="NetworkPolicy recreated",
    )
    assert get(crd_installed, namespace, "secret", "hello-agent-keys") == secret_before  # keys untouched


def test_drift_zero_valued_hardening_removed_by_hand_is_restored(
    crd_installed: Kube, operator: OperatorProcess, namespace: str
) -> None:
    """`false` is a value we set: removing it by hand (the API's default is the weaker `true`)
    is drift like any other edit, and the operator puts it back."""
    apply(crd_installed, agent_manifest(namespace))
    wait_phase(crd_installed, namespace, "hello-agent", "Ready")
    pod_spec = "/spec/template/spec"
    removals = [
        {"op": "remove", "path": f"{pod_spec}/automountServiceAccountToken"},
        {"op": "remove", "path": f"{pod_spec}/containers/0/securityContext/allowPrivilegeEscalation"},
    ]
    audit = crd_installed.local.audit_log if crd_installed.local is not None else None
    before = operator_writes(audit, namespace) if audit is not None else []
    patched = crd_installed.kubectl(
        "patch", "deployment", "hello-agent-blue", "-n", namespace, "--type=json", "-p", json.dumps(removals)
    )
    assert "no change" not in patched.stdout  # the premise: both fields were there, and are gone

    def hardening(deployment: dict[str, Any]) -> tuple[Any, Any]:
        spec = deployment["spec"]["template"]["spec"]
        security = spec["containers"][0].get("securityContext", {})
        return spec.get("automountServiceAccountToken"), security.get("allowPrivilegeEscalation")

    def restored() -> bool:
        deployment = get(crd_installed, namespace, "deployment", "hello-agent-blue")
        return deployment is not None and hardening(deployment) == (False, False)

    wait_until(restored, timeout=20, what="automountServiceAccountToken and allowPrivilegeEscalation restored")
    if audit is not None:  # and it was the operator that put them back
        assert "patch deployments/hello-agent-blue" in operator_writes(audit, namespace)[len(before) :]


def test_resync_without_drift_writes_nothing(crd_installed: Kube, operator: OperatorProcess, namespace: str) -> None:
    if crd_installed.local is None:
        pytest.skip("counts writes in the local control plane's audit log")
    apply(crd_installed, agent_manifest(namespace, autoscaling={"enabled": True}))
    wait_phase(crd_installed, namespace, "hello-agent", "Ready")
    # Let the last writes of the creation settle: no write for one full resync.
    audit = crd_installed.local.audit_log
    resyncs = operator.metric("agent_operator_resyncs_total")
    wait_until(lambda: operator.metric("agent_operator_resyncs_total") >= resyncs + 1, timeout=30, what="a resync")
    before = operator_writes(audit, namespace)
    reconciles = operator.metric("agent_operator_reconcile_duration_seconds_count")
    resyncs = operator.metric("agent_operator_resyncs_total")

    wait_until(lambda: operator.metric("agent_operator_resyncs_total") >= resyncs + 3, timeout=30, what="three resyncs")
    wait_until(lambda: operator.metric("agent_operator_workqueue_depth") == 0, timeout=10, what="an empty queue")

    assert operator.metric("agent_operator_reconcile_duration_seconds_count") >= reconciles + 3
    assert operator_writes(audit, namespace) == before


def test_bad_input_is_stalled_and_names_the_field(
    crd_installed: Kube, operator: OperatorProcess, namespace: str
) -> None:
    """Input the CRD cannot reject: the agent is Stalled with the field named; others are served."""
    apply(crd_installed, agent_manifest(namespace, name="good"))
    apply(
        crd_installed,
        agent_manifest(
            namespace, name="limits", resources={"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}
        ),
    )
    apply(crd_installed, agent_manifest(namespace, name="unknown-op", operations=["analyze_data", "fly_to_the_moon"]))
    apply(
        crd_installed,
        agent_manifest(namespace, name="no-users", security={"usersSecretRef": {"name": "missing-users"}}),
    )

    expected = {
        "limits": ("InvalidSpec", "spec.resources: limits.memory (1Gi) must be at least requests.memory (2Gi)"),
        "unknown-op": ("UnknownOperation", "spec.operations[1]: unknown operation 'fly_to_the_moon'"),
        "no-users": ("MissingReference", "spec.security.usersSecretRef.name: Secret 'missing-users' not found"),
    }
    for name, (reason, message) in expected.items():
        agent = wait_phase(crd_installed, namespace, name, "Stalled")
        stalled = condition(agent, "Stalled")
        assert stalled["status"] == "True"
        assert stalled["reason"] == reason
        assert message in stalled["message"]
        assert not children(crd_installed, namespace, name).get("Deployment")
    wait_phase(crd_installed, namespace, "good", "Ready")

    # Fixing the reference un-stalls the agent without any edit to it.
    crd_installed.kubectl("create", "secret", "generic", "missing-users", "-n", namespace, "--from-literal=users=")
    wait_phase(crd_installed, namespace, "no-users", "Ready", timeout=60)


def test_replicated_agent_without_shared_state_warns_and_a_missing_database_secret_stalls(
    crd_installed: Kube, operator: OperatorProcess, namespace: str
) -> None:
    """Three replicas and no spec.state: Ready with the SharedStateMissing warning and a Warning
    Event (GitOps still reads Healthy/Current). A secretRef to a Secret that is not there (or lacks
    the key) stalls the agent naming the field; once it is there, the pods get DATABASE_URL from it
    and no object the operator writes holds the URI."""
    apply(crd_installed, agent_manifest(namespace, replicas=3))
    agent = wait_phase(crd_installed, namespace, "hello-agent", "Ready")
    warning = condition(agent, "SharedStateMissing")
    assert (warning["status"], warning["reason"]) == ("True", "PerReplicaState")
    assert warning["message"].startswith("spec.replicas is 3 and spec.state.postgres is not set")
    assert "login throttling are per replica" in warning["message"]
    assert condition(agent, "Ready")["status"] == "True"
    assert condition(agent, "Stalled")["status"] == "False"
    assert_gitops_reads(agent, "Healthy", "Current")
    events = json.loads(
        crd_installed.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "involvedObject.kind=EnterpriseAgent", "-o", "json"
        ).stdout
    )
    assert ("Warning", "PerReplicaState") in {(e["type"], e["reason"]) for e in events["items"]}

    state = {
        "postgres": {
            "secretRef": {"name": "hello-db-app"},
            "egress": {"podSelector": {"cnpg.io/cluster": "hello-db"}, "cidrs": ["10.30.0.0/24"]},
        }
    }
    apply(crd_installed, agent_manifest(namespace, replicas=3, state=state))
    stalled = wait_phase(crd_installed, namespace, "hello-agent", "Stalled")
    assert condition(stalled, "Stalled")["reason"] == "MissingReference"
    assert condition(stalled, "Stalled")["message"].startswith(
        f"spec.state.postgres.secretRef.name: Secret 'hello-db-app' not found in namespace '{namespace}'"
    )
    assert condition(stalled, "SharedStateMissing")["status"] == "False"  # configured; only its Secret is missing
    assert stalled["status"]["activeRevision"] == agent["status"]["activeRevision"]  # the running revision stays

    uri = "postgresql://app:kwok-Passw0rd-7@hello-db-rw:5432/app"
    crd_installed.kubectl("create", "secret", "generic", "hello-db-app", "-n", namespace, "--from-literal=password=x")

    def stalled_on_the_key() -> bool:
        found = get(crd_installed, namespace, "ea", "hello-agent") or {}
        return "spec.state.postgres.secretRef.key: Secret 'hello-db-app' has no" in json.dumps(found.get("status"))

    wait_until(stalled_on_the_key, timeout=60, what="Stalled on the missing key")
    crd_installed.kubectl(
        "patch", "secret", "hello-db-app", "-n", namespace, "--type=merge",
        "-p", json.dumps({"stringData": {"uri": uri}}),
    )  # fmt: skip
    ready = wait_until(
        lambda: (
            (a := get(crd_installed, namespace, "ea", "hello-agent"))
            and (a.get("status") or {}).get("phase") == "Ready"
            and a["status"].get("activeRevision") != agent["status"]["activeRevision"]
            and a
        ),
        timeout=90,
        what="Ready at the revision with shared state",
    )
    assert condition(ready, "SharedStateMissing")["status"] == "False"
    deployment = get(crd_installed, namespace, "deployment", f"hello-agent-{ready['status']['activeColor']}")
    assert deployment is not None
    env = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DATABASE_URL"] == {
        "name": "DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": "hello-db-app", "key": "uri"}},
    }
    found = children(crd_installed, namespace, "hello-agent")
    (config_map,) = found["ConfigMap"]
    assert "postgresql://" not in json.dumps(config_map["data"])
    assert "DATABASE_URL" not in json.dumps(config_map["data"])
    for kind, objects in found.items():
        assert "kwok-Passw0rd-7" not in json.dumps(objects), kind
    assert "kwok-Passw0rd-7" not in json.dumps(ready)  # status, annotations
    assert "kwok-Passw0rd-7" not in crd_installed.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    (policy,) = found["NetworkPolicy"]
    assert {
        "to": [
            {"ipBlock": {"cidr": "10.30.0.0/24"}},
            {"podSelector": {"matchLabels": {"cnpg.io/cluster": "hello-db"}}},
        ],
        "ports": [{"protocol": "TCP", "port": 5432}],
    } in policy["spec"]["egress"]


def test_bad_update_leaves_the_running_revision_alone(
    crd_installed: Kube, operator: OperatorProcess, namespace: str
) -> None:
    apply(crd_installed, agent_manifest(namespace))
    ready = wait_phase(crd_installed, namespace, "hello-agent", "Ready")
    deployment = get(crd_installed, namespace, "deployment", "hello-agent-blue")
    assert deployment is not None
    apply(crd_installed, agent_manifest(namespace, image="registry.example/new:2", operations=["teleport"]))
    wait_phase(crd_installed, namespace, "hello-agent", "Stalled")
    after = get(crd_installed, namespace, "deployment", "hello-agent-blue")
    assert after is not None
    assert after["metadata"]["resourceVersion"] == deployment["metadata"]["resourceVersion"]
    stalled = get(crd_installed, namespace, "ea", "hello-agent")
    assert stalled is not None
    assert stalled["status"]["activeRevision"] == ready["status"]["activeRevision"]


@pytest.fixture
def ha_namespace(kube: Kube) -> Iterator[str]:
    """A namespace outside the session operator's reach (it watches t-*)."""
    yield from temporary_namespace(kube, "ha")


def _ha_operator(kube: Kube, tmp_path: Path, namespace: str, lease: str, label: str) -> OperatorProcess:
    return OperatorProcess(
        kube.kubeconfig,
        tmp_path / f"{label}.log",
        namespaces=[namespace],
        lease_namespace=namespace,
        lease_name=lease,
        lease_seconds=6,
    )


def test_kill_9_and_restart_loses_and_duplicates_nothing(
    crd_installed: Kube, ha_namespace: str, tmp_path: Path
) -> None:
    first = _ha_operator(crd_installed, tmp_path, ha_namespace, "eao-kill", "first").start()
    try:
        for index in range(5):
            apply(crd_installed, agent_manifest(ha_namespace, name=f"agent-{index}"))
        wait_until(
            lambda: first.metric("agent_operator_api_writes_total") > 10, timeout=30, what="the operator to be mid-work"
        )
        first.kill(signal.SIGKILL)
    finally:
        first.stop()
    keys_before = {
        i: (get(crd_installed, ha_namespace, "secret", f"agent-{i}-keys") or {}).get("data") for i in range(5)
    }

    second = _ha_operator(crd_installed, tmp_path, ha_namespace, "eao-kill", "second").start()
    try:
        for index in range(5):
            wait_phase(crd_installed, ha_namespace, f"agent-{index}", "Ready", timeout=90)
            found = children(crd_installed, ha_namespace, f"agent-{index}")
            assert set(found) == EXPECTED_KINDS
            assert {kind: len(objects) for kind, objects in found.items()} == {
                "Deployment": 1, "Service": 2, "ConfigMap": 1, "Secret": 1, "ServiceAccount": 1, "PodDisruptionBudget": 1, "NetworkPolicy": 1
            }  # fmt: skip
            if keys_before[index] is not None:  # keys made before the kill are never replaced
                assert found["Secret"][0]["data"] == keys_before[index]
    finally:
        second.stop()


def test_leader_failover(crd_installed: Kube, ha_namespace: str, tmp_path: Path) -> None:
    one = _ha_operator(crd_installed, tmp_path, ha_namespace, "eao-ha", "one").start()
    two = _ha_operator(crd_installed, tmp_path, ha_namespace, "eao-ha", "two").start()
    try:
        wait_until(lambda: one.is_leader() != two.is_leader(), timeout=30, what="exactly one leader")
        leader, standby = (one, two) if one.is_leader() else (two, one)
        apply(crd_installed, agent_manifest(ha_namespace))
        wait_phase(crd_installed, ha_namespace, "hello-agent", "Ready")
        assert standby.metric("agent_operator_api_writes_total") == 0  # the standby never writes

        leader.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(standby.is_leader, timeout=20, what="the standby to take over")
        takeover = time.monotonic() - killed_at
        assert takeover < 6 + 3, f"takeover took {takeover:.1f}s with a 6s lease"

        apply(crd_installed, agent_manifest(ha_namespace, image="registry.example/enterprise-agent-runtime:0.3.0"))
        agent = wait_phase(crd_installed, ha_namespace, "hello-agent", "Ready")
        assert agent["status"]["image"] == "registry.example/enterprise-agent-runtime:0.3.0"
    finally:
        one.stop()
        two.stop()


def test_key_rotation_adds_keys_and_keeps_the_old(
    crd_installed: Kube, operator: OperatorProcess, namespace: str
) -> None:
    apply(crd_installed, agent_manifest(namespace))
    before_agent = wait_phase(crd_installed, namespace, "hello-agent", "Ready")
    before = get(crd_installed, namespace, "secret", "hello-agent-keys")
    assert before is not None
    old_active = json.loads(base64.b64decode(before["data"]["active.json"]))

    crd_installed.kubectl("annotate", "ea", "hello-agent", "-n", namespace, "agents.enterprise.io/rotate-keys=2026-q4")

    def rotated() -> dict[str, str] | None:
        secret = get(crd_installed, namespace, "secret", "hello-agent-keys") or {}
        return (
            secret.get("data")
            if (secret.get("metadata", {}).get("annotations") or {}).get("agents.enterprise.io/rotated-for")
            == "2026-q4"
            else None
        )

    data = wait_until(rotated, timeout=30, what="keys rotated")
    new_active = json.loads(base64.b64decode(data["active.json"]))
    assert new_active["jwt"] != old_active["jwt"]
    assert new_active["dek"] != old_active["dek"]
    for name, value in before["data"].items():  # every old key is still there, unchanged
        if name != "active.json":
            assert data[name] == value
    assert len([k for k in data if k.startswith("jwt-")]) == 2
    # New key versions are a new revision: the pods are rolled to pick up the new active keys.
    after_agent = wait_until(
        lambda: (
            (a := wait_phase(crd_installed, namespace, "hello-agent", "Ready"))["status"]["activeRevision"]
            != before_agent["status"]["activeRevision"]
            and a
        ),
        timeout=60,
        what="a new revision",
    )
    assert after_agent["status"]["activeRevision"] != before_agent["status"]["activeRevision"]
    events = json.loads(crd_installed.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)
    assert "KeysRotated" in {e["reason"] for e in events["items"]}
    # The same request again changes nothing.
    crd_installed.kubectl(
        "annotate", "ea", "hello-agent", "-n", namespace, "--overwrite", "agents.enterprise.io/rotate-keys=2026-q4"
    )
    assert (get(crd_installed, namespace, "secret", "hello-agent-keys") or {}).get("data") == data


def test_offline_render_refuses_exactly_what_the_api_server_refuses(crd_installed: Kube, namespace: str) -> None:
    """The hostile and odd values of tests/unit/test_cli_render.py, through `kubectl apply
    --dry-run=server` (the real decoder, schema and CEL rules) and through `agent-operator render`.
    Where the server refuses, it names the same field (kubectl refuses a NaN itself, unnamed)."""
    disagreements = []
    cases: list[tuple[str, str | None]] = [*REFUSED_BY_KUBECTL, *((spec, None) for spec, _ in ACCEPTED_BY_KUBECTL)]
    for spec, field in cases:
        text = agent_yaml(spec).replace("name: hostile\n", f"name: hostile\n  namespace: {namespace}\n")
        server = crd_installed.kubectl("apply", "--dry-run=server", "-f", "-", stdin=text, check=False)
        offline = render("render", "-f", "-", stdin=text)
        refused = field is not None
        if (server.returncode != 0) != refused or (offline.returncode != 0) != refused:
            disagreements.append(
                f"{spec}: kubectl {server.returncode} {server.stderr[:160]!r}, render {offline.returncode}"
            )
        elif field is not None and field not in server.stderr and "error converting YAML" not in server.stderr:
            disagreements.append(f"{spec}: the server's refusal does not name {field}: {server.stderr[:200]!r}")
    assert disagreements == []
