"""The local control plane: a real Kubernetes API on 127.0.0.1, built from Go modules.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as plain processes, and kwok
plays the kubelet for a few simulated nodes, so Deployments become Available and EndpointSlices
list ready endpoints without containers. Everything listens on loopback only. Tests and ``make run``
use it through a kubeconfig, exactly as they would use any other cluster.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from eao_devtools import addons
from eao_devtools.checkout import REPO_ROOT_VARIABLE, repo_root
from eao_devtools.imagebuild import BuiltImage, ImageBuildError, build_images, build_postgres_image
from eao_devtools.images import write_single_layer_image
from eao_devtools.node import NODE_IP, NODE_NAME, PAUSE_IMAGE, POD_CIDR, NodeError, RealNode

KUBERNETES_VERSION = "v1.34.4"
LOOPBACK = "127.0.0.1"
# Services and (kwok's) pods take addresses from 198.18.0.0/15, the range reserved for network
# testing, so no cluster address can be mistaken for a real network. The real node's bridge and pods
# use 198.18.0.0/24 (eao_devtools.node).
SERVICE_CIDR = "198.18.128.0/17"
CLUSTER_DNS = "198.18.128.10"
KWOK_POD_CIDR = "198.19.0.1/16"
NODE_COUNT = 3
# Components in start order; stopped in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# With a real node, started after the control plane in this order (and stopped in reverse).
NODE_COMPONENTS = ("containerd", "kubelet", "kube-proxy", "kube-router")
# Go modules under hack/controlplane and the binaries each builds.
GO_MODULES = {
    ".": ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"),
    "etcd": ("etcd",),
    "kwok": ("kwok",),
}
# Packaging tools built from hack/tools (versions pinned in its go.mod).
HELM_VERSION = "v3.22.0"
TOOL_PACKAGES = ("helm.sh/helm/v3/cmd/helm", "github.com/prometheus/prometheus/cmd/promtool", "./kstatus")
# Its module carries the monitoring.coreos.com CRDs the chart's ServiceMonitor and PrometheusRule must fit.
PROMETHEUS_OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator@v0.85.0"


class ClusterError(RuntimeError):
    """A control plane step failed; the message names the component and its log file."""


def _hack_source(name: str) -> Path:
    source = repo_root() / "hack" / name
    if not (source / "go.mod").is_file():
        raise ClusterError(
            f"{name} is built from {source}, which is missing: use a checkout of the repository"
            f" (or set {REPO_ROOT_VARIABLE} to one)"
        )
    return source


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "enterprise-agent-operator"


def default_state_dir() -> Path:
    return cache_root() / "clusters" / "local"


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise ClusterError("Go is needed to build the local control plane (go was not found on PATH)")
    return go


def release_go_caches() -> None:
    """Deletes Go's build and module caches: only the builds above need them, and their programs
    are kept in the cache_root() folders. Best effort: a cache left behind fails nothing. (One test
    still downloads the Prometheus Operator's module for its CRDs, from the module proxy.)"""
    try:
        subprocess.run([_go(), "clean", "-cache", "-modcache"], check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ClusterError) as error:
        _say(f"warning: Go's caches were not deleted: {error}")


def _source_key(source: Path, version: str) -> str:
    """Cache key: the pinned versions (go.mod/go.sum), the mains and the Go toolchain."""
    digest = hashlib.sha256()
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.name in ("go.mod", "go.sum", "main.go"):
            digest.update(str(path.relative_to(source)).encode())
            digest.update(path.read_bytes())
    go_version = subprocess.run([_go(), "env", "GOVERSION"], capture_output=True, text=True, check=True).stdout.strip()
    digest.update(go_version.encode())
    return f"{version}-{digest.hexdigest()[:12]}"


def _build_once(
    name: str, version: str, builds: dict[str, tuple[str, ...]], ldflags: str, env: dict[str, str] | None = None
) -> Path:
    """Builds the Go programs under hack/<name> once per source version; returns their directory.

    ``builds`` maps a module folder (relative to hack/<name>) to the packages built there; each
    package's binary is named after its last path element (the module folder's name for ".").
    """
    source = _hack_source(name)
    bin_dir = cache_root() / name / _source_key(source, version) / "bin"
    wanted = [_binary_name(module, package) for module, packages in builds.items() for package in packages]
    if all((bin_dir / binary).is_file() for binary in wanted):
        return bin_dir
    bin_dir.mkdir(parents=True, exist_ok=True)
    build_log = bin_dir.parent / "build.log"
    with build_log.open("w") as out:
        for module, packages in builds.items():
            command = [_go(), "build", "-trimpath", "-ldflags", ldflags, "-o", f"{bin_dir}/", *packages]
            names = ", ".join(_binary_name(module, package) for package in packages)
            _say(f"building {names} (log: {build_log})")
            result = subprocess.run(
                command,
                cwd=source / module,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
                env={**os.environ, **(env or {})},
            )
            if result.returncode != 0:
                raise ClusterError(f"building {names} failed (exit {result.returncode}); see {build_log}")
    return bin_dir


def _binary_name(module: str, package: str) -> str:
    return Path(module if package == "." else package).name


def _kube_ldflags() -> str:
    return (
        "-s -w"
        f" -X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION}"
        f" -X k8s.io/component-base/version.gitMajor={KUBERNETES_VERSION.split('.')[0].lstrip('v')}"
        f" -X k8s.io/component-base/version.gitMinor={KUBERNETES_VERSION.split('.')[1]}"
        " -X k8s.io/component-base/version.gitTreeState=clean"
    )


def ensure_binaries() -> Path:
    """The control plane binaries (and kubectl), built once per pinned version."""
    builds = {
        module: tuple(f"./{name}" for name in names) if module == "." else (".",)
        for module, names in GO_MODULES.items()
    }
    return _build_once("controlplane", KUBERNETES_VERSION, builds, _kube_ldflags())


@dataclass(frozen=True)
class NodeBinaries:
    kube: Path  # kubelet and kube-proxy
    pause: Path
    coredns: Path
    kube_router: Path


def ensure_node_binaries() -> NodeBinaries:
    """kubelet and kube-proxy (same module and version as the control plane, several minutes cold),
    the static pause program, CoreDNS (static: it runs alone in its image) and kube-router."""
    static = {"CGO_ENABLED": "0"}
    return NodeBinaries(
        kube=_build_once("controlplane", KUBERNETES_VERSION, {".": ("./kubelet", "./kube-proxy")}, _kube_ldflags()),
        pause=_build_once("node", "v1", {".": ("./pause",)}, "-s -w"),
        coredns=_build_once("coredns", "v1", {".": ("github.com/coredns/coredns",)}, "-s -w", static),
        kube_router=_build_once(
            "kube-router", "v1", {".": ("github.com/cloudnativelabs/kube-router/v2/cmd/kube-router",)}, "-s -w"
        ),
    )


def ensure_tools() -> Path:
    """helm, promtool and kstatus for the packaging tests, built once from hack/tools' pinned modules."""
    # helm renders for the control plane's Kubernetes version unless told otherwise (its Makefile's flags).
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    ldflags = f"-s -w -X helm.sh/helm/v3/internal/version.version={HELM_VERSION}" + "".join(
        f" -X helm.sh/helm/v3/pkg/{package}.k8sVersionMajor={major} -X helm.sh/helm/v3/pkg/{package}.k8sVersionMinor={minor}"
        for package in ("chartutil", "lint/rules")
    )
    return _build_once("tools", f"{HELM_VERSION}-kube{KUBERNETES_VERSION}", {".": TOOL_PACKAGES}, ldflags)


def prometheus_operator_crds() -> Path:
    """The Prometheus Operator's CRDs at a pinned version, from the Go module proxy (checksum-verified
    like any module); returns their folder."""
    cache_root().mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [_go(), "mod", "download", "-json", PROMETHEUS_OPERATOR_MODULE],
        cwd=cache_root(),  # outside any module
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ClusterError(f"go mod download {PROMETHEUS_OPERATOR_MODULE} failed: {result.stdout} {result.stderr}")
    return Path(json.loads(result.stdout)["Dir"]) / "example" / "prometheus-operator-crd"


def _say(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


# --- certificates ---------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    organization: str | None = None,
    server_names: tuple[str, ...] = (),
    server_ips: tuple[str, ...] = (),
) -> x509.Certificate:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    name = x509.Name(attributes)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server_names or server_ips else []
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if server_names or server_ips:
            alt: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
            alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# Client identities: (file stem, common name, organization).
_CLIENTS = (
    ("admin", "admin", "system:masters"),
    ("controller-manager", "system:kube-controller-manager", None),
    ("scheduler", "system:kube-scheduler", None),
    ("kwok", "kwok-controller", "system:masters"),
    # The API server's identity towards kubelets (logs, exec, port-forward on a real node).
    ("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"),
)


# With a real node: its kubelet's identity (the Node authorizer knows it by this name) and kube-proxy's.
_NODE_CLIENTS = (
    ("kubelet", f"system:node:{NODE_NAME}", "system:nodes"),
    ("kube-proxy", "system:kube-proxy", None),
    ("kube-router", addons.KUBE_ROUTER_USER, None),
)


def generate_pki(pki: Path, real_node: bool = False) -> None:
    """A CA, the API server's serving certificate, client certificates and the service-account key;
    with a real node also its kubelet's serving and client certificates and kube-proxy's."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _certificate("local-control-plane-ca", ca_key, None)
    _write_key(pki / "ca.key", ca_key)
    _write_cert(pki / "ca.crt", ca)
    service_ip = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
    server_key = _key()
    server = _certificate(
        "kube-apiserver",
        server_key,
        (ca, ca_key),
        server_names=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
        server_ips=(LOOPBACK, service_ip, *((NODE_IP,) if real_node else ())),
    )
    _write_key(pki / "apiserver.key", server_key)
    _write_cert(pki / "apiserver.crt", server)
    for stem, common_name, organization in _CLIENTS + (_NODE_CLIENTS if real_node else ()):
        key = _key()
        _write_key(pki / f"{stem}.key", key)
        _write_cert(pki / f"{stem}.crt", _certificate(common_name, key, (ca, ca_key), organization=organization))
    if real_node:
        serving_key = _key()
        _write_key(pki / "kubelet-serving.key", serving_key)
        serving = _certificate(
            f"system:node:{NODE_NAME}", serving_key, (ca, ca_key), "system:nodes", (NODE_NAME,), (NODE_IP,)
        )
        _write_cert(pki / "kubelet-serving.crt", serving)
    sa_key = _key()
    _write_key(pki / "service-account.key", sa_key)
    (pki / "service-account.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _kubeconfig(server: str, pki: Path, user: str) -> str:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(pki / f"{user}.crt"), "client-key": str(pki / f"{user}.key")},
            }
        ],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user, "namespace": "default"}}],
        "current-context": "local",
    }
    return yaml.safe_dump(config, sort_keys=False)


# --- processes ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Cluster:
    """One local control plane, described by the files in its state directory."""

    state_dir: Path

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.logs / "audit.log"

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _load_state(self) -> dict[str, object]:
        if not self._state_file.is_file():
            return {}
        state: dict[str, object] = json.loads(self._state_file.read_text())
        return state

    def _save_state(self, state: dict[str, object]) -> None:
        self._state_file.write_text(json.dumps(state, indent=2))

    def pids(self) -> dict[str, int]:
        raw = self._load_state().get("pids", {})
        assert isinstance(raw, dict)
        return {name: int(pid) for name, pid in raw.items()}

    def ports(self) -> dict[str, int]:
        raw = self._load_state().get("ports", {})
        assert isinstance(raw, dict)
        return {name: int(port) for name, port in raw.items()}

    def running(self) -> dict[str, bool]:
        state = self._load_state()
        binaries = state.get("binaries", "")
        return {
            name: _is_our_process(pid, str(binaries)) or _is_node_process(pid, name)
            for name, pid in self.pids().items()
        }

    # -- up ----------------------------------------------------------------------------------------

    @property
    def node(self) -> RealNode:
        return RealNode(self.state_dir / "node")

    def has_real_node(self) -> bool:
        return bool(self._load_state().get("real_node"))

    def up(self, nodes: int = NODE_COUNT, real_node: bool = False) -> dict[str, float]:
        """Builds (first time), starts every component and waits until the cluster is usable.
        With ``real_node``, one real node (kubelet, containerd, kube-proxy) instead of kwok's
        simulated ones. Returns timings in seconds."""
        if any(self.running().values()):
            if self.healthy() and self.has_real_node() == real_node:
                _say(f"already running; KUBECONFIG={self.kubeconfig}")
                return {}
            self.down()
        started = time.monotonic()
        bin_dir = ensure_binaries()
        node_bins = ensure_node_binaries() if real_node else None
        images: list[BuiltImage] = []
        if real_node:
            try:
                images = build_images(cache_root() / "images", say=_say)
                images.append(build_postgres_image(cache_root() / "images", say=_say))
            except ImageBuildError as error:
                raise ClusterError(str(error)) from None
        built = time.monotonic()
        host = LOOPBACK
        if real_node:
            try:
                self.node.prepare_host()
            except NodeError as error:
                raise ClusterError(str(error)) from None
            host = NODE_IP  # pods reach the API server on the node's bridge address
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.logs.exists():
            shutil.rmtree(self.logs)
        self.logs.mkdir()
        etcd_data = self.state_dir / "etcd-data"
        if etcd_data.exists():
            shutil.rmtree(etcd_data)  # a fresh cluster each time: tests must not depend on leftovers
        generate_pki(self.pki, real_node)
        ports = {
            name: _free_port() for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")
        }
        server = f"https://{host}:{ports['apiserver']}"
        users = ("admin", "controller-manager", "scheduler", "kwok") + (
            ("kubelet", "kube-proxy", "kube-router") if real_node else ()
        )
        for user in users:
            (self.state_dir / f"{user}.kubeconfig").write_text(_kubeconfig(server, self.pki, user))
        shutil.copy(self.state_dir / "admin.kubeconfig", self.kubeconfig)
        audit_policy = self.state_dir / "audit-policy.yaml"
        audit_policy.write_text(_AUDIT_POLICY)
        commands = self._commands(bin_dir, ports, etcd_data, audit_policy, host)
        components: tuple[str, ...] = COMPONENTS
        if node_bins is not None:
            kubeconfigs = {user: self.state_dir / f"{user}.kubeconfig" for user in ("kubelet", "kube-proxy")}
            self.node.write_configs(kubeconfigs, self.pki, CLUSTER_DNS, SERVICE_CIDR)
            commands |= self.node.commands(node_bins.kube, kubeconfigs)
            commands["kube-router"] = addons.kube_router_command(
                node_bins.kube_router, self.state_dir / "kube-router.kubeconfig"
            )
            components = COMPONENTS + NODE_COMPONENTS
        state: dict[str, object] = {
            "binaries": str(bin_dir),
            "ports": ports,
            "server": server,
            "pids": {},
            "real_node": real_node,
            "commands": commands,
        }
        # kwok reads its --config as it starts: the (empty: its defaults) file exists before it does.
        # Touched only after the start, a fast kwok found none and exited (a CI run did).
        (self.state_dir / "kwok.yaml").touch()
        pids: dict[str, int] = {}
        for name in components:
            if name == "kube-router":
                self._wait_real_node()  # its firewall needs the Node and its podCIDR
            log_path = self.logs / f"{name}.log"
            with log_path.open("w") as log_file:
                process = subprocess.Popen(
                    commands[name],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            pids[name] = process.pid
            state["pids"] = pids
            self._save_state(state)
            self._wait_started(name, process, ports)
            if name == "containerd" and node_bins is not None:
                self._import_images(node_bins, images)
        if real_node:
            self._start_dns()
        else:
            self._register_nodes(bin_dir, nodes)
        ready = time.monotonic()
        timings = {"build_seconds": built - started, "start_seconds": ready - built, "total_seconds": ready - started}
        state["timings"] = timings
        self._save_state(state)
        return timings

    def _commands(
        self, bin_dir: Path, ports: dict[str, int], etcd_data: Path, audit_policy: Path, host: str
    ) -> dict[str, list[str]]:
        pki, sd = self.pki, self.state_dir
        etcd_url = f"http://{LOOPBACK}:{ports['etcd']}"
        return {
            "etcd": [
                str(bin_dir / "etcd"),
                "--name=local",
                f"--data-dir={etcd_data}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://{LOOPBACK}:{ports['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://{LOOPBACK}:{ports['etcd-peer']}",
                f"--initial-cluster=local=http://{LOOPBACK}:{ports['etcd-peer']}",
                "--unsafe-no-fsync",  # a throwaway test cluster: speed over durability
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
            "kube-apiserver": [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={host}",
                f"--advertise-address={host}",
                f"--secure-port={ports['apiserver']}",
                # For logs, exec and port-forward on a real node (its kubelet serves with our CA).
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                f"--kubelet-certificate-authority={pki / 'ca.crt'}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'service-account.pub'}",
                f"--service-account-signing-key-file={pki / 'service-account.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=false",
                "--profiling=false",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-mode=blocking",
                "--audit-log-format=json",
                "--audit-log-maxsize=200",
                # OpenShift's default: a child with blockOwnerDeletion needs update on its owner's
                # finalizers. On here so the chart's RBAC is tested against it.
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                "--v=1",
            ],
            "kube-controller-manager": [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={sd / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={sd / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={sd / 'controller-manager.kubeconfig'}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={ports['controller-manager']}",
                f"--cert-dir={sd / 'controller-manager-certs'}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'service-account.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                # HPA needs the metrics API, which kwok does not serve; it reports that in its status.
                "--controllers=*",
                "--node-monitor-grace-period=2m",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
                "--concurrent-gc-syncs=20",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--v=1",
            ],
            "kube-scheduler": [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={sd / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={sd / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={sd / 'scheduler.kubeconfig'}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={ports['scheduler']}",
                f"--cert-dir={sd / 'scheduler-certs'}",
                "--leader-elect=false",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--v=1",
            ],
            "kwok": [
                str(bin_dir / "kwok"),
                f"--kubeconfig={sd / 'kwok.kubeconfig'}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--disregard-status-with-annotation-selector=kwok.x-k8s.io/status=custom",
                f"--node-ip={LOOPBACK}",
                # Nodes renew Leases, as kubelets do; without them the node lifecycle controller
                # declares the nodes unreachable after its grace period and marks every pod NotReady.
                "--node-lease-duration-seconds=40",
                f"--server-address={LOOPBACK}:{ports['kwok']}",
                f"--cidr={KWOK_POD_CIDR}",
                f"--config={sd / 'kwok.yaml'}",
            ],
        }

    def _wait_started(
        self, name: str, process: subprocess.Popen[bytes], ports: dict[str, int], timeout: float = 90
    ) -> None:
        """Waits for a component's health endpoint; fails with its log file if it dies or stalls."""
        checks = {
            "etcd": f"http://{LOOPBACK}:{ports['etcd']}/health",
            "kube-apiserver": f"{self._load_state().get('server')}/readyz",
            "kubelet": "http://127.0.0.1:10248/healthz",
            "kube-proxy": "http://127.0.0.1:10256/healthz",
            "kube-router": "",  # no health port (it would listen on every address): its chains tell
            "kube-controller-manager": f"https://{LOOPBACK}:{ports['controller-manager']}/healthz",
            "kube-scheduler": f"https://{LOOPBACK}:{ports['scheduler']}/healthz",
            "kwok": f"http://{LOOPBACK}:{ports['kwok']}/healthz",
        }
        log_path = self.logs / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ClusterError(f"{name} exited with code {process.returncode} while starting; see {log_path}")
            if name == "containerd":
                try:
                    self.node.wait_containerd(timeout=max(0.0, deadline - time.monotonic()))
                except NodeError as error:
                    raise ClusterError(f"{error}; see {log_path}") from None
                return
            if addons.kube_router_ready() if name == "kube-router" else self._probe(checks[name]):
                return
            time.sleep(0.2)
        raise ClusterError(f"{name} did not become healthy within {timeout:.0f}s; see {log_path}")

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        # The controller manager and scheduler serve self-signed certificates of their own.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    def _probe(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=self._ssl_context()) as response:  # noqa: S310 - our loopback URL
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    @property
    def server_url(self) -> str:
        return str(self._load_state().get("server", ""))

    def compact_etcd(self) -> int:
        """Drops etcd's history up to now, as the API server does every five minutes; a watch
        resuming from before that gets 410 Gone and must relist. Returns the revision."""
        ports = self._load_state().get("ports")
        assert isinstance(ports, dict)
        url = f"http://{LOOPBACK}:{ports['etcd']}/v3/kv"

        def call(method: str, body: dict[str, object]) -> dict[str, Any]:
            request = urllib.request.Request(f"{url}/{method}", data=json.dumps(body).encode(), method="POST")  # noqa: S310
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our loopback etcd
                answer: dict[str, Any] = json.loads(response.read())
                return answer

        revision = int(call("range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
        call("compaction", {"revision": revision, "physical": True})
        return revision

    def restart(self, name: str, down_seconds: float = 0.0) -> None:
        """Stops one component (SIGTERM, as a rolling restart would), keeps it down for
        ``down_seconds``, and starts it again with the same command; waits until it is healthy."""
        state = self._load_state()
        commands = state.get("commands")
        pids = state.get("pids")
        if not isinstance(commands, dict) or not isinstance(pids, dict) or name not in commands:
            raise ClusterError(f"{name} is not a component of this cluster")
        if name in pids:
            _terminate(int(pids[name]))
        time.sleep(down_seconds)  # the outage itself, not a wait for a condition
        with (self.logs / f"{name}.log").open("a") as log_file:
            process = subprocess.Popen(
                commands[name], stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        pids[name] = process.pid
        self._save_state(state)
        ports = state.get("ports")
        assert isinstance(ports, dict)
        self._wait_started(name, process, ports)

    def healthy(self) -> bool:
        state = self._load_state()
        server = state.get("server")
        return bool(server) and self.pki.exists() and self._probe(f"{server}/readyz")

    def kubectl(
        self, *args: str, input_text: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        binaries = Path(str(self._load_state().get("binaries") or ensure_binaries()))
        return subprocess.run(
            [str(binaries / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def _import_images(self, node_bins: NodeBinaries, images: list[BuiltImage]) -> None:
        """The node has no registry: pause and CoreDNS (one static program each) and the two
        images built from images/Dockerfile go straight into its containerd."""
        archives = [
            write_single_layer_image(
                self.node.state_dir / "pause.tar", PAUSE_IMAGE, {"/pause": ((node_bins.pause / "pause").read_bytes(), 0o755)},
                ["/pause"],
            ),
            write_single_layer_image(
                self.node.state_dir / "coredns.tar", addons.COREDNS_IMAGE,
                {"/coredns": ((node_bins.coredns / "coredns").read_bytes(), 0o755)}, ["/coredns"],
                user=str(addons.COREDNS_UID),
            ),
            *(image.archive for image in images),
        ]  # fmt: skip
        for archive in archives:
            try:
                self.node.import_image(archive)
            except NodeError as error:
                raise ClusterError(f"importing {archive.name} failed: {error}") from None

    def _start_dns(self, timeout: float = 120) -> None:
        """CoreDNS behind kube-dns, Available before the cluster is called ready."""
        manifests = addons.dns_manifests(CLUSTER_DNS)
        try:
            self.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(manifests))
            self.kubectl(
                "rollout", "status", "deployment/coredns", "-n", addons.DNS_NAMESPACE, f"--timeout={timeout:.0f}s"
            )
        except subprocess.CalledProcessError as error:
            raise ClusterError(
                f"cluster DNS did not start: {(error.stderr or error.stdout).strip()};"
                f" see kubectl -n {addons.DNS_NAMESPACE} describe pods -l k8s-app=kube-dns"
            ) from None

    def _wait_real_node(self, timeout: float = 120) -> None:
        """The kubelet registers its Node; Ready once the CNI config is found and the runtime answers.
        Then its pod range is written on the Node (as the node IPAM controller would) for
        kube-router, and kube-router's rights are granted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.kubectl(
                "get", "node", NODE_NAME, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                check=False,
            )  # fmt: skip
            if result.stdout.strip() == "True":
                break
            time.sleep(0.5)
        else:
            raise ClusterError(
                f"node {NODE_NAME} did not become Ready within {timeout:.0f}s; see {self.logs / 'kubelet.log'}"
            )
        pod_cidr = json.dumps({"spec": {"podCIDR": POD_CIDR, "podCIDRs": [POD_CIDR]}})
        self.kubectl("patch", "node", NODE_NAME, "--type=merge", "-p", pod_cidr)
        self.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(addons.kube_router_rbac()))
        self._wait_default_service_account()

    def _wait_default_service_account(self) -> None:
        # Pods need the default ServiceAccount, which the controller manager creates.
        deadline = time.monotonic() + 60
        while self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the default ServiceAccount never appeared; see {self.logs / 'kube-controller-manager.log'}"
                )
            time.sleep(0.2)

    def _register_nodes(self, bin_dir: Path, count: int) -> None:
        nodes = [_node_manifest(f"kwok-node-{index}") for index in range(count)]
        try:
            self.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(nodes))
            self.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=60s")
            self._wait_default_service_account()
        except subprocess.CalledProcessError as error:
            raise ClusterError(
                f"registering kwok nodes failed: {error.stderr.strip()}; see {self.logs / 'kwok.log'}"
            ) from None

    # -- down --------------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stops every component (SIGTERM, then SIGKILL after 10 s); returns the names stopped.
        With a real node, its containers go first and the host is put back last; raises
        ClusterError naming whatever could not be undone."""
        state = self._load_state()
        binaries = str(state.get("binaries", ""))
        stopped = []
        for name in reversed(COMPONENTS + NODE_COMPONENTS):
            pid = self.pids().get(name)
            if pid is None or not (_is_our_process(pid, binaries) or _is_node_process(pid, name)):
                continue
            if name == "containerd":
                self.node.remove_containers()  # the kubelet is gone; pods must not outlive the node
            _terminate(pid)
            stopped.append(name)
        if state:
            state["pids"] = {}
            self._save_state(state)
        problems = self.node.restore_host()
        if problems:
            raise ClusterError("the real node left host state behind: " + "; ".join(problems))
        return stopped


def _is_our_process(pid: int, binaries: str) -> bool:
    """True when pid is alive and runs one of our binaries (a recycled pid is not ours)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    zombie = "State:\tZ" in status
    return bool(binaries) and command.startswith(binaries) and not zombie


def _is_node_process(pid: int, name: str) -> bool:
    """containerd comes from Debian's package and kube-router from its own build folder."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    expected = {"containerd": "/usr/bin/containerd", "kube-router": str(cache_root() / "kube-router")}.get(name)
    return expected is not None and command.startswith(expected) and "State:\tZ" not in status


def _terminate(pid: int, grace: float = 10) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished:
                return
        except ChildProcessError:  # not our child: poll /proc instead
            if not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _node_manifest(name: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node-role.kubernetes.io/agent": "",
            },
        },
        "spec": {},
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "1000"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "1000"},
        },
    }


# Writes only, at Metadata level: enough to count an operator's API writes, nothing for reads.
_AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
"""
