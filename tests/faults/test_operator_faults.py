"""The operator under faults, on a real API server: each test is named after the fault and ends
with the agent converged, nothing lost, and the status saying what happened."""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess
from tests.cluster.agents import apply, condition, get, wait_phase, wait_until
from tests.faults.conftest import start_operator
from tests.faults.proxy import StallingProxy

pytestmark = pytest.mark.cluster

ROTATE = "agents.enterprise.io/rotate-keys"
ROTATED_FOR = "agents.enterprise.io/rotated-for"


@pytest.fixture
def operator(fault_cluster: Kube, fault_namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = start_operator(fault_cluster, tmp_path, fault_namespace)
    try:
        yield process
    finally:
        process.stop()


def _events(kube: Kube, namespace: str, name: str) -> list[dict[str, str]]:
    listing = json.loads(
        kube.kubectl(
            "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}", "-o", "json"
        ).stdout
    )
    return [{"type": e["type"], "reason": e["reason"], "message": e["message"]} for e in listing["items"]]


def test_api_server_restart_with_a_child_and_an_agent_deleted_in_the_gap(
    fault_cluster: Kube, fault_namespace: str, operator: OperatorProcess
) -> None:
    """The operator's watches come back after the restart with a relist that carries no DELETED
    events: what was deleted while it could not see is repaired anyway, and a deleted agent's
    phase gauge goes (an alert on it would fire forever)."""
    kube, ns = fault_cluster, fault_namespace
    assert kube.local is not None
    apply(kube, agent_manifest(ns, name="kept"))
    apply(kube, agent_manifest(ns, name="gone"))
    wait_phase(kube, ns, "kept", "Ready")
    wait_phase(kube, ns, "gone", "Ready")
    assert operator.metric("agent_operator_agent_phase", namespace=ns, name="gone", phase="Ready") == 1
    assert operator.process is not None
    operator.process.send_signal(signal.SIGSTOP)  # it sees nothing of what follows
    try:
        kube.local.restart("kube-apiserver")  # its watch connections break; it cannot reconnect yet
        kube.kubectl("delete", "networkpolicy", "kept", "-n", ns)
        kube.kubectl("delete", "ea", "gone", "-n", ns)
        kube.local.compact_etcd()  # no history left to resume a watch from: 410 Gone, then a relist
    finally:
        operator.process.send_signal(signal.SIGCONT)
    wait_until(lambda: get(kube, ns, "networkpolicy", "kept"), timeout=60, what="NetworkPolicy recreated")
    wait_until(
        lambda: operator.metric("agent_operator_agent_phase", namespace=ns, name="gone") == 0,
        timeout=60,
        what="the deleted agent's phase gauge gone",
    )
    assert condition(wait_phase(kube, ns, "kept", "Ready"), "Ready")["status"] == "True"


def test_a_resource_quota_that_refuses_a_child_is_stalled_with_an_event_then_converges(
    fault_cluster: Kube, fault_namespace: str, operator: OperatorProcess
) -> None:
    kube, ns = fault_cluster, fault_namespace
    kube.kubectl("create", "quota", "no-services", "--hard=services=0", "-n", ns)
    apply(kube, agent_manifest(ns, name="quota"))
    agent = wait_phase(kube, ns, "quota", "Stalled")
    stalled = condition(agent, "Stalled")
    assert stalled["reason"] == "Forbidden"
    assert "Service quota" in stalled["message"]
    assert "exceeded quota" in stalled["message"] or "no-services" in stalled["message"]
    assert {("Warning", "Forbidden")} <= {(e["type"], e["reason"]) for e in _events(kube, ns, "quota")}
    kube.kubectl("delete", "quota", "no-services", "-n", ns)
    agent = wait_phase(kube, ns, "quota", "Ready", timeout=90)  # by itself: nothing about the agent changed
    assert condition(agent, "Stalled")["status"] == "False"


def test_foreign_objects_with_a_childs_name_are_neither_adopted_nor_deleted(
    fault_cluster: Kube, fault_namespace: str, operator: OperatorProcess
) -> None:
    kube, ns = fault_cluster, fault_namespace
    kube.kubectl("create", "service", "clusterip", "support-bot", "--tcp=80:80", "-n", ns)
    kube.kubectl("create", "secret", "generic", "billing-keys", "--from-literal=theirs=do-not-use", "-n", ns)
    apply(kube, agent_manifest(ns, name="support-bot"))
    apply(kube, agent_manifest(ns, name="billing"))
    for name, taken in (("support-bot", "Service support-bot"), ("billing", "Secret billing-keys")):
        stalled = condition(wait_phase(kube, ns, name, "Stalled"), "Stalled")
        assert stalled["reason"] == "NameConflict"
        assert taken in stalled["message"]
        assert "not controlled by this agent" in stalled["message"]
    service, secret = get(kube, ns, "service", "support-bot"), get(kube, ns, "secret", "billing-keys")
    assert service is not None
    assert secret is not None
    assert "ownerReferences" not in service["metadata"]
    assert "ownerReferences" not in secret["metadata"]
    assert secret["data"] == {"theirs": base64.b64encode(b"do-not-use").decode()}
    assert get(kube, ns, "deployment", "support-bot-blue") is None  # nothing half-made beside it
    kube.kubectl("delete", "ea", "support-bot", "billing", "-n", ns)
    # The agent's own key Secret goes with it; the foreign objects stay.
    wait_until(lambda: get(kube, ns, "secret", "support-bot-keys") is None, timeout=60, what="the agent's own keys")
    assert get(kube, ns, "service", "support-bot") == service
    assert get(kube, ns, "secret", "billing-keys") == secret


def test_agents_web_and_web_preview_do_not_fight_over_service_web_preview(
    fault_cluster: Kube, fault_namespace: str, operator: OperatorProcess
) -> None:
    kube, ns = fault_cluster, fault_namespace
    apply(kube, agent_manifest(ns, name="web"))
    web = wait_phase(kube, ns, "web", "Ready")
    apply(kube, agent_manifest(ns, name="web-preview"))
    stalled = condition(wait_phase(kube, ns, "web-preview", "Stalled"), "Stalled")
    assert stalled["reason"] == "NameConflict"
    assert "Service web-preview already exists, controlled by EnterpriseAgent web" in stalled["message"]
    service = get(kube, ns, "service", "web-preview")
    assert service is not None
    reconciles = operator.metric("agent_operator_reconcile_duration_seconds_count")
    resyncs = operator.metric("agent_operator_resyncs_total")
    wait_until(lambda: operator.metric("agent_operator_resyncs_total") >= resyncs + 2, timeout=30, what="two resyncs")
    assert operator.metric("agent_operator_reconcile_duration_seconds_count") >= reconciles + 4  # both, twice
    after = get(kube, ns, "service", "web-preview")
    assert after is not None
    assert after["metadata"]["resourceVersion"] == service["metadata"]["resourceVersion"]  # nobody took it over
    assert after["metadata"]["ownerReferences"][0]["uid"] == web["metadata"]["uid"]
    assert wait_phase(kube, ns, "web", "Ready")["status"]["activeRevision"] == web["status"]["activeRevision"]


def _key_files(kube: Kube, namespace: str, name: str) -> tuple[str | None, set[str]]:
    secret = get(kube, namespace, "secret", f"{name}-keys") or {"metadata": {}, "data": {}}
    served = (secret["metadata"].get("annotations") or {}).get(ROTATED_FOR)
    return served, {f"{k}={v}" for k, v in (secret.get("data") or {}).items() if k != "active.json"}


def test_key_rotations_back_to_back_drop_no_key(
    fault_cluster: Kube, fault_namespace: str, operator: OperatorProcess
) -> None:
    kube, ns = fault_cluster, fault_namespace
    apply(kube, agent_manifest(ns, name="keys"))
    wait_phase(kube, ns, "keys", "Ready")
    kube.kubectl("annotate", "ea", "keys", "-n", ns, f"{ROTATE}=first")
    _, first = wait_until(lambda: (v := _key_files(kube, ns, "keys"))[0] == "first" and v, what="first rotation")
    for request in ("second", "third", "fourth"):  # faster than the operator reconciles
        kube.kubectl("annotate", "ea", "keys", "-n", ns, "--overwrite", f"{ROTATE}={request}")
    _, last = wait_until(lambda: (v := _key_files(kube, ns, "keys"))[0] == "fourth" and v, what="last rotation")
    assert first < last  # every key file still there, byte for byte, and new ones beside them


def _writes_by(audit_log: Path, identity: str, after: str) -> list[str]:
    """Successful writes by one operator replica (its identity is in its user agent) after a moment."""
    writes = []
    for line in audit_log.read_text().splitlines():
        event = json.loads(line)
        if event.get("stage") != "ResponseComplete" or event["verb"] in ("get", "list", "watch"):
            continue
        if f"({identity})" not in str(event.get("userAgent")) or event["stageTimestamp"] <= after:
            continue
        if 200 <= int((event.get("responseStatus") or {}).get("code", 0)) < 300:
            ref = event.get("objectRef") or {}
            writes.append(f"{event['stageTimestamp']} {event['verb']} {ref.get('resource')}/{ref.get('name')}")
    return writes


def _lease(kube: Kube, namespace: str) -> dict[str, str]:
    lease = get(kube, namespace, "lease", "eao-faults") or {}
    spec: dict[str, str] = lease.get("spec") or {}
    return spec


def test_a_leader_whose_connection_stalls_stops_writing_before_another_takes_over(
    fault_cluster: Kube, fault_namespace: str, tmp_path: Path
) -> None:
    """Split brain: the leader's Lease renewals hang on a stalled connection while a second
    operator takes over. Nothing the old leader does after the takeover reaches the API server,
    not even once its connection flows again and it sees the changes it missed."""
    kube, ns = fault_cluster, fault_namespace
    assert kube.local is not None
    server = kube.local.server_url
    host, port = server.removeprefix("https://").rsplit(":", 1)
    proxy = StallingProxy(host, int(port)).start()
    kubeconfig = tmp_path / "through-proxy.kubeconfig"
    kubeconfig.write_text(kube.kubeconfig.read_text().replace(server, f"https://{host}:{proxy.port}"))
    first = start_operator(kube, tmp_path, ns, name="first", kubeconfig=kubeconfig)
    second: OperatorProcess | None = None
    try:
        wait_until(first.is_leader, what="the first operator leads")
        first_identity = _lease(kube, ns)["holderIdentity"]
        second = start_operator(kube, tmp_path, ns, name="second")
        apply(kube, agent_manifest(ns, name="split"))
        wait_phase(kube, ns, "split", "Ready")
        proxy.stall()
        wait_until(second.is_leader, timeout=60, what="the second operator takes over")
        takeover = _lease(kube, ns)
        assert takeover["holderIdentity"] != first_identity
        # Changes the old leader cannot see; the new one carries them out.
        apply(kube, agent_manifest(ns, name="split", replicas=2))
        kube.kubectl("delete", "networkpolicy", "split", "-n", ns)
        wait_until(lambda: get(kube, ns, "networkpolicy", "split"), what="the new leader repairs")
        wait_phase(kube, ns, "split", "Ready")
        proxy.resume()
        # The old leader now sees all it missed, with a cache and a status view from before.
        resyncs = second.metric("agent_operator_resyncs_total")
        wait_until(lambda: second.metric("agent_operator_resyncs_total") >= resyncs + 2, what="two resyncs")
        wait_until(lambda: first.healthy() and not first.is_leader(), what="the old leader knows it is not")
        assert _writes_by(kube.local.audit_log, first_identity, takeover["acquireTime"]) == []
        assert second.is_leader()
        agent = wait_phase(kube, ns, "split", "Ready")
        assert agent["status"]["readyReplicas"] == 2
    finally:
        proxy.close()
        first.stop()
        if second is not None:
            second.stop()
