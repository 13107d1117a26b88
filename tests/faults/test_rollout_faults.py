"""Blue-green rollouts under faults, on the fault suite's own control plane: the API server or etcd
restarted mid-rollout, the operator killed with SIGKILL at every step, the agent scaled at steps
that wait. Each test ends with the agent converged, nothing lost, and the status saying so.

As in tests/cluster/test_rollout.py, the analysis's HTTP checks go to a real `agent-runtime` on
loopback that stands in for the preview pods (kwok pods have no network)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import free_port
from tests.cluster.agents import apply, condition, get, wait_phase, wait_until
from tests.cluster.test_rollout import (
    V2,
    Stand,
    active_selector_colour,
    event_reasons,
    preview_pods,
    replicas,
    rollout_of,
    start_v1,
    wait_step,
)
from tests.faults.conftest import create_quota, start_operator

pytestmark = pytest.mark.cluster

AGENT = "hello-agent"
MANUAL = {"promotion": "Manual", "analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0}
ABORT = "agents.enterprise.io/abort"
FAILURES = {"Aborted", "AnalysisFailed", "ProgressDeadlineExceeded", "RolledBack", "RolloutCancelled"}


@pytest.fixture
def stand(fault_cluster: Kube, fault_namespace: str, tmp_path: Path) -> Iterator[Stand]:
    port = free_port()
    operator = start_operator(
        fault_cluster, tmp_path, fault_namespace, extra_args=(f"--analysis-base-url=http://127.0.0.1:{port}",)
    )
    try:
        yield Stand(operator, port)
    finally:
        operator.stop()


def _uid(kube: Kube, namespace: str, kind: str, name: str) -> str:
    found = get(kube, namespace, kind, name)
    assert found is not None, f"{kind} {name} missing"
    return str(found["metadata"]["uid"])


def _deployment_uids(kube: Kube, namespace: str) -> dict[str, str]:
    listing = json.loads(kube.kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout)["items"]
    return {d["metadata"]["name"]: d["metadata"]["uid"] for d in listing}


def _deletions(audit_log: Path, namespace: str, resource: str) -> list[str]:
    """Deletions of ``resource`` in ``namespace`` by anyone, from the API server's audit log."""
    found = []
    for line in audit_log.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        if (ref.get("namespace"), ref.get("resource")) != (namespace, resource):
            continue
        if event.get("stage") == "ResponseComplete" and event["verb"] in ("delete", "deletecollection"):
            found.append(f"{event['stageTimestamp']} {event['user'].get('username')} {ref.get('name')}")
    return found


def _assert_promoted_once(
    kube: Kube, namespace: str, done: dict[str, Any], revision: str, started_at: str, uids: dict[str, str]
) -> None:
    """The one rollout that started finished: the new revision serves from green, nothing duplicated,
    neither colour's Deployment deleted or made again, the status consistent with the cluster."""
    assert kube.local is not None
    status = done["status"]
    assert (status["activeColor"], status["activeRevision"], status["image"]) == ("green", revision, V2)
    assert (status["rollout"]["step"], status["rollout"]["startedAt"]) == ("Completed", started_at)
    assert status.get("previewRevision") is None
    assert condition(done, "Ready")["status"] == "True"
    assert condition(done, "Stalled")["status"] == "False"
    assert active_selector_colour(kube, namespace) == "green"
    assert active_selector_colour(kube, namespace, f"{AGENT}-preview") == "green"
    assert _deployment_uids(kube, namespace) == uids  # the same two Deployments throughout
    assert _deletions(kube.local.audit_log, namespace, "deployments") == []
    wait_until(
        lambda: (replicas(kube, namespace, "green"), replicas(kube, namespace, "blue")) == (2, 0), what="blue down"
    )
    reasons = event_reasons(kube, namespace)
    assert (reasons.count("RolloutStarted"), reasons.count("RolloutCompleted")) == (1, 1), reasons
    assert not FAILURES & set(reasons), reasons


def _restart_while_awaiting_approval(kube: Kube, namespace: str, stand: Stand, tmp_path: Path, component: str) -> None:
    assert kube.local is not None
    start_v1(kube, namespace, rollout=MANUAL)
    with preview_pods(kube, stand, namespace, tmp_path):
        apply(kube, agent_manifest(namespace, image=V2, replicas=2, rollout=MANUAL))
        paused = wait_phase(kube, namespace, AGENT, "Paused")
        revision, started_at = paused["status"]["previewRevision"], paused["status"]["rollout"]["startedAt"]
        uids = _deployment_uids(kube, namespace)
        assert set(uids) == {f"{AGENT}-blue", f"{AGENT}-green"}
        api_server = kube.local.pids()["kube-apiserver"]
        kube.local.restart(component)
        if component == "etcd":
            # The API server lived through its storage going away and reconnected to it.
            assert kube.local.pids()["kube-apiserver"] == api_server
            assert kube.local.running()["kube-apiserver"]
        wait_until(kube.local.healthy, timeout=60, what="the API server ready again")
        # The operator reconnects and carries on with the same rollout: still waiting for approval.
        resyncs = stand.operator.metric("agent_operator_resyncs_total")
        wait_until(lambda: stand.operator.metric("agent_operator_resyncs_total") >= resyncs + 2, what="two resyncs")
        still = wait_phase(kube, namespace, AGENT, "Paused")
        assert (still["status"]["rollout"]["startedAt"], still["status"]["previewRevision"]) == (started_at, revision)
        assert active_selector_colour(kube, namespace) == "blue"
        apply(kube, agent_manifest(namespace, image=V2, replicas=2, rollout={**MANUAL, "promote": revision}))
        done = wait_phase(kube, namespace, AGENT, "Ready", timeout=90)
    _assert_promoted_once(kube, namespace, done, revision, started_at, uids)
    assert stand.operator.metric("agent_operator_rollouts_total", result="promoted") == 1


def test_kube_apiserver_restart_while_a_rollout_awaits_approval(
    fault_cluster: Kube, fault_namespace: str, stand: Stand, tmp_path: Path
) -> None:
    _restart_while_awaiting_approval(fault_cluster, fault_namespace, stand, tmp_path, "kube-apiserver")


def test_etcd_restart_while_a_rollout_awaits_approval(
    fault_cluster: Kube, fault_namespace: str, stand: Stand, tmp_path: Path
) -> None:
    _restart_while_awaiting_approval(fault_cluster, fault_namespace, stand, tmp_path, "etcd")


@dataclass(frozen=True)
class KillAt:
    """Where to kill the operator, and what holds the rollout at that step until it is killed."""

    step: str
    rollout: dict[str, Any]
    pod_quota: int | None = None  # a ResourceQuota on pods holds the step; lifted after the kill
    abort: bool = False  # abort the rollout (it waits for approval) to reach Aborted
    kept: tuple[str, ...] = field(default=())  # status.rollout timestamps set before the kill, kept after


KILL_AT = [
    # Preview: the preview colour's pods cannot be made (2 pods allowed, the stable colour has them).
    KillAt("Preview", {"analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0}, pod_quota=2),
    KillAt("Analysis", {"analysis": {"windowSeconds": 10}, "scaleDownDelaySeconds": 0}, kept=("previewReadyAt",)),
    KillAt("AwaitingPromotion", MANUAL, kept=("previewReadyAt",)),
    # Promoting: a preview of one pod, which cannot grow to two before the switch.
    KillAt(
        "Promoting",
        {"analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0, "previewReplicas": 1},
        pod_quota=3,
        kept=("previewReadyAt",),
    ),
    KillAt(
        "PostPromotion",
        {"analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 10},
        kept=("previewReadyAt", "promotedAt"),
    ),
    KillAt("Completed", {"analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0}),
    KillAt("Aborted", MANUAL, abort=True),
]


@pytest.mark.parametrize("at", KILL_AT, ids=[k.step for k in KILL_AT])
def test_operator_sigkill_at_every_rollout_step_resumes_from_status(
    fault_cluster: Kube, fault_namespace: str, stand: Stand, tmp_path: Path, at: KillAt
) -> None:
    kube, ns = fault_cluster, fault_namespace
    start_v1(kube, ns, rollout=at.rollout)
    if at.pod_quota is not None:
        create_quota(kube, ns, "hold", f"pods={at.pod_quota}")
    with preview_pods(kube, stand, ns, tmp_path):
        apply(kube, agent_manifest(ns, image=V2, replicas=2, rollout=at.rollout))
        if at.abort:
            paused = wait_step(kube, ns, "AwaitingPromotion")
            kube.kubectl("annotate", "ea", AGENT, "-n", ns, f"{ABORT}={paused['previewRevision']}")
        before = wait_step(kube, ns, at.step)
        uids = _deployment_uids(kube, ns)
        stand.operator.kill()  # SIGKILL: no clean shutdown, no Lease released
        revision = before.get("previewRevision") or before["activeRevision"]
        if at.pod_quota is not None:
            kube.kubectl("delete", "quota", "hold", "-n", ns)
        stand.operator.start()
        if at.step in ("Completed", "Aborted"):
            resyncs = 2  # it looked at the agent twice and left it as it was
            wait_until(lambda: stand.operator.metric("agent_operator_resyncs_total") >= resyncs, what="two resyncs")
            wait_until(lambda: stand.operator.metric("agent_operator_workqueue_depth") == 0, what="an empty queue")
            after = rollout_of(kube, ns)
            assert after["rollout"] == before["rollout"]
            assert _deployment_uids(kube, ns) == uids
            assert event_reasons(kube, ns).count("RolloutStarted") == 1
            assert stand.operator.metric("agent_operator_rollouts_total") == 0  # nothing ended again
            if at.step == "Aborted":
                degraded = wait_phase(kube, ns, AGENT, "Degraded")
                assert condition(degraded, "Degraded")["reason"] == "Aborted"
                assert (degraded["status"]["activeColor"], active_selector_colour(kube, ns)) == ("blue", "blue")
                assert degraded["status"]["previewRevision"] == revision
                wait_until(lambda: replicas(kube, ns, "green") == 0, what="the preview scaled down")
                assert replicas(kube, ns, "blue") == 2
                assert event_reasons(kube, ns).count("Aborted") == 1  # the abort acted once
            else:
                assert wait_phase(kube, ns, AGENT, "Ready")["status"]["activeColor"] == "green"
            return
        if at.step == "AwaitingPromotion":
            still = wait_phase(kube, ns, AGENT, "Paused")
            assert still["status"]["rollout"]["startedAt"] == before["rollout"]["startedAt"]
            apply(kube, agent_manifest(ns, image=V2, replicas=2, rollout={**at.rollout, "promote": revision}))
        done = wait_phase(kube, ns, AGENT, "Ready", timeout=90)
    _assert_promoted_once(kube, ns, done, revision, before["rollout"]["startedAt"], uids)
    for stamp in at.kept:  # the steps passed before the kill were not taken again
        assert done["status"]["rollout"][stamp] == before["rollout"][stamp], stamp
    assert stand.operator.metric("agent_operator_rollouts_total", result="promoted") == 1  # finished by the new one


@pytest.mark.parametrize(
    ("step", "rollout"),
    [
        ("Analysis", {"analysis": {"windowSeconds": 15}, "scaleDownDelaySeconds": 0}),
        ("PostPromotion", {"analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 15}),
    ],
)
def test_scaling_the_agent_mid_rollout_does_not_abort_it(
    fault_cluster: Kube, fault_namespace: str, stand: Stand, tmp_path: Path, step: str, rollout: dict[str, Any]
) -> None:
    """What the HPA does, at the steps that wait on a timer: write the agent's scale subresource.
    Both colours follow the new count while the step waits, and the same rollout completes."""
    kube, ns = fault_cluster, fault_namespace
    start_v1(kube, ns, rollout=rollout)
    uid = _uid(kube, ns, "deployment", f"{AGENT}-blue")
    with preview_pods(kube, stand, ns, tmp_path):
        apply(kube, agent_manifest(ns, image=V2, replicas=2, rollout=rollout))
        before = wait_step(kube, ns, step)
        kube.kubectl("scale", "ea", AGENT, "--replicas=3", "-n", ns)
        wait_until(
            lambda: (replicas(kube, ns, "green"), replicas(kube, ns, "blue")) == (3, 3),
            timeout=15,
            what="both colours scaled to 3 within the step's wait",
        )
        assert (rollout_of(kube, ns).get("rollout") or {}).get("step") == step  # still waiting there
        done = wait_phase(kube, ns, AGENT, "Ready", timeout=90)
    status = done["status"]
    assert (status["activeColor"], status["replicas"], status["readyReplicas"]) == ("green", 3, 3)
    assert status["rollout"]["startedAt"] == before["rollout"]["startedAt"]
    if step == "PostPromotion":
        assert status["rollout"]["promotedAt"] == before["rollout"]["promotedAt"]  # promoted once
    assert active_selector_colour(kube, ns) == "green"
    wait_until(lambda: (replicas(kube, ns, "green"), replicas(kube, ns, "blue")) == (3, 0), what="blue scaled down")
    assert _uid(kube, ns, "deployment", f"{AGENT}-blue") == uid
    reasons = event_reasons(kube, ns)
    assert not FAILURES & set(reasons), reasons
    assert (reasons.count("RolloutStarted"), reasons.count("RolloutCompleted")) == (1, 1), reasons
