"""The operator under faults, on a real API server: each test is named after the fault and ends
with the agent converged, nothing lost, and the status saying what happened."""

from __future__ import annotations

import base64
import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from eao_devtools.testkit.operator_process import OperatorProcess
from tests.cluster.agents import apply, children, condition, get, operator_writes, wait_phase, wait_until
from tests.faults.conftest import create_quota, start_operator
from tests.faults.proxy import StallingProxy
from tests.faults.webhook import RefusingWebhook

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


def test_a_named_namespace_made_while_the_operator_could_not_see_is_watched_once_it_can(
    fault_cluster: Kube, fault_namespace: str, tmp_path: Path
) -> None:
    """`--namespace team-b` given before team-b exists; team-b and an agent in it are made while the
    operator is frozen and the API server restarts with its history compacted. kopf's watch of
    Namespaces then comes back with a relist, and kopf ignores the namespaces a list returns: had
    the operator's watches in a named namespace depended on that watch, the agent would never be
    seen (its resync is an hour away)."""
    kube, first = fault_cluster, fault_namespace
    assert kube.local is not None
    later = f"fl-{uuid.uuid4().hex[:8]}"
    operator = start_operator(kube, tmp_path, first, resync_seconds=3600, extra_args=("--namespace", later))
    try:
        # An agent Ready in the namespace that exists: the operator's watches are up.
        apply(kube, agent_manifest(first))
        wait_phase(kube, first, "hello-agent", "Ready")
        assert operator.process is not None
        operator.process.send_signal(signal.SIGSTOP)
        try:
            kube.local.restart("kube-apiserver")
            objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": later}}, agent_manifest(later)]
            kube.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
            kube.local.compact_etcd()
        finally:
            operator.process.send_signal(signal.SIGCONT)
        # Ready needs the Deployment's status, which only the watch in that namespace brings.
        assert condition(wait_phase(kube, later, "hello-agent", "Ready", timeout=90), "Ready")["status"] == "True"
    finally:
        operator.stop()
        kube.kubectl("delete", "namespace", later, "--wait=false", check=False)


def test_a_resource_quota_that_refuses_a_child_is_stalled_with_an_event_then_converges(
    fault_cluster: Kube, fault_namespace: str, operator: OperatorProcess
) -> None:
    kube, ns = fault_cluster, fault_namespace
    create_quota(kube, ns, "no-services", "services=0")
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
    # Labelled as if it were the agent's: a label is anyone's to set, and must not make it the keys.
    kube.kubectl("label", "secret", "billing-keys", "-n", ns, "app.kubernetes.io/managed-by=enterprise-agent-operator",
                 "app.kubernetes.io/instance=billing")  # fmt: skip
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
        # Stalled between writes: bytes of a write already sent would be delivered on resume, and no
        # replica can recall those (the fence is for what it has not sent yet).
        wait_until(_no_writes(first, 3.0), timeout=60, what="the first operator idle")
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


INSTANCE = "app.kubernetes.io/instance"
POLICY = "services for this agent need a security review (ticket SEC-42)"
WEBHOOK = "refuse.faults.agents.enterprise.io"


def _refused_by_webhook(kube: Kube, namespace: str, agent: str) -> bool:
    """Whether the API server calls the webhook yet: a server-side dry run of such a Service."""
    probe = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "probe", "namespace": namespace, "labels": {INSTANCE: agent}},
        "spec": {"ports": [{"port": 80}]},
    }
    result = kube.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(probe), check=False)
    return result.returncode != 0 and POLICY in result.stderr


def _no_writes(operator: OperatorProcess, seconds: float) -> Callable[[], bool]:
    """A condition: the operator has written nothing but its Lease for ``seconds``."""

    def writes() -> float:
        total = operator.metric("agent_operator_api_writes_total")
        return total - operator.metric("agent_operator_api_writes_total", resource="leases")

    last = [writes(), time.monotonic()]

    def idle() -> bool:
        count = writes()
        if count != last[0]:
            last[:] = [count, time.monotonic()]
        return time.monotonic() - last[1] >= seconds

    return idle


def _quiet(operator: OperatorProcess, seconds: float) -> Callable[[], bool]:
    """A condition: the operator has run no reconcile for ``seconds``."""
    last = [operator.metric("agent_operator_reconcile_duration_seconds_count"), time.monotonic()]

    def quiet() -> bool:
        count = operator.metric("agent_operator_reconcile_duration_seconds_count")
        if count != last[0]:
            last[:] = [count, time.monotonic()]
        return time.monotonic() - last[1] >= seconds

    return quiet


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        pytest.param(403, "Forbidden", id="403"),
        pytest.param(
            None,
            "ApplyFailed",
            id="unset-400",
        ),
    ],
)
def test_an_admission_webhook_that_refuses_a_child_is_stalled_with_an_event_then_converges(
    fault_cluster: Kube, fault_namespace: str, tmp_path: Path, code: int | None, reason: str
) -> None:
    """A ValidatingWebhookConfiguration refuses the agent's Services (a policy webhook of the
    platform's): the agent is Stalled naming the Service and the webhook's message; once the
    webhook configuration goes, the operator makes the Services by itself. The operator runs with
    the default resync (300 s), so only its own retries can bring the agent back in the time."""
    kube, ns = fault_cluster, fault_namespace
    configuration = f"eao-faults-{ns}"
    operator = start_operator(kube, tmp_path, ns, resync_seconds=300)
    webhook = RefusingWebhook(
        tmp_path / "webhook",
        lambda request: (request["object"]["metadata"].get("labels") or {}).get(INSTANCE) == "guarded",
        POLICY,
        code,
    ).start()
    try:
        apply(kube, webhook.configuration(configuration, ns, "services", {INSTANCE: "guarded"}))
        wait_until(lambda: _refused_by_webhook(kube, ns, "guarded"), timeout=30, what="the webhook in effect")
        apply(kube, agent_manifest(ns, name="guarded"))
        stalled = condition(wait_phase(kube, ns, "guarded", "Stalled"), "Stalled")
        assert stalled["reason"] == reason
        assert f'admission webhook "{WEBHOOK}" denied the request: {POLICY}' in stalled["message"]
        assert "Service guarded: " in stalled["message"] or "Service guarded-preview: " in stalled["message"]
        assert {f"CREATE Service {ns}/guarded", f"CREATE Service {ns}/guarded-preview"} & set(webhook.refused)
        assert ("Warning", reason) in {(e["type"], e["reason"]) for e in _events(kube, ns, "guarded")}
        assert get(kube, ns, "service", "guarded") is None
        # Once the Deployment's status settles, nothing else brings the agent back to the operator:
        # wait for its last events to be handled (no reconcile for a few child-event delays).
        wait_until(_quiet(operator, seconds=3), timeout=60, what="the operator idle")
        kube.kubectl("delete", "validatingwebhookconfiguration", configuration)
        agent = wait_phase(kube, ns, "guarded", "Ready", timeout=90)  # nothing about the agent changed
        assert condition(agent, "Stalled")["status"] == "False"
        assert {s["metadata"]["name"] for s in children(kube, ns, "guarded")["Service"]} == {
            "guarded",
            "guarded-preview",
        }
    finally:
        kube.kubectl("delete", "validatingwebhookconfiguration", configuration, "--ignore-not-found", check=False)
        webhook.close()
        operator.stop()


HOLD = "faults.agents.enterprise.io/hold"


def _writes(operator: OperatorProcess) -> float:
    """The operator's write requests, but for its Lease renewals (every two seconds, whatever happens)."""
    return operator.metric("agent_operator_api_writes_total") - operator.metric(
        "agent_operator_api_writes_total", resource="leases"
    )


def test_a_terminating_namespace_neither_crash_loops_nor_hammers_the_api(
    fault_cluster: Kube, fault_namespace: str, tmp_path: Path
) -> None:
    """The agent's namespace is deleted while a ConfigMap's finalizer (and one on the agent itself,
    as a backup tool might set) keeps it Terminating: the namespace controller deletes the children
    under a live agent, and nothing can be created there any more. The operator must not fight it
    (each attempt a 403) in a hot loop, nor crash; once the finalizers go, everything goes."""
    kube, ns = fault_cluster, fault_namespace
    operator = start_operator(kube, tmp_path, ns, lease_namespace="default")  # its Lease is not in the doomed namespace
    try:
        apply(kube, agent_manifest(ns, name="doomed"))
        wait_phase(kube, ns, "doomed", "Ready")
        held = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "held", "namespace": ns, "finalizers": [HOLD]},
        }
        apply(kube, held)
        kube.kubectl(
            "patch", "ea", "doomed", "-n", ns, "--type=merge", "-p", json.dumps({"metadata": {"finalizers": [HOLD]}})
        )
        assert kube.local is not None
        errors, writes = operator.metric("agent_operator_reconcile_errors_total"), _writes(operator)
        audited = len(operator_writes(kube.local.audit_log, ns))
        pid = operator.process.pid if operator.process else None
        kube.kubectl("delete", "namespace", ns, "--wait=false")

        def emptied() -> bool:
            namespace = get(kube, "", "namespace", ns) or {}
            agent = get(kube, ns, "ea", "doomed") or {}
            terminating = (namespace.get("status") or {}).get("phase") == "Terminating"
            return terminating and bool(agent["metadata"].get("deletionTimestamp")) and not children(kube, ns, "doomed")

        wait_until(emptied, timeout=60, what="the namespace Terminating, the agent deleting, its children gone")
        # The operator has seen it all by the next resync; from then on it writes nothing, however often it looks.
        resyncs = operator.metric("agent_operator_resyncs_total")
        wait_until(lambda: operator.metric("agent_operator_resyncs_total") >= resyncs + 1, what="a resync")
        quiet_writes, quiet_audited, reconciles = (
            _writes(operator),
            len(operator_writes(kube.local.audit_log, ns)),
            operator.metric("agent_operator_reconcile_duration_seconds_count"),
        )
        wait_until(
            lambda: operator.metric("agent_operator_resyncs_total") >= resyncs + 5, timeout=30, what="four more resyncs"
        )
        assert _writes(operator) == quiet_writes
        assert operator_writes(kube.local.audit_log, ns)[quiet_audited:] == []
        # One reconcile per resync and per event, no more: no hot loop.
        assert operator.metric("agent_operator_reconcile_duration_seconds_count") - reconciles <= 8
        # While the children went under a live agent, at most a few refused attempts, backed off:
        # two reconciles' worth of writes (each applies its 9 children at once, then a status and
        # an Event), where a hot loop would make hundreds.
        assert operator.metric("agent_operator_reconcile_errors_total") - errors <= 3
        assert _writes(operator) - writes <= 2 * (9 + 2)
        assert len(operator_writes(kube.local.audit_log, ns)) - audited <= 2 * (9 + 2)
        assert operator.process is not None
        assert operator.process.pid == pid
        assert operator.process.poll() is None
        assert operator.healthy()
        assert operator.is_leader()
        assert get(kube, "", "namespace", ns) is not None  # still held: the window above was Terminating
        for kind, name in (("configmap", "held"), ("ea", "doomed")):
            kube.kubectl("patch", kind, name, "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
        wait_until(lambda: get(kube, "", "namespace", ns) is None, timeout=90, what="the namespace gone")
        wait_until(lambda: operator.metric("agent_operator_agents_managed") == 0, what="the agent forgotten")
        assert operator.metric("agent_operator_agent_phase", namespace=ns, name="doomed") == 0
    finally:
        operator.stop()
