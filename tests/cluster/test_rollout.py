"""Blue-green rollouts end to end on the local control plane.

kwok pods have no network, so the analysis's HTTP checks go to a real `agent-runtime` process on
loopback that stands in for the preview pods: it runs the config the operator renders for the
agent and the keys from the agent's own key Secret (so the operator's signed smoke call must
verify). The operator under test is started with --analysis-base-url pointing at it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from agent_operator.manifest import parse_agent
from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess, free_port
from eao_devtools.testkit.runtime import agent_runtime_layout, live_runtime
from tests.cluster.agents import apply, condition, get, wait_phase, wait_until
from tests.cluster.conftest import temporary_namespace
from tests.cluster.test_plugin import kubectl_ea
from tests.gitops import ActionRefusedError, argocd_action_patch, argocd_actions, assert_gitops_reads, record_agent

pytestmark = pytest.mark.cluster
V1, V2 = "registry.example/enterprise-agent-runtime:0.1.0", "registry.example/enterprise-agent-runtime:0.2.0"


class Stand:
    """The module's operator and the loopback port its analysis checks go to."""

    def __init__(self, operator: OperatorProcess, analysis_port: int) -> None:
        self.operator = operator
        self.analysis_port = analysis_port


@pytest.fixture(scope="module")
def stand(crd_installed: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    port = free_port()
    operator = OperatorProcess(
        crd_installed.kubeconfig,
        tmp_path_factory.mktemp("rollout-operator") / "operator.log",
        namespaces=["ro-*"],
        lease_namespace="default",
        lease_name="eao-rollout-tests",
        lease_seconds=6,
        extra_args=(f"--analysis-base-url=http://127.0.0.1:{port}",),
    ).start()
    try:
        yield Stand(operator, port)
    finally:
        operator.stop()


@pytest.fixture
def ns(crd_installed: Kube) -> Iterator[str]:
    yield from temporary_namespace(crd_installed, "ro")


@contextmanager
def preview_pods(kube: Kube, stand: Stand, namespace: str, tmp_path: Path, name: str = "hello-agent") -> Iterator[str]:
    """A real runtime for the agent (its rendered config, its key Secret) on the analysis port."""
    agent = parse_agent(get(kube, namespace, "ea", name))
    secret = get(kube, namespace, "secret", f"{name}-keys")
    assert secret is not None
    files = {key: base64.b64decode(value) for key, value in secret["data"].items()}
    with live_runtime(agent_runtime_layout(agent, tmp_path / "pod", files), port=stand.analysis_port) as (_, base):
        yield base


def rollout_of(kube: Kube, namespace: str, name: str = "hello-agent") -> dict[str, Any]:
    agent = get(kube, namespace, "ea", name) or {}
    return dict(agent.get("status") or {})


def wait_step(kube: Kube, namespace: str, step: str, timeout: float = 60) -> dict[str, Any]:
    def current() -> dict[str, Any] | None:
        status = rollout_of(kube, namespace)
        return status if (status.get("rollout") or {}).get("step") == step else None

    found: dict[str, Any] = wait_until(current, timeout, what=f"rollout step {step}")
    return found


def active_selector_colour(kube: Kube, namespace: str, service: str = "hello-agent") -> str:
    svc = get(kube, namespace, "service", service) or {}
    return str(svc["spec"]["selector"]["agents.enterprise.io/color"])


def replicas(kube: Kube, namespace: str, colour: str) -> int:
    deployment = get(kube, namespace, "deployment", f"hello-agent-{colour}") or {}
    return int(deployment.get("spec", {}).get("replicas", -1))


def event_reasons(kube: Kube, namespace: str) -> list[str]:
    events = json.loads(kube.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    return [e["reason"] for e in events if e["involvedObject"]["kind"] == "EnterpriseAgent"]


def start_v1(kube: Kube, namespace: str, **spec: Any) -> dict[str, Any]:
    apply(kube, agent_manifest(namespace, image=V1, replicas=2, **spec))
    return wait_phase(kube, namespace, "hello-agent", "Ready")


def results(status: dict[str, Any]) -> dict[str, str]:
    return {check["name"]: check["result"] for check in status["rollout"]["analysis"]}


def test_automatic_promotion_moves_traffic_only_after_analysis(
    crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path
) -> None:
    rollout = {"analysis": {"windowSeconds": 3}, "scaleDownDelaySeconds": 2}
    first = start_v1(crd_installed, ns, rollout=rollout)
    assert first["status"]["activeColor"] == "blue"
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, rollout=rollout))
        analysing = wait_step(crd_installed, ns, "Analysis")
        # The preview is up and in its Service's endpoints, and traffic has not moved.
        assert active_selector_colour(crd_installed, ns) == "blue"
        assert active_selector_colour(crd_installed, ns, "hello-agent-preview") == "green"
        endpoints = analysing["rollout"]["analysis"][0]
        assert (endpoints["name"], endpoints["result"]) == ("endpoints", "Passed")
        assert "2/2 in the preview Service's endpoints" in endpoints["message"]
        # The status read at the Analysis step, as Argo CD and Flux see it (the spec has not changed since).
        served = get(crd_installed, ns, "ea", "hello-agent") or {}
        assert_gitops_reads({**served, "status": analysing}, "Progressing", "InProgress")
        done = wait_phase(crd_installed, ns, "hello-agent", "Ready", timeout=60)
    assert_gitops_reads(done, "Healthy", "Current")
    status = done["status"]
    assert (status["activeColor"], status["rollout"]["step"]) == ("green", "Completed")
    assert status["image"] == V2
    assert results(status) == {"endpoints": "Passed", "readyz": "Passed", "errorRate": "Passed", "latency": "Passed"}
    readyz = next(c for c in status["rollout"]["analysis"] if c["name"] == "readyz")
    assert readyz["message"].startswith("200")  # a real answer from the runtime
    assert active_selector_colour(crd_installed, ns) == "green"
    assert (replicas(crd_installed, ns, "green"), replicas(crd_installed, ns, "blue")) == (2, 0)
    reasons = event_reasons(crd_installed, ns)
    assert {"RolloutStarted", "Promoted", "RolloutCompleted"} <= set(reasons)
    assert stand.operator.metric("agent_operator_rollouts_total", result="promoted") >= 1
    assert stand.operator.metric("agent_operator_promotion_duration_seconds_count") >= 1


def test_manual_promotion_through_the_spec(crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path) -> None:
    manual = {"promotion": "Manual", "analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0}
    start_v1(crd_installed, ns, rollout=manual)
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, rollout=manual))
        paused = wait_phase(crd_installed, ns, "hello-agent", "Paused")
        assert condition(paused, "Ready")["reason"] == "AwaitingPromotion"
        # Argo CD shows the approval wait as Suspended; for kstatus the rollout is still in progress.
        assert_gitops_reads(paused, "Suspended", "InProgress")
        assert active_selector_colour(crd_installed, ns) == "blue"
        revision = paused["status"]["previewRevision"]
        # The approval a Git commit would carry.
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, rollout={**manual, "promote": revision}))
        done = wait_phase(crd_installed, ns, "hello-agent", "Ready")
    assert (done["status"]["activeColor"], done["status"]["activeRevision"]) == ("green", revision)
    assert active_selector_colour(crd_installed, ns) == "green"


def test_manual_promotion_with_the_plugin(crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path) -> None:
    manual = {"promotion": "Manual", "analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0}
    start_v1(crd_installed, ns, rollout=manual)
    # Commands that do not fit the agent's state say so, change nothing and exit 1.
    for verb, message in (
        ("promote", "no rollout waiting for promotion"),
        ("abort", "no rollout in progress"),
        ("retry", "no aborted rollout to retry"),
    ):
        refused = kubectl_ea(crd_installed, verb, "hello-agent", "-n", ns)
        assert (refused.returncode, refused.stdout) == (1, ""), refused
        assert message in refused.stderr
    unchanged = get(crd_installed, ns, "ea", "hello-agent") or {}
    assert unchanged["metadata"]["generation"] == 1
    assert not unchanged["metadata"].get("annotations", {}).get("agents.enterprise.io/abort")
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, rollout=manual))
        paused = wait_phase(crd_installed, ns, "hello-agent", "Paused")
        shown = kubectl_ea(crd_installed, "status", "hello-agent", "-n", ns)
        assert shown.returncode == 0, shown.stderr
        assert "Progress:    [###---] 3/6 AwaitingPromotion" in shown.stdout
        promoted = kubectl_ea(crd_installed, "promote", "hello-agent", "-n", ns)
        assert promoted.returncode == 0, promoted.stderr
        agent = get(crd_installed, ns, "ea", "hello-agent") or {}
        assert agent["spec"]["rollout"]["promote"] == paused["status"]["previewRevision"]
        done = wait_phase(crd_installed, ns, "hello-agent", "Ready")
    assert done["status"]["activeColor"] == "green"


def test_abort_keeps_traffic_on_the_stable_colour_and_retry_starts_again(
    crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path
) -> None:
    manual = {"promotion": "Manual", "analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0}
    start_v1(crd_installed, ns, rollout=manual)
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, rollout=manual))
        wait_phase(crd_installed, ns, "hello-agent", "Paused")
        aborted = kubectl_ea(crd_installed, "abort", "hello-agent", "-n", ns)
        assert aborted.returncode == 0, aborted.stderr
        degraded = wait_phase(crd_installed, ns, "hello-agent", "Degraded")
        assert condition(degraded, "Degraded")["reason"] == "Aborted"
        # Stalled with it: Flux fails its health check at once instead of waiting out its timeout.
        assert_gitops_reads(degraded, "Degraded", "Failed")
        assert active_selector_colour(crd_installed, ns) == "blue"
        wait_until(lambda: replicas(crd_installed, ns, "green") == 0, what="the preview scaled down")
        assert degraded["status"]["activeColor"] == "blue"
        status = kubectl_ea(crd_installed, "status", "hello-agent", "-n", ns)
        assert status.returncode == 1  # Degraded
        assert "aborted (Aborted)" in status.stdout

        retried = kubectl_ea(crd_installed, "retry", "hello-agent", "-n", ns)
        assert retried.returncode == 0, retried.stderr
        wait_phase(crd_installed, ns, "hello-agent", "Paused")
    agent = get(crd_installed, ns, "ea", "hello-agent") or {}
    assert "agents.enterprise.io/abort" not in agent["metadata"].get("annotations", {})
    assert event_reasons(crd_installed, ns).count("RolloutStarted") == 2


def run_argocd_action(kube: Kube, namespace: str, action: str, name: str = "hello-agent") -> dict[str, Any]:
    """Runs the Argo CD action on the live agent as Argo CD does: the Lua script on the object read
    from the API server, then a merge patch of what it changed. Returns the patch."""
    live = get(kube, namespace, "ea", name) or {}
    patch = argocd_action_patch(live, action)
    assert "status" not in patch, patch  # Argo CD would send that to the status subresource
    kube.kubectl("patch", "ea", name, "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    return patch


def enabled_actions(agent: dict[str, Any]) -> set[str]:
    return {name for name, enabled in argocd_actions(agent).items() if enabled}


def test_manual_promotion_with_the_argocd_action(crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path) -> None:
    manual = {"promotion": "Manual", "analysis": {"windowSeconds": 3}, "scaleDownDelaySeconds": 0}
    ready = start_v1(crd_installed, ns, rollout=manual)
    record_agent("manual-ready", ready)
    assert enabled_actions(ready) == set()
    with pytest.raises(ActionRefusedError, match="no rollout waiting for promotion"):
        argocd_action_patch(ready, "promote")
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, rollout=manual))
        # The status read at the Analysis step (the spec has not changed since): approval may come early.
        analysing = {
            **(get(crd_installed, ns, "ea", "hello-agent") or {}),
            "status": wait_step(crd_installed, ns, "Analysis"),
        }
        record_agent("manual-analysis", analysing)
        assert enabled_actions(analysing) == {"promote", "abort", "undo"}
        paused = wait_phase(crd_installed, ns, "hello-agent", "Paused")
        record_agent("manual-paused", paused)
        assert enabled_actions(paused) == {"promote", "abort", "undo"}
        revision = paused["status"]["previewRevision"]
        # The action changes exactly what `kubectl ea promote` changes, and the operator promotes.
        assert run_argocd_action(crd_installed, ns, "promote") == {"spec": {"rollout": {"promote": revision}}}
        done = wait_phase(crd_installed, ns, "hello-agent", "Ready")
    record_agent("manual-promoted", done)
    assert (done["status"]["activeColor"], done["status"]["activeRevision"]) == ("green", revision)
    assert active_selector_colour(crd_installed, ns) == "green"
    assert enabled_actions(done) == {"undo"}


def test_argocd_abort_and_retry_actions(crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path) -> None:
    manual = {"promotion": "Manual", "analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0}
    start_v1(crd_installed, ns, rollout=manual)
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, rollout=manual))
        paused = wait_phase(crd_installed, ns, "hello-agent", "Paused")
        revision = paused["status"]["previewRevision"]
        aborted = run_argocd_action(crd_installed, ns, "abort")
        assert aborted == {"metadata": {"annotations": {"agents.enterprise.io/abort": revision}}}
        degraded = wait_phase(crd_installed, ns, "hello-agent", "Degraded")
        record_agent("manual-aborted", degraded)
        assert condition(degraded, "Degraded")["reason"] == "Aborted"
        assert active_selector_colour(crd_installed, ns) == "blue"
        assert enabled_actions(degraded) == {"retry", "undo"}

        retried = run_argocd_action(crd_installed, ns, "retry")
        assert set(retried["metadata"]["annotations"]) == {"agents.enterprise.io/abort", "agents.enterprise.io/retry"}
        again = wait_phase(crd_installed, ns, "hello-agent", "Paused")
    assert again["status"]["previewRevision"] == revision
    assert "agents.enterprise.io/abort" not in again["metadata"].get("annotations", {})
    assert again["status"]["rollout"]["retriedFor"] == retried["metadata"]["annotations"]["agents.enterprise.io/retry"]
    assert event_reasons(crd_installed, ns).count("RolloutStarted") == 2


def test_a_failed_analysis_rolls_back_before_traffic_moves(
    crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path
) -> None:
    # The runtime refuses this smoke call's payload (422): the analysis must fail.
    failing = {
        "analysis": {"windowSeconds": 0, "smoke": {"operation": "analyze_data", "payload": {"bogus": 1}}},
        "scaleDownDelaySeconds": 0,
    }
    start_v1(crd_installed, ns, operations=["analyze_data"], rollout=failing)
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, operations=["analyze_data"], rollout=failing))
        degraded = wait_phase(crd_installed, ns, "hello-agent", "Degraded")
    assert condition(degraded, "Degraded")["reason"] == "AnalysisFailed"
    assert_gitops_reads(degraded, "Degraded", "Failed")
    checks = {c["name"]: c for c in degraded["status"]["rollout"]["analysis"]}
    assert checks["smoke"]["result"] == "Failed"
    assert checks["smoke"]["message"].startswith("analyze_data: 422")
    assert checks["readyz"]["result"] == "Passed"  # the token was accepted; the payload was not
    assert degraded["status"]["activeColor"] == "blue"
    assert active_selector_colour(crd_installed, ns) == "blue"
    wait_until(lambda: replicas(crd_installed, ns, "green") == 0, what="the preview scaled down")
    assert stand.operator.metric("agent_operator_rollouts_total", result="analysis_failed") >= 1


def test_a_failed_post_promotion_check_switches_traffic_back(
    crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path
) -> None:
    rollout = {"analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 8}
    start_v1(crd_installed, ns, rollout=rollout)
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, rollout=rollout))
        wait_step(crd_installed, ns, "PostPromotion")
        assert active_selector_colour(crd_installed, ns) == "green"
    # The new colour's runtime is gone: the post-promotion check cannot reach /readyz.
    degraded = wait_phase(crd_installed, ns, "hello-agent", "Degraded", timeout=30)
    assert condition(degraded, "Degraded")["reason"] == "AnalysisFailed"
    assert "post-promotion check failed" in degraded["status"]["message"]
    assert degraded["status"]["activeColor"] == "blue"
    assert active_selector_colour(crd_installed, ns) == "blue"
    assert replicas(crd_installed, ns, "blue") == 2  # still up: the scale-down window had not ended


def test_progress_deadline_aborts_a_preview_that_never_becomes_ready(
    crd_installed: Kube, stand: Stand, ns: str
) -> None:
    rollout = {"analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0, "progressDeadlineSeconds": 30}
    start_v1(crd_installed, ns, rollout=rollout)
    # No node has this label: the preview's pods stay Pending.
    unschedulable = {"nodeSelector": {"example.com/no-such-node": "true"}}
    apply(crd_installed, agent_manifest(ns, image=V1, replicas=2, rollout=rollout, pod=unschedulable))
    degraded = wait_phase(crd_installed, ns, "hello-agent", "Degraded", timeout=90)
    assert condition(degraded, "Degraded")["reason"] == "ProgressDeadlineExceeded"
    assert degraded["status"]["activeColor"] == "blue"
    assert active_selector_colour(crd_installed, ns) == "blue"
    assert replicas(crd_installed, ns, "blue") == 2
    wait_until(lambda: replicas(crd_installed, ns, "green") == 0, what="the preview scaled down")


def test_kill_9_mid_rollout_resumes_from_status(crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path) -> None:
    rollout = {"analysis": {"windowSeconds": 8}, "scaleDownDelaySeconds": 1}
    start_v1(crd_installed, ns, rollout=rollout)
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, rollout=rollout))
        before = wait_step(crd_installed, ns, "Analysis")
        stand.operator.kill(signal.SIGKILL)
        stand.operator.start()
        done = wait_phase(crd_installed, ns, "hello-agent", "Ready", timeout=90)
    # The same rollout carried on: not restarted, nothing duplicated.
    assert done["status"]["rollout"]["startedAt"] == before["rollout"]["startedAt"]
    assert done["status"]["rollout"]["previewReadyAt"] == before["rollout"]["previewReadyAt"]
    assert done["status"]["activeColor"] == "green"
    assert event_reasons(crd_installed, ns).count("RolloutStarted") == 1
    deployments = json.loads(crd_installed.kubectl("get", "deployments", "-n", ns, "-o", "json").stdout)["items"]
    assert sorted(d["metadata"]["name"] for d in deployments) == ["hello-agent-blue", "hello-agent-green"]
    assert (replicas(crd_installed, ns, "green"), replicas(crd_installed, ns, "blue")) == (2, 0)


def test_undo_puts_the_previous_spec_back(crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path) -> None:
    start_v1(crd_installed, ns)
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2))
        wait_until(
            lambda: (
                rollout_of(crd_installed, ns).get("image") == V2
                and rollout_of(crd_installed, ns).get("phase") == "Ready"
            ),
            what="v2 promoted",
        )
        undone = kubectl_ea(crd_installed, "undo", "hello-agent", "-n", ns)
        assert undone.returncode == 0, undone.stderr
        assert "spec set back to revision" in undone.stdout
        assert "differs from Git" in undone.stderr
        agent = get(crd_installed, ns, "ea", "hello-agent") or {}
        assert agent["spec"]["image"] == V1  # the operator answered before the plugin returned
        token = agent["metadata"]["annotations"]["agents.enterprise.io/undo"]
        assert agent["metadata"]["annotations"]["agents.enterprise.io/undone"] == token  # with the spec
        assert agent["status"]["lastUndo"]["request"] == token
        assert agent["status"]["lastUndo"]["result"] == "Undone"
        done = wait_phase(crd_installed, ns, "hello-agent", "Ready")
    assert (done["status"]["image"], done["status"]["activeColor"]) == (V1, "blue")
    assert done["status"]["rollout"]["step"] == "Completed"
    assert event_reasons(crd_installed, ns).count("Undone") == 1
    # The request stays (as abort and retry do) and is answered once: a later reconcile with the same
    # annotation (here for a scale) undoes nothing more, and refuses nothing either.
    crd_installed.kubectl("patch", "ea", "hello-agent", "-n", ns, "--type=merge", "-p", '{"spec":{"replicas":3}}')
    scaled = wait_until(
        lambda: (a := get(crd_installed, ns, "ea", "hello-agent") or {})["status"].get("replicas") == 3 and a,
        what="the scale reconciled",
    )
    assert scaled["spec"]["image"] == V1
    assert scaled["status"]["lastUndo"]["request"] == token
    assert (
        event_reasons(crd_installed, ns).count("Undone"),
        event_reasons(crd_installed, ns).count("UndoRefused"),
    ) == (1, 0)
    missing = kubectl_ea(crd_installed, "undo", "nope", "-n", ns)
    assert missing.returncode == 2
    assert 'EnterpriseAgent "nope" not found' in missing.stderr


def test_the_argocd_undo_action_sets_the_spec_back_after_a_promotion(
    crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path
) -> None:
    start_v1(crd_installed, ns)
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, env=[{"name": "ONLY_IN_V2", "value": "1"}]))
        wait_until(
            lambda: (
                rollout_of(crd_installed, ns).get("image") == V2
                and rollout_of(crd_installed, ns).get("phase") == "Ready"
            ),
            what="v2 promoted",
        )
        promoted = get(crd_installed, ns, "ea", "hello-agent") or {}
        assert enabled_actions(promoted) == {"undo"}
        sent = run_argocd_action(crd_installed, ns, "undo")
        assert list(sent["metadata"]["annotations"]) == ["agents.enterprise.io/undo"]
        assert "spec" not in sent
        # The operator answers with the revision fields of the spec before (its ControllerRevision's)
        # and records the answer; the revision it puts back is rolled out blue-green like any other.
        back = wait_until(
            lambda: (a := get(crd_installed, ns, "ea", "hello-agent") or {}).get("status", {}).get("lastUndo") and a,
            what="the answer in status.lastUndo",
        )
        assert back["status"]["lastUndo"]["result"] == "Undone", back["status"]["lastUndo"]
        assert back["spec"]["image"] == V1
        assert "env" not in back["spec"]  # replaced whole: no field of the newer spec survives
        assert back["metadata"]["generation"] == promoted["metadata"]["generation"] + 1
        done = wait_phase(crd_installed, ns, "hello-agent", "Ready")
    assert (done["status"]["image"], done["status"]["activeColor"]) == (V1, "blue")


def test_an_undo_request_with_nothing_to_go_back_to_is_answered_refused_once(
    crd_installed: Kube, stand: Stand, ns: str
) -> None:
    ready = start_v1(crd_installed, ns)
    refused = kubectl_ea(crd_installed, "undo", "hello-agent", "-n", ns)
    assert (refused.returncode, refused.stderr.strip()) == (
        1,
        "error: hello-agent has no previous revision to go back to",
    )
    # Asked for anyway (an annotation is anyone's to write): the operator answers once, with why.
    crd_installed.kubectl("annotate", "ea", "hello-agent", "-n", ns, "agents.enterprise.io/undo=by-hand")
    after = wait_until(
        lambda: (a := get(crd_installed, ns, "ea", "hello-agent") or {}).get("status", {}).get("lastUndo") and a,
        what="the answer in status.lastUndo",
    )
    assert after["status"]["lastUndo"] == {
        "request": "by-hand",
        "result": "Refused",
        "message": "hello-agent has no previous revision to go back to",
    }
    assert event_reasons(crd_installed, ns).count("UndoRefused") == 1
    assert after["metadata"]["generation"] == ready["metadata"]["generation"]
    assert after["spec"] == ready["spec"]


def test_scaling_the_agent_while_it_awaits_approval_does_not_abort_the_rollout(
    crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path
) -> None:
    # What the HPA does: write the agent's scale subresource (spec.replicas) mid-rollout.
    manual = {"promotion": "Manual", "analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0}
    start_v1(crd_installed, ns, rollout=manual)
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, rollout=manual))
        paused = wait_phase(crd_installed, ns, "hello-agent", "Paused")

        def scaled_to(count: int) -> bool:
            return (replicas(crd_installed, ns, "green"), replicas(crd_installed, ns, "blue")) == (count, count)

        for count in (3, 1):  # up, then down
            crd_installed.kubectl("scale", "ea", "hello-agent", f"--replicas={count}", "-n", ns)
            # The preview and the stable colour follow the new count; the rollout waits for it and
            # goes back to waiting for approval: the same rollout, not aborted.
            wait_until(partial(scaled_to, count), what=f"both colours scaled to {count}")
            again = wait_phase(crd_installed, ns, "hello-agent", "Paused")
            assert again["spec"]["replicas"] == count
            assert again["status"]["rollout"]["startedAt"] == paused["status"]["rollout"]["startedAt"]
            assert again["status"]["previewRevision"] == paused["status"]["previewRevision"]
        reasons = event_reasons(crd_installed, ns)
        assert not {"Aborted", "AnalysisFailed", "ProgressDeadlineExceeded"} & set(reasons), reasons
        promoted = kubectl_ea(crd_installed, "promote", "hello-agent", "-n", ns)
        assert promoted.returncode == 0, promoted.stderr
        done = wait_phase(crd_installed, ns, "hello-agent", "Ready")
    assert (done["status"]["activeColor"], done["status"]["replicas"]) == ("green", 1)
    assert event_reasons(crd_installed, ns).count("RolloutStarted") == 1


def test_a_status_message_longer_than_the_crd_allows_is_written_cut(crd_installed: Kube, stand: Stand, ns: str) -> None:
    # 64 unknown operations with long names: the message naming each is far over 4096 characters.
    operations = [f"op_{i:02d}_" + "x" * 56 for i in range(64)]
    apply(crd_installed, agent_manifest(ns, operations=operations))
    stalled = wait_phase(crd_installed, ns, "hello-agent", "Stalled")
    message = stalled["status"]["message"]
    assert len(message) == 4096
    assert message.startswith("spec.operations[0]: unknown operation 'op_00_")
    assert message.endswith("...")
    assert condition(stalled, "Stalled")["reason"] == "UnknownOperation"
    assert len(condition(stalled, "Stalled")["message"]) <= 4096


def test_deleting_the_stable_deployment_while_awaiting_approval_brings_back_the_approved_one(
    crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path
) -> None:
    """The stable colour's Deployment deleted mid-rollout is made again from its ControllerRevision:
    the approved image (v1), not the unapproved spec (v2); the rollout still waits for approval."""
    manual = {"promotion": "Manual", "analysis": {"windowSeconds": 0}, "scaleDownDelaySeconds": 0}
    start_v1(crd_installed, ns, rollout=manual)
    with preview_pods(crd_installed, stand, ns, tmp_path):
        apply(crd_installed, agent_manifest(ns, image=V2, replicas=2, rollout=manual))
        paused = wait_phase(crd_installed, ns, "hello-agent", "Paused")
        before = get(crd_installed, ns, "deployment", "hello-agent-blue") or {}
        assert before["spec"]["template"]["spec"]["containers"][0]["image"] == V1
        crd_installed.kubectl("delete", "deployment", "hello-agent-blue", "-n", ns, "--wait=false")

        def recreated() -> dict[str, Any] | None:
            found = get(crd_installed, ns, "deployment", "hello-agent-blue")
            return found if found and found["metadata"]["uid"] != before["metadata"]["uid"] else None

        after: dict[str, Any] = wait_until(recreated, timeout=30, what="the stable Deployment made again")
        assert after["spec"]["template"]["spec"]["containers"][0]["image"] == V1
        assert after["metadata"]["labels"]["agents.enterprise.io/revision"] == paused["status"]["activeRevision"]
        assert after["spec"]["template"]["metadata"]["labels"] == before["spec"]["template"]["metadata"]["labels"]
        assert after["spec"]["replicas"] == 2
        still = wait_phase(crd_installed, ns, "hello-agent", "Paused")
        assert (still["status"]["activeColor"], still["status"]["previewRevision"]) == (
            "blue",
            paused["status"]["previewRevision"],
        )
        assert still["status"]["rollout"]["startedAt"] == paused["status"]["rollout"]["startedAt"]
        assert active_selector_colour(crd_installed, ns) == "blue"
        revisions = json.loads(crd_installed.kubectl("get", "controllerrevisions", "-n", ns, "-o", "json").stdout)[
            "items"
        ]
        assert {r["metadata"]["name"] for r in revisions} == {
            f"hello-agent-{paused['status']['activeRevision']}",
            f"hello-agent-{paused['status']['previewRevision']}",
        }


# A newer operator, as far as its renderer goes: every pod template it renders gets a label and an
# env var. Loaded into the operator process through PYTHONPATH (sitecustomize runs at start-up), it
# patches the renderer wherever the operator's modules refer to it.
NEWER_RENDERER = """
import sys

import agent_operator.render  # noqa: F401 - loads every renderer module
from agent_operator.render import workload

original = workload.build_pod_template


def build_pod_template(agent, revision, color):
    template = original(agent, revision, color)
    template["metadata"]["labels"]["example.com/rendered-by"] = "newer-operator"
    template["spec"]["containers"][0]["env"].append({"name": "NEWER_OPERATOR", "value": "1"})
    return template


for name, module in list(sys.modules.items()):
    if name.startswith("agent_operator"):
        for attribute, value in list(vars(module).items()):
            if value is original:
                setattr(module, attribute, build_pod_template)
"""


def test_an_operator_upgrade_that_renders_differently_starts_no_rollout(
    crd_installed: Kube, stand: Stand, ns: str, tmp_path: Path
) -> None:
    ready = start_v1(crd_installed, ns)
    deployment = get(crd_installed, ns, "deployment", "hello-agent-blue") or {}
    config_name = f"hello-agent-config-{ready['status']['activeRevision']}"
    config_map = get(crd_installed, ns, "configmap", config_name) or {}
    shim = tmp_path / "newer-operator"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NEWER_RENDERER)
    original_env = stand.operator.env
    stand.operator.stop()
    path = os.pathsep.join(p for p in (str(shim), original_env.get("PYTHONPATH")) if p)
    stand.operator.env = {**original_env, "PYTHONPATH": path}
    try:
        stand.operator.start()
        # The newer renderer is in effect: a new agent gets its pod template.
        apply(crd_installed, agent_manifest(ns, name="newcomer", image=V1))
        wait_phase(crd_installed, ns, "newcomer", "Ready")
        newcomer = get(crd_installed, ns, "deployment", "newcomer-blue") or {}
        assert newcomer["spec"]["template"]["metadata"]["labels"]["example.com/rendered-by"] == "newer-operator"
        # And it has looked at the old agent since: two resyncs of every agent, then an empty queue.
        wait_until(lambda: stand.operator.metric("agent_operator_resyncs_total") >= 2, what="two resyncs")
        wait_until(lambda: stand.operator.metric("agent_operator_workqueue_depth") == 0, what="an empty queue")
        agent = get(crd_installed, ns, "ea", "hello-agent") or {}
        assert agent["status"]["activeRevision"] == ready["status"]["activeRevision"]
        assert (agent["status"]["phase"], agent["status"].get("rollout")) == ("Ready", ready["status"].get("rollout"))
        assert "RolloutStarted" not in event_reasons(crd_installed, ns)
        after = get(crd_installed, ns, "deployment", "hello-agent-blue") or {}
        assert after["metadata"]["generation"] == deployment["metadata"]["generation"]  # no pod template change
        assert after["spec"]["template"] == deployment["spec"]["template"]
        assert get(crd_installed, ns, "deployment", "hello-agent-green") is None
        assert (get(crd_installed, ns, "configmap", config_name) or {}).get("data") == config_map["data"]
    finally:
        stand.operator.stop()
        stand.operator.env = original_env
        stand.operator.start()
