"""The local control plane is a real Kubernetes API: the behaviours the operator relies on."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from agent_operator.manifest import dump_yaml_all, load_agents
from agent_operator.render import RenderPlan, build_children
from eao_devtools.testkit.kube import Kube
from tests.helpers import BAD, ROOT, header_values

pytestmark = pytest.mark.cluster


def wait_until(condition: object, timeout: float = 60, interval: float = 0.25) -> None:
    """Polls ``condition()`` until it is true; fails with its last value after ``timeout``."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)


def test_crd_is_established_with_printer_columns(crd_installed: Kube) -> None:
    crd = json.loads(crd_installed.kubectl("get", "crd", "enterpriseagents.agents.enterprise.io", "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    # The OpenAPI document that explain reads is republished a moment after the CRD changes.
    wait_until(lambda: crd_installed.kubectl("explain", "ea.spec.rollout", check=False).returncode == 0, timeout=60)
    explain = crd_installed.kubectl("explain", "ea.spec.rollout").stdout
    assert "promotion" in explain
    assert "Auto promotes after analysis" in explain


def test_rendered_agent_children_reach_available_with_ready_endpoints(crd_installed: Kube, namespace: str) -> None:
    """Applying what the renderer makes to a real API server: it is accepted, the Deployment
    becomes Available with kwok's simulated pods, and the Service lists ready endpoints."""
    text = (ROOT / "examples" / "minimal.yaml").read_text().replace("namespace: default", f"namespace: {namespace}")
    (agent,) = load_agents(text)
    children = build_children(agent, RenderPlan.initial(agent))
    crd_installed.kubectl("apply", "--server-side", "--field-manager=test", "-f", "-", stdin=dump_yaml_all(children))
    crd_installed.kubectl(
        "wait", "-n", namespace, "--for=condition=Available", "deployment/hello-agent-blue", "--timeout=90s"
    )

    def ready_endpoints() -> int:
        slices = json.loads(
            crd_installed.kubectl(
                "get", "endpointslices", "-n", namespace, "-l", "kubernetes.io/service-name=hello-agent", "-o", "json"
            ).stdout
        )
        return sum(1 for s in slices["items"] for e in s.get("endpoints") or [] if e["conditions"].get("ready"))

    wait_until(lambda: ready_endpoints() == agent.spec.replicas, timeout=60)


def test_owner_reference_garbage_collection(kube: Kube, namespace: str) -> None:
    kube.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = kube.kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "namespace": namespace,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    kube.kubectl("apply", "-f", "-", stdin=json.dumps(child))
    kube.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_until(
        lambda: kube.kubectl("get", "configmap", "child", "-n", namespace, check=False).returncode != 0, timeout=60
    )


def test_server_side_apply_field_managers_and_conflicts(kube: Kube, namespace: str) -> None:
    def manifest(value: str) -> str:
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "shared", "namespace": namespace},
                "data": {"x": value},
            }
        )

    kube.kubectl("apply", "--server-side", "--field-manager=alice", "-f", "-", stdin=manifest("1"))
    conflict = kube.kubectl(
        "apply", "--server-side", "--field-manager=bob", "-f", "-", stdin=manifest("2"), check=False
    )
    assert conflict.returncode != 0
    assert "conflict" in conflict.stderr.lower()
    assert 'conflict with "alice": .data.x' in conflict.stderr
    # Re-applying the same value as a second manager is not a conflict: both now co-own it.
    kube.kubectl("apply", "--server-side", "--field-manager=bob", "-f", "-", stdin=manifest("1"))
    kube.kubectl("apply", "--server-side", "--field-manager=carol", "--force-conflicts", "-f", "-", stdin=manifest("3"))
    shared = json.loads(
        kube.kubectl("get", "configmap", "shared", "-n", namespace, "--show-managed-fields", "-o", "json").stdout
    )
    assert shared["data"] == {"x": "3"}
    owners = {m["manager"] for m in shared["metadata"]["managedFields"] if "f:x" in json.dumps(m.get("fieldsV1", {}))}
    assert owners == {"carol"}


API_CHECKED = [p for p in BAD if header_values(p, "api") != ["skip"]]


@pytest.mark.parametrize("path", API_CHECKED, ids=lambda p: p.name)
def test_bad_manifests_at_kubectl_apply(crd_installed: Kube, namespace: str, path: Path) -> None:
    """The real API server's schema and CEL rules refuse each bad manifest, naming the field;
    those marked `api: accepts` are left to the operator."""
    (expected,) = header_values(path, "expect")
    # create, not apply: apply first GETs the object, and a hostile name fails that lookup instead.
    result = crd_installed.kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    if header_values(path, "api") == ["accepts"]:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0, f"{path.name} was accepted"
        assert expected in result.stderr, result.stderr


def test_cel_rule_message_reaches_the_user(crd_installed: Kube, namespace: str) -> None:
    result = crd_installed.kubectl(
        "apply", "-n", namespace, "-f", str(ROOT / "tests" / "bad" / "min-greater-than-max.yaml"), check=False
    )
    assert result.returncode != 0
    assert "spec.autoscaling.minReplicas must be less than or equal to maxReplicas" in result.stderr


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("model-url-with-credentials.yaml", "must not carry credentials"),
        ("model-url-with-query.yaml", "must not have a query or fragment"),
    ],
)
def test_a_secret_bearing_model_url_is_refused_with_its_reason(
    crd_installed: Kube, namespace: str, name: str, reason: str
) -> None:
    """Beyond the pattern's bare mismatch, the CEL rule says why (a pattern error does not stop
    the API server from running CEL rules)."""
    path = ROOT / "tests" / "bad" / name
    result = crd_installed.kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode != 0
    assert f"spec.model.baseUrl {reason}" in result.stderr, result.stderr


def test_examples_are_accepted_by_the_api_server(crd_installed: Kube, namespace: str) -> None:
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        document = yaml.safe_load(example.read_text())
        document["metadata"]["namespace"] = namespace
        result = crd_installed.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(document), check=False)
        assert result.returncode == 0, f"{example.name}: {result.stderr}"


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets a process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addresses = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(local.split(":")[0])
            # /proc prints addresses as native-endian 32-bit words.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addresses.append(socket.inet_ntop(family, packed))
    return addresses


def test_nothing_listens_beyond_loopback(kube: Kube) -> None:
    if kube.local is None:
        pytest.skip("only the local control plane's processes are ours to inspect")
    pids = kube.local.pids()
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
    seen = {}
    for name, pid in pids.items():
        addresses = _listening_addresses(pid)
        assert addresses, f"{name} listens on nothing?"
        seen[name] = addresses
    assert all(address in ("127.0.0.1", "::1") for addresses in seen.values() for address in addresses), seen


def test_cluster_status_command(kube: Kube) -> None:
    if kube.local is None:
        pytest.skip("status describes the local control plane")
    import sys

    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "eao-dev"),
            "cluster",
            "status",
            "--state-dir",
            str(kube.local.state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kube-apiserver           running" in result.stdout
    assert "api                      ready" in result.stdout
