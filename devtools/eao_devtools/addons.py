"""What a real node's cluster runs beside the kubelet, as kind does:

- **cluster DNS**: CoreDNS (built from hack/coredns's pinned module) as a pod in kube-system behind
  the ``kube-dns`` Service at the address the kubelet hands pods, so Service names resolve in pods
  and a NetworkPolicy's DNS rule meets a real DNS pod on port 53. It answers for cluster.local only:
  nothing is forwarded off the machine.
- **NetworkPolicy**: kube-router (hack/kube-router) as a host process with only its firewall
  (no routing, no service proxy, no CNI), since the CNI bridge plugin enforces no policy. Its
  chains and ipsets go with the node's host snapshot when the cluster stops.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from eao_devtools.node import NODE_NAME

COREDNS_IMAGE = "eao.local/coredns:v1.15.0"  # the version hack/coredns/go.mod pins
DNS_NAMESPACE = "kube-system"
DNS_LABELS = {"k8s-app": "kube-dns"}
KUBE_ROUTER_USER = "system:kube-router"
COREDNS_UID = 65532

_COREFILE = """\
.:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    cache 5
    loop
    reload
}
"""


def _read_only(*resources: str, group: str = "") -> dict[str, Any]:
    return {"apiGroups": [group], "resources": list(resources), "verbs": ["get", "list", "watch"]}


def dns_manifests(cluster_dns: str) -> list[dict[str, Any]]:
    """CoreDNS's ServiceAccount, rights, Corefile, Deployment and the kube-dns Service."""
    meta = {"namespace": DNS_NAMESPACE, "labels": dict(DNS_LABELS)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                _read_only("services", "pods", "namespaces"),
                _read_only("endpointslices", group="discovery.k8s.io"),
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": DNS_NAMESPACE}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", **meta},
            "data": {"Corefile": _COREFILE},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", **meta},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": dict(DNS_LABELS)},
                "template": {"metadata": {"labels": dict(DNS_LABELS)}, "spec": _coredns_pod()},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", **meta},
            "spec": {
                "clusterIP": cluster_dns,
                "selector": dict(DNS_LABELS),
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        },
    ]


def _coredns_pod() -> dict[str, Any]:
    return {
        "serviceAccountName": "coredns",
        "priorityClassName": "system-cluster-critical",
        "dnsPolicy": "Default",  # DNS must not ask itself
        "securityContext": {
            "runAsUser": COREDNS_UID,
            "runAsGroup": COREDNS_UID,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
            # Port 53 without root or capabilities: a namespaced, "safe" sysctl of the pod's own netns.
            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}],
        },
        "containers": [
            {
                "name": "coredns",
                "image": COREDNS_IMAGE,
                "imagePullPolicy": "Never",
                "args": ["-conf", "/etc/coredns/Corefile"],
                "ports": [
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                ],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
                "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
            }
        ],
        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
    }


def kube_router_rbac() -> list[dict[str, Any]]:
    """What kube-router's firewall reads (it writes nothing to the API)."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "eao:kube-router"},
            "rules": [
                _read_only("namespaces", "pods", "services", "endpoints", "nodes"),
                _read_only("networkpolicies", group="networking.k8s.io"),
                _read_only("endpointslices", group="discovery.k8s.io"),
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "eao:kube-router"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "eao:kube-router"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": KUBE_ROUTER_USER}],
        },
    ]


def kube_router_command(bin_dir: Path, kubeconfig: Path) -> list[str]:
    return [
        str(bin_dir / "kube-router"),
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={NODE_NAME}",
        "--run-firewall=true",
        "--run-router=false",
        "--run-service-proxy=false",
        "--enable-cni=false",
        "--enable-ipv6=false",
        "--health-port=0",  # its health server would listen on every address; readiness is its chains
        "--metrics-port=0",
        "--iptables-sync-period=5s",
        "--v=1",
    ]


def kube_router_ready() -> bool:
    """kube-router has synced once when its top-level filter chain exists."""
    result = subprocess.run(
        ["/usr/sbin/iptables", "-w", "5", "-S", "KUBE-ROUTER-FORWARD"], capture_output=True, check=False
    )
    return result.returncode == 0
