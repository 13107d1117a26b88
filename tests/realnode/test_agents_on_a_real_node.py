"""End to end on real pods: the images built from images/Dockerfile, the operator installed by its
chart and running as pods, agents served by the runtime in real containers behind kube-proxy's
Services, NetworkPolicy enforced by kube-router, names resolved by CoreDNS.

The tests run in file order and share one cluster (see conftest.py); each uses its own namespace,
except the first agent, which is examples/minimal.yaml applied exactly as it is."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_operator.analysis import operator_token
from agent_operator.manifest import parse_agent
from eao_devtools.imagebuild import image_references
from eao_devtools.node import CONTAINERD_SOCKET, K8S_NAMESPACE, NODE_IP
from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from tests.cluster.agents import apply, condition, get, wait_phase, wait_until
from tests.cluster.test_plugin import kubectl_ea
from tests.fake_model import FakeModel
from tests.helpers import ROOT
from tests.realnode.conftest import (
    OPERATOR_NAMESPACE,
    SteadyLoad,
    can_connect,
    cluster_ip,
    exec_python,
    final_container_states,
    pods,
    requires_root,
    restarts,
)

pytestmark = [pytest.mark.cluster, requires_root]
OPERATOR_PODS = "app.kubernetes.io/name=enterprise-agent-operator"
ANALYZE = json.dumps({"input": {"data": [{"v": 1}, {"v": 3}]}}).encode()
SMOKE = {"operation": "analyze_data", "payload": {"input": {"data": [{"v": 2}]}}}


def agent_pods(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    return pods(kube, namespace, f"app.kubernetes.io/instance={name}")


def live_pods(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    """The agent's pods not on their way out."""
    return [p for p in agent_pods(kube, namespace, name) if "deletionTimestamp" not in p["metadata"]]


@pytest.fixture
def namespaces(chart_operator: Kube) -> Iterator[Callable[[str], str]]:
    """Makes namespaces for one test and deletes them (waiting) afterwards: the node has two CPUs,
    and pods left running by earlier tests would keep later ones Pending."""
    made: list[str] = []

    def make(name: str) -> str:
        chart_operator.kubectl("create", "namespace", name)
        made.append(name)
        return name

    yield make
    for name in made:
        chart_operator.kubectl("delete", "namespace", name, "--wait=true", "--timeout=120s", check=False, timeout=150)


def key_secret_data(kube: Kube, namespace: str, name: str) -> dict[str, str]:
    secret = get(kube, namespace, "secret", f"{name}-keys")
    assert secret is not None
    return dict(secret["data"])


def token_for(kube: Kube, namespace: str, name: str) -> str:
    """A token signed with the agent's own key, as the operator's smoke call signs one."""
    agent = parse_agent(get(kube, namespace, "ea", name) or {})
    return operator_token(agent, key_secret_data(kube, namespace, name))


def readyz(kube: Kube, namespace: str, pod: str) -> dict[str, Any]:
    code = (
        "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8080/readyz',timeout=5).read().decode())"
    )
    result = exec_python(kube, namespace, pod, code)
    assert result.returncode == 0, result.stderr
    body: dict[str, Any] = json.loads(result.stdout)
    return body


def wait_rollout_done(
    kube: Kube, namespace: str, name: str, revision: str | None, timeout: float = 180
) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        agent = get(kube, namespace, "ea", name) or {}
        status = agent.get("status") or {}
        finished = (status.get("rollout") or {}).get("step") == "Completed" and status.get("activeRevision") != revision
        return agent if finished and status.get("phase") == "Ready" else None

    found: dict[str, Any] = wait_until(done, timeout, interval=1, what=f"{namespace}/{name} rollout completed")
    return found


# -- the images ------------------------------------------------------------------------------------


def test_both_images_are_in_the_nodes_runtime_under_the_default_names(real_cluster: Kube) -> None:
    listing = subprocess.run(
        ["ctr", f"--address={CONTAINERD_SOCKET}", "-n", K8S_NAMESPACE, "images", "list", "-q"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()  # fmt: skip
    for reference in image_references().values():
        assert reference in listing, listing
    chart_values = (ROOT / "charts" / "enterprise-agent-operator" / "values.yaml").read_text()
    assert "repository: " + image_references()["operator"].rsplit(":", 1)[0] in chart_values
    example = (ROOT / "examples" / "minimal.yaml").read_text()
    assert f"image: {image_references()['runtime']}" in example


def test_the_operator_runs_from_its_image_as_10001_without_pip_or_compiler(chart_operator: Kube) -> None:
    kube = chart_operator
    running = pods(kube, OPERATOR_NAMESPACE, OPERATOR_PODS)
    assert len(running) == 2
    pod = running[0]
    assert pod["status"]["containerStatuses"][0]["image"].endswith(image_references()["operator"])
    assert_hardened_image(kube, OPERATOR_NAMESPACE, pod["metadata"]["name"])


def assert_hardened_image(kube: Kube, namespace: str, pod: str) -> None:
    """What images/Dockerfile promises, checked inside the running container of the built image."""
    probe = (
        "import os, shutil, importlib.util as u, sys; "
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'exe': sys.executable,"
        " 'pip': u.find_spec('pip') is not None, 'ensurepip': u.find_spec('ensurepip') is not None,"
        " 'tools': [t for t in ('pip', 'pip3', 'gcc', 'cc', 'make', 'apt-get') if shutil.which(t)],"
        " 'root_writable': os.access('/', os.W_OK)}))"
    )
    result = exec_python(kube, namespace, pod, "import json; " + probe)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert (facts["uid"], facts["gid"]) == (10001, 10001)
    assert facts["exe"].startswith("/opt/venv/")
    assert not facts["pip"], facts
    assert not facts["ensurepip"], facts
    # apt-get stays (Debian's base has it; it cannot run as uid 10001); no installer or compiler.
    assert [tool for tool in facts["tools"] if tool != "apt-get"] == [], facts
    assert facts["root_writable"] is False


# -- the operator, as the chart installs it --------------------------------------------------------


def test_the_chart_runs_the_operator_as_real_pods_holding_the_lease(chart_operator: Kube) -> None:
    kube = chart_operator
    running = pods(kube, OPERATOR_NAMESPACE, OPERATOR_PODS)
    names = {pod["metadata"]["name"] for pod in running}
    lease = json.loads(
        kube.kubectl("get", "lease", "enterprise-agent-operator", "-n", OPERATOR_NAMESPACE, "-o", "json").stdout
    )
    holder = lease["spec"]["holderIdentity"]
    assert any(holder.startswith(name) for name in names), (holder, names)
    for pod in running:
        assert restarts(pod) == 0
        log = kube.kubectl("logs", "-n", OPERATOR_NAMESPACE, pod["metadata"]["name"]).stdout
        assert "Forbidden" not in log, log[-3000:]
        assert " 403" not in log, log[-3000:]


def test_the_minimal_example_runs_as_it_is(chart_operator: Kube) -> None:
    kube = chart_operator
    kube.kubectl("apply", "-f", str(ROOT / "examples" / "minimal.yaml"))
    agent = wait_phase(kube, "default", "hello-agent", "Ready", timeout=120)
    assert condition(agent, "Ready")["status"] == "True"
    (pod,) = agent_pods(kube, "default", "hello-agent")
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # Ready came from a real probe
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"
    assert restarts(pod) == 0
    assert pod["status"]["containerStatuses"][0]["image"].endswith(image_references()["runtime"])
    assert_hardened_image(kube, "default", pod["metadata"]["name"])  # the runtime's image, as the operator's
    # The keys volume is a real Secret volume (..data, a timestamped folder): the runtime read it.
    ready = readyz(kube, "default", pod["metadata"]["name"])
    assert ready["checks"]["keys"]["ok"] is True
    status = kubectl_ea(kube, "status", "hello-agent", "-n", "default")
    assert status.returncode == 0, status.stderr
    assert "Ready" in status.stdout


def test_service_names_resolve_in_pods(chart_operator: Kube) -> None:
    kube = chart_operator
    pod = pods(kube, OPERATOR_NAMESPACE, OPERATOR_PODS)[0]["metadata"]["name"]
    for service, namespace in (("kubernetes", "default"), ("kube-dns", "kube-system")):
        code = f"import socket; print(socket.gethostbyname('{service}.{namespace}.svc.cluster.local'))"
        result = exec_python(kube, OPERATOR_NAMESPACE, pod, code)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == cluster_ip(kube, namespace, service)
    unknown = exec_python(
        kube, OPERATOR_NAMESPACE, pod, "import socket; socket.gethostbyname('nope.default.svc.cluster.local')"
    )
    assert "gaierror" in unknown.stderr  # an unknown name is an answer (NXDOMAIN), not an outage


# -- a blue-green rollout on real pods -------------------------------------------------------------


def test_a_rollout_analyses_real_pods_and_drops_no_request(
    chart_operator: Kube, namespaces: Callable[[str], str]
) -> None:
    kube = chart_operator
    namespace = namespaces("rn-rollout")
    rollout = {"analysis": {"windowSeconds": 10, "smoke": SMOKE}, "scaleDownDelaySeconds": 5}
    apply(kube, agent_manifest(namespace, replicas=2, rollout=rollout))
    first = wait_phase(kube, namespace, "hello-agent", "Ready", timeout=120)
    url = f"http://{cluster_ip(kube, namespace, 'hello-agent')}/v1/operations/analyze_data"
    with SteadyLoad(url, ANALYZE, token_for(kube, namespace, "hello-agent")) as load:
        apply(kube, agent_manifest(namespace, replicas=2, rollout=rollout, env=[{"name": "RELEASE", "value": "2"}]))
        done = wait_rollout_done(kube, namespace, "hello-agent", first["status"]["activeRevision"])
        old = first["status"]["activeColor"]
        wait_until(
            lambda: not [p for p in agent_pods(kube, namespace, "hello-agent") if old in p["metadata"]["name"]],
            timeout=90, interval=1, what=f"the {old} pods gone",
        )  # fmt: skip
    print(
        f"requests across the promotion: {load.result.total}, failed {load.result.failed}: {dict(load.result.statuses)}"
    )
    assert load.result.failed == 0, dict(load.result.statuses)
    assert load.result.total > 100
    checks = {check["name"]: check for check in done["status"]["rollout"]["analysis"]}
    assert {name: check["result"] for name, check in checks.items()} == {
        "endpoints": "Passed", "readyz": "Passed", "errorRate": "Passed", "latency": "Passed", "smoke": "Passed",
    }  # fmt: skip
    assert checks["smoke"]["message"].startswith("analyze_data: 200"), checks["smoke"]
    assert done["status"]["activeColor"] != old


def test_rotated_keys_reach_the_new_pods(chart_operator: Kube, namespaces: Callable[[str], str]) -> None:
    kube = chart_operator
    namespace = namespaces("rn-keys")
    apply(kube, agent_manifest(namespace))
    first = wait_phase(kube, namespace, "hello-agent", "Ready", timeout=120)
    (pod,) = agent_pods(kube, namespace, "hello-agent")
    before = readyz(kube, namespace, pod["metadata"]["name"])["checks"]["keys"]["signing"]
    old_token = token_for(kube, namespace, "hello-agent")
    kube.kubectl("annotate", "ea", "hello-agent", "-n", namespace, "agents.enterprise.io/rotate-keys=rn-1")
    wait_rollout_done(kube, namespace, "hello-agent", first["status"]["activeRevision"])
    (new_pod,) = wait_until(
        lambda: [p for p in live_pods(kube, namespace, "hello-agent") if p["metadata"]["name"] != pod["metadata"]["name"]]
        if len(live_pods(kube, namespace, "hello-agent")) == 1 else None,
        timeout=90, interval=1, what="only the new pod left",
    )  # fmt: skip
    after = readyz(kube, namespace, new_pod["metadata"]["name"])["checks"]["keys"]["signing"]
    active = json.loads(base64.b64decode(key_secret_data(kube, namespace, "hello-agent")["active.json"]))
    assert after != before
    assert after == active["jwt"]
    # A token signed before the rotation still verifies on the new pod (the old key is kept).
    url = f"http://{cluster_ip(kube, namespace, 'hello-agent')}/v1/operations/analyze_data"
    with SteadyLoad(url, ANALYZE, old_token, clients=1) as load:
        pass
    assert load.result.failed == 0, dict(load.result.statuses)


# -- NetworkPolicy, enforced -----------------------------------------------------------------------


def client_pod(kube: Kube, namespace: str, name: str, labels: dict[str, str] | None = None) -> str:
    """A pod of the runtime image that only sleeps, to connect from."""
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "client", "image": image_references()["runtime"], "imagePullPolicy": "Never",
                "command": ["sleep", "3600"],
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }  # fmt: skip
    apply(kube, manifest)
    kube.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "-n", namespace, "--timeout=90s")
    return name


def pod_ip(kube: Kube, namespace: str, selector: str) -> str:
    (pod,) = [p for p in pods(kube, namespace, selector) if "deletionTimestamp" not in p["metadata"]]
    return str(pod["status"]["podIP"])


def test_the_network_policy_blocks_and_admits_what_it_says(
    chart_operator: Kube, namespaces: Callable[[str], str]
) -> None:
    kube = chart_operator
    namespace = namespaces("rn-policy")
    outsider_namespace = namespaces("rn-outsider")
    dns_ip = pod_ip(kube, "kube-system", "k8s-app=kube-dns")
    policy = {
        "allowedIngressPodLabels": {"role": "caller"},
        "allowedEgressCIDRs": [f"{dns_ip}/32"],
        "egressPorts": [8080],
    }
    apply(kube, agent_manifest(namespace, networkPolicy=policy))
    wait_phase(kube, namespace, "hello-agent", "Ready", timeout=120)
    (agent,) = agent_pods(kube, namespace, "hello-agent")
    agent_pod, agent_ip = agent["metadata"]["name"], agent["status"]["podIP"]

    caller = client_pod(kube, namespace, "caller", {"role": "caller"})
    stranger = client_pod(kube, namespace, "stranger", {"role": "other"})
    outsider = client_pod(kube, outsider_namespace, "outsider", {"role": "caller"})
    operator_pod = pods(kube, OPERATOR_NAMESPACE, OPERATOR_PODS)[0]["metadata"]["name"]
    # Ingress: the listed pods and the operator's namespace, nobody else.
    assert can_connect(kube, namespace, caller, agent_ip, 8080)
    assert can_connect(kube, OPERATOR_NAMESPACE, operator_pod, agent_ip, 8080)
    assert not can_connect(kube, namespace, stranger, agent_ip, 8080)
    assert not can_connect(kube, outsider_namespace, outsider, agent_ip, 8080)
    # Without the policy the stranger does get in: the refusal above is the policy's doing.
    apply(kube, agent_manifest(namespace, networkPolicy={**policy, "enabled": False}))
    wait_until(lambda: get(kube, namespace, "networkpolicy", "hello-agent") is None, timeout=60, what="policy gone")
    wait_until(lambda: can_connect(kube, namespace, stranger, agent_ip, 8080), timeout=60, what="admitted")
    apply(kube, agent_manifest(namespace, networkPolicy=policy))
    wait_until(lambda: get(kube, namespace, "networkpolicy", "hello-agent"), timeout=60, what="policy back")
    wait_until(lambda: not can_connect(kube, namespace, stranger, agent_ip, 8080), timeout=60, what="refused again")
    # Egress: DNS and the listed CIDR on the listed port; not another port there, not the API server.
    code = "import socket; print(socket.gethostbyname('kubernetes.default.svc.cluster.local'))"
    resolved = exec_python(kube, namespace, agent_pod, code)
    assert resolved.returncode == 0, resolved.stderr
    assert resolved.stdout.strip() == cluster_ip(kube, "default", "kubernetes")
    assert can_connect(kube, namespace, agent_pod, dns_ip, 8080)
    assert not can_connect(kube, namespace, agent_pod, dns_ip, 8181)
    assert not can_connect(kube, namespace, agent_pod, cluster_ip(kube, "default", "kubernetes"), 443)
    assert can_connect(
        kube, namespace, caller, cluster_ip(kube, "default", "kubernetes"), 443
    )  # not the network's fault


# -- SIGTERM ---------------------------------------------------------------------------------------


def test_a_deleted_pod_drains_without_failing_a_request(chart_operator: Kube, namespaces: Callable[[str], str]) -> None:
    """kubectl delete pod (as a drain or eviction does) under load through the Service: the pod
    leaves the endpoints, its preStop pause covers kube-proxy's update, SIGTERM closes the
    listener and in-flight requests finish; the container exits 0 well inside its grace period."""
    kube = chart_operator
    namespace = namespaces("rn-drain")
    apply(kube, agent_manifest(namespace, replicas=2))
    wait_phase(kube, namespace, "hello-agent", "Ready", timeout=120)
    wait_until(lambda: len(live_pods(kube, namespace, "hello-agent")) == 2, timeout=60, what="two pods")
    victim = live_pods(kube, namespace, "hello-agent")[0]["metadata"]["name"]
    url = f"http://{cluster_ip(kube, namespace, 'hello-agent')}/v1/operations/analyze_data"
    with SteadyLoad(url, ANALYZE, token_for(kube, namespace, "hello-agent")) as load:
        started = time.monotonic()
        kube.kubectl("delete", "pod", victim, "-n", namespace, "--wait=false")
        states = final_container_states(kube, namespace, victim)
        took = time.monotonic() - started
    print(f"requests across the drain: {load.result.total}, failed {load.result.failed}; pod gone in {took:.1f}s")
    assert load.result.failed == 0, dict(load.result.statuses)
    assert [state["exitCode"] for state in states] == [0], states
    assert took < 30  # terminationGracePeriodSeconds: it was not killed at the deadline


# -- the audit trail's appender killed in a real container ------------------------------------------


def appenders_in(pod: dict[str, Any]) -> list[int]:
    """The host PIDs of the audit appender processes in ``pod``'s containers (the real node is this
    host): a process running audit_appender.py whose cgroup is the pod's (its uid, in the cgroupfs or
    the systemd spelling). An exited one that is not yet reaped has no command line: not counted."""
    uid = pod["metadata"]["uid"]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command, cgroup = (entry / "cmdline").read_bytes(), (entry / "cgroup").read_text()
        except OSError:
            continue  # gone meanwhile
        if b"audit_appender.py" in command and (uid in cgroup or uid.replace("-", "_") in cgroup):
            found.append(int(entry.name))
    return found


def analyze_with_id(ip: str, token: str, request_id: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://{ip}:8080/v1/operations/analyze_data", data=ANALYZE, method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", "X-Request-ID": request_id},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read())


# Run in the agent's container: the trail verified with the agent's own keys, and the records' ids.
VERIFY_IN_POD = """
import json
from pathlib import Path
from agent_contract.keyfiles import KeyRing
from agent_contract.layout import DATA_DIR, KEYS_DIR
from agent_runtime.audit import verify_lines
lines = (Path(DATA_DIR) / "audit.log").read_text().splitlines(keepends=True)
result = verify_lines(lines, KeyRing.load(KEYS_DIR))
records = [json.loads(line) for line in lines]
print(json.dumps({"status": result.status.name, "describe": result.describe(), "records": [
    {"action": r["action"], "id": (r.get("details") or {}).get("client_request_id"),
     "refused": (r.get("details") or {}).get("refused_records")} for r in records]}))
"""


def test_an_audit_appender_killed_in_a_real_container_fails_closed_and_is_replaced(
    chart_operator: Kube, namespaces: Callable[[str], str]
) -> None:
    """kill -9 of the process that appends and fsyncs the audit trail, inside a running agent's
    container on the real node: the request whose record it would have written is refused 503
    audit_unavailable (never a 200 without its record), a new appender takes over within seconds,
    the container is not restarted, and the trail in the pod verifies with the agent's own keys:
    every answered request's record is in it, the refused one's is not, and the outage is recorded."""
    kube = chart_operator
    namespace = namespaces("rn-appender")
    apply(kube, agent_manifest(namespace))
    wait_phase(kube, namespace, "hello-agent", "Ready", timeout=120)
    (pod,) = live_pods(kube, namespace, "hello-agent")
    ip, token = pod["status"]["podIP"], token_for(kube, namespace, "hello-agent")
    statuses: dict[str, int] = {}  # by the request id sent

    def analyze(request_id: str) -> tuple[int, dict[str, Any]]:
        status, body = analyze_with_id(ip, token, request_id)
        statuses[request_id] = status
        return status, body

    assert analyze("before-the-kill")[0] == 200
    (appender,) = appenders_in(pod)
    os.kill(appender, signal.SIGKILL)
    wait_until(lambda: appender not in appenders_in(pod), timeout=10, what="the killed appender gone")
    status, body = analyze("after-the-kill")
    assert (status, body.get("code")) == (503, "audit_unavailable"), body
    # Request ids of 8 characters at least: shorter ones the runtime does not keep (X-Request-ID).
    wait_until(lambda: analyze(f"retry-{len(statuses):04d}")[0] == 200, timeout=20, interval=0.2, what="served again")
    (replacement,) = appenders_in(pod)
    assert replacement != appender
    (pod,) = live_pods(kube, namespace, "hello-agent")
    assert restarts(pod) == 0
    result = exec_python(kube, namespace, pod["metadata"]["name"], VERIFY_IN_POD)
    assert result.returncode == 0, result.stderr
    trail = json.loads(result.stdout)
    # Running: the records since the last checkpoint are not signed yet; the chain is intact.
    assert trail["status"] in ("UNSIGNED", "VERIFIED"), trail["describe"]
    recorded = {record["id"] for record in trail["records"]}
    answered = {request_id for request_id, status in statuses.items() if status == 200}
    assert set(statuses.values()) == {200, 503}, statuses  # refused (fail closed) or answered and recorded
    assert answered <= recorded
    assert not (set(statuses) - answered) & recorded
    outages = [record for record in trail["records"] if record["action"] == "unavailable"]
    assert outages
    assert outages[0]["refused"] >= 1


# -- shared state: three replicas on a PostgreSQL in the cluster -----------------------------------


def post_to(ip: str, path: str, token: str, body: bytes = ANALYZE) -> int:
    request = urllib.request.Request(
        f"http://{ip}:8080{path}", data=body, method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_three_replicas_share_one_postgresql_in_the_cluster(chart_operator: Kube) -> None:
    """examples/shared-state-db (a PostgreSQL StatefulSet) and examples/shared-state.yaml (three
    replicas) applied as they are: a token logged out on one pod is refused by the other two."""
    kube = chart_operator
    kube.kubectl("apply", "-f", str(ROOT / "examples" / "shared-state-db" / "postgres.yaml"))
    kube.kubectl("rollout", "status", "statefulset/shared-db", "-n", "default", "--timeout=120s")
    kube.kubectl("apply", "-f", str(ROOT / "examples" / "shared-state.yaml"))
    agent = wait_phase(kube, "default", "shared-agent", "Ready", timeout=180)
    assert condition(agent, "SharedStateMissing")["status"] == "False"
    running = wait_until(
        lambda: live_pods(kube, "default", "shared-agent") if len(live_pods(kube, "default", "shared-agent")) == 3
        else None, timeout=60, what="three pods",
    )  # fmt: skip
    ips = [pod["status"]["podIP"] for pod in running]
    for pod in running:
        assert restarts(pod) == 0
        state = readyz(kube, "default", pod["metadata"]["name"])["checks"]["state"]
        assert state["backend"] == "postgres", state
    token = token_for(kube, "default", "shared-agent")
    assert [post_to(ip, "/v1/operations/analyze_data", token) for ip in ips] == [200, 200, 200]
    assert post_to(ips[0], "/v1/auth/logout", token, b"{}") in (200, 204)
    assert [post_to(ip, "/v1/operations/analyze_data", token) for ip in ips[1:]] == [401, 401]


# -- the model: chat from a real pod, its key from a Secret, a rotated key rolled out ---------------


class ModelOnTheNode:
    """The fake OpenAI-compatible endpoint (tests/fake_model.py) on the node's bridge address, where
    pods reach the host, served from a thread of its own while the test drives kubectl."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.fake = FakeModel(host=NODE_IP)

    def __enter__(self) -> FakeModel:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(timeout=30)
        return self.fake

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


def chat(url: str, token: str, text: str, stream: bool = False) -> tuple[int, str]:
    body = json.dumps({"input": {"messages": [{"role": "user", "content": text}]}}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if stream:
        headers["Accept"] = "text/event-stream"
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


def test_chat_reaches_the_model_with_the_key_from_its_secret_and_a_rotated_key_rolls_out(
    chart_operator: Kube, namespaces: Callable[[str], str]
) -> None:
    """spec.model on a real pod: the NetworkPolicy admits the endpoint (an IP literal) and nothing
    else is needed; the key arrives as the Secret holds it; whole and streamed answers; rotating the
    key's Secret, without touching the agent, rolls out pods that send the new key."""
    kube = chart_operator
    namespace = namespaces("rn-model")
    kube.kubectl("create", "secret", "generic", "model-credentials", "-n", namespace, "--from-literal=api-key=sk-first")
    with ModelOnTheNode() as fake:
        model = {
            "baseUrl": fake.base_url, "model": "test-model",
            "apiKeySecretRef": {"name": "model-credentials", "key": "api-key"},
        }  # fmt: skip
        # Manual: the analysis before promotion (where tokensPerRequest runs) can be read while it waits.
        rollout = {
            "promotion": "Manual", "analysis": {"windowSeconds": 0, "maxTokensPerRequestRatio": 2},
            "scaleDownDelaySeconds": 0,
        }  # fmt: skip
        apply(kube, agent_manifest(
            namespace, operations=["analyze_data", "chat"], securityLevel="confidential", model=model, rollout=rollout,
        ))  # fmt: skip
        first = wait_phase(kube, namespace, "hello-agent", "Ready", timeout=120)
        url = f"http://{cluster_ip(kube, namespace, 'hello-agent')}/v1/operations/chat"
        token = token_for(kube, namespace, "hello-agent")

        status, answer = chat(url, token, "hello from a real pod")
        assert status == 200, answer
        assert json.loads(answer)["result"]["usage"]["input_tokens"] == 5  # the fake counts words
        assert fake.received[-1].authorization == "Bearer sk-first"
        assert fake.received[-1].body["model"] == "test-model"

        status, events = chat(url, token, "stream these words back", stream=True)
        assert status == 200, events
        assert "event: done" in events
        assert "".join(
            json.loads(line[len("data: "):]).get("delta", "")
            for line in events.splitlines() if line.startswith("data: ") and '"delta"' in line
        ).split() == ["you", "said:", "stream", "these", "words", "back"]  # fmt: skip
        assert fake.received[-1].stream

        kube.kubectl(
            "patch", "secret", "model-credentials", "-n", namespace, "--type=merge",
            "-p", json.dumps({"stringData": {"api-key": "sk-second"}}),
        )  # fmt: skip
        waiting = wait_until(
            lambda: agent if ((agent := get(kube, namespace, "ea", "hello-agent") or {}).get("status") or {})
            .get("rollout", {}).get("step") == "AwaitingPromotion" else None,
            timeout=120, interval=1, what="the rotation's rollout awaiting promotion",
        )  # fmt: skip
        assert waiting["metadata"]["generation"] == first["metadata"]["generation"]  # the agent was not edited
        checks = {check["name"]: check for check in waiting["status"]["rollout"]["analysis"]}
        assert checks["tokensPerRequest"]["result"] == "Passed", checks
        promoted = kubectl_ea(kube, "promote", "hello-agent", "-n", namespace)
        assert promoted.returncode == 0, promoted.stderr
        wait_rollout_done(kube, namespace, "hello-agent", first["status"]["activeRevision"])
        wait_until(
            lambda: len(live_pods(kube, namespace, "hello-agent")) == 1, timeout=90, interval=1, what="one pod left"
        )
        status, answer = chat(url, token_for(kube, namespace, "hello-agent"), "after the rotation")
        assert status == 200, answer
        assert fake.received[-1].authorization == "Bearer sk-second"
