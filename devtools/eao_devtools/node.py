"""One real node for the local control plane: containerd, runc and the CNI bridge from Debian's
packages; kubelet and kube-proxy built from the same Go modules as the control plane.

Every address lives in 198.18.0.0/15, the range reserved for network testing: the node's bridge
``eao0`` is 198.18.0.1/24 and its pods take the rest of that /24; Services take 198.18.128.0/17.
Nothing is routed off the machine. What the node changes on the host is recorded first
(:mod:`eao_devtools.hoststate`) and put back by :meth:`RealNode.stop`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from eao_devtools.hoststate import HostSnapshot, mounts_under

NODE_NAME = "eao-node"
BRIDGE = "eao0"
NODE_IP = "198.18.0.1"
POD_CIDR = "198.18.0.0/24"
# containerd's socket path must stay short (unix socket paths are limited to 108 bytes).
CONTAINERD_RUN = Path("/run/eao-containerd")
CONTAINERD_SOCKET = CONTAINERD_RUN / "containerd.sock"
# One real node per host (one bridge, one containerd socket). The node that holds the host writes
# its state directory and the pristine host record here; /run is emptied by a reboot, which is also
# when the host state a killed node left behind goes away.
HOST_CLAIM = Path("/run/eao-dev/real-node.json")
CNI_BIN = Path("/usr/lib/cni")
K8S_NAMESPACE = "k8s.io"  # containerd's namespace for the kubelet's images and containers
PAUSE_IMAGE = "eao.local/pause:1"
# Debian's packages a real node needs (the Makefile installs them with the other system packages).
DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "nftables", "conntrack", "ipset")


class NodeError(RuntimeError):
    pass


def _run(*command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
    if check and result.returncode != 0:
        raise NodeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _processes_mentioning(text: str) -> list[int]:
    """Processes (other than this one) whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def missing_packages() -> list[str]:
    return [p for p in DEBIAN_PACKAGES if _run("dpkg", "-s", p, check=False).returncode != 0]


@dataclass
class RealNode:
    """The node's files live in ``state_dir``; its processes are started by the cluster."""

    state_dir: Path

    @property
    def snapshot_file(self) -> Path:
        return self.state_dir / "host-snapshot.json"

    @property
    def kubelet_root(self) -> Path:
        return self.state_dir / "kubelet"

    @property
    def mount_prefixes(self) -> tuple[str, ...]:
        # Resolved: mountinfo lists real paths, and a relative or symlinked state dir must match them.
        return (str(self.state_dir.resolve()), str(CONTAINERD_RUN), "/run/netns", "/var/lib/kubelet")

    # -- host network ------------------------------------------------------------------------------

    def prepare_host(self) -> None:
        """Records the host, then makes the bridge the node and its pods live on."""
        missing = missing_packages()
        if missing:
            raise NodeError(f"a real node needs Debian's packages {', '.join(missing)} (make system-packages)")
        if os.geteuid() != 0:
            raise NodeError("a real node needs root (it creates a bridge, mounts and iptables rules)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._claim_host()
        if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            _run("ip", "link", "add", BRIDGE, "type", "bridge")
        prefix = ipaddress.ip_network(POD_CIDR).prefixlen
        if NODE_IP not in _run("ip", "-o", "addr", "show", "dev", BRIDGE).stdout:
            _run("ip", "addr", "add", f"{NODE_IP}/{prefix}", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # Pod traffic is forwarded between the bridge's ports and to the host's own addresses.
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")

    # -- configuration -----------------------------------------------------------------------------

    def write_configs(self, kubeconfigs: dict[str, Path], pki: Path, cluster_dns: str, service_cidr: str) -> None:
        config = self.state_dir / "config"
        config.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "cni" / "net.d" / "10-eao.conflist").write_text(json.dumps(self._cni(service_cidr), indent=2))
        (config / "containerd.toml").write_text(self._containerd())
        (config / "kubelet.yaml").write_text(yaml.safe_dump(self._kubelet(pki, cluster_dns), sort_keys=False))
        (config / "kube-proxy.yaml").write_text(
            yaml.safe_dump(self._kube_proxy(kubeconfigs["kube-proxy"], service_cidr), sort_keys=False)
        )

    def _cni(self, service_cidr: str) -> dict[str, object]:
        network = ipaddress.ip_network(POD_CIDR)
        return {
            "cniVersion": "1.0.0",
            "name": "eao",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,  # nothing leaves the machine: no address to hide
                    "hairpinMode": True,  # a pod reaching itself through its Service
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(network), "rangeStart": str(network[10]), "gateway": NODE_IP}]],
                        # Pods reach their /24 and the Services through the node, and nothing else:
                        # no default route, so nothing a pod sends can be forwarded off the machine.
                        "routes": [{"dst": service_cidr}],
                        "dataDir": str(self.state_dir / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _containerd(self) -> str:
        root = self.state_dir / "containerd"
        return f"""version = 2
root = "{root}"
state = "{CONTAINERD_RUN / "state"}"

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM lacks CAP_SYS_RESOURCE: without this, runc fails to lower the pause container's
  # oom_score_adj ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{self.state_dir / "cni" / "net.d"}"
"""

    def _kubelet(self, pki: Path, cluster_dns: str) -> dict[str, object]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(pki / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
            "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
            "cgroupDriver": "cgroupfs",  # no systemd here
            "failSwapOn": False,
            "failCgroupV1": False,  # the VM runs cgroup v1; 1.35 makes that fatal unless set
            "clusterDomain": "cluster.local",
            "clusterDNS": [cluster_dns],
            "resolvConf": str(self.state_dir / "config" / "resolv.conf"),
            "staticPodPath": "",
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,  # never delete the images we imported (no registry)
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "maxPods": 60,
            "podCIDR": POD_CIDR,
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "5s",
            "shutdownGracePeriod": "0s",
        }

    def _kube_proxy(self, kubeconfig: Path, service_cidr: str) -> dict[str, object]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP,
            "clusterCIDR": POD_CIDR,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # Leave the host's conntrack sysctls alone (nothing to restore afterwards).
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"syncPeriod": "5s", "minSyncPeriod": "0s"},
            "nodePortAddresses": [f"{NODE_IP}/32"],
        }

    # -- commands ----------------------------------------------------------------------------------

    def commands(self, bin_dir: Path, kubeconfigs: dict[str, Path]) -> dict[str, list[str]]:
        config = self.state_dir / "config"
        (config / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # pods use cluster DNS, not the host's
        return {
            "containerd": ["/usr/bin/containerd", f"--config={config / 'containerd.toml'}", "--log-level=warn"],
            "kubelet": [
                str(bin_dir / "kubelet"),
                f"--config={config / 'kubelet.yaml'}",
                f"--kubeconfig={kubeconfigs['kubelet']}",
                f"--root-dir={self.kubelet_root}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--node-labels=type=real",
                "--v=1",
            ],
            "kube-proxy": [str(bin_dir / "kube-proxy"), f"--config={config / 'kube-proxy.yaml'}", "--v=1"],
        }

    def wait_containerd(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _run("ctr", f"--address={CONTAINERD_SOCKET}", "version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise NodeError(f"containerd did not answer on {CONTAINERD_SOCKET} within {timeout:.0f}s")

    def import_image(self, archive: Path) -> None:
        _run(
            "ctr",
            f"--address={CONTAINERD_SOCKET}",
            "-n",
            K8S_NAMESPACE,
            "images",
            "import",
            str(archive),
            timeout=600,
        )

    # -- teardown ----------------------------------------------------------------------------------

    def remove_containers(self) -> None:
        """Every task and container the kubelet left in containerd (called before containerd stops)."""
        if _run("ctr", f"--address={CONTAINERD_SOCKET}", "version", check=False).returncode != 0:
            return
        base = ("ctr", f"--address={CONTAINERD_SOCKET}", "-n", K8S_NAMESPACE)
        tasks = _run(*base, "tasks", "list", "-q", check=False).stdout.split()
        for task in tasks:
            _run(*base, "tasks", "kill", "-s", "SIGKILL", task, check=False)
        deadline = time.monotonic() + 15
        for task in tasks:
            while _run(*base, "tasks", "delete", task, check=False).returncode != 0:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        for container in _run(*base, "containers", "list", "-q", check=False).stdout.split():
            _run(*base, "containers", "delete", container, check=False)

    def restore_host(self) -> list[str]:
        """Unmounts, deletes links, chains, ipsets and files the node made; restores sysctls."""
        if not self.snapshot_file.exists():
            return []  # never started, already put back, or put back by the node that came next
        snapshot = HostSnapshot.load(self.snapshot_file)
        problems = snapshot.restore(self.mount_prefixes)
        if CONTAINERD_RUN.exists():
            shutil.rmtree(CONTAINERD_RUN, ignore_errors=True)
        leftovers = snapshot.leftovers(self.mount_prefixes)
        if not leftovers:
            self.release_disk()
            self.snapshot_file.unlink()
            if RealNode._claim() == {"state_dir": str(self.state_dir)}:
                shutil.rmtree(HOST_CLAIM.parent)  # the claim and its record: the host is free
        return problems + leftovers

    def release_disk(self) -> None:
        """Deletes the unpacked images and the pods' volumes (gigabytes per node; every `up`
        imports the images again), keeping configs and logs. Only called once nothing is mounted
        under the state directory any more: a mount's contents must never be deleted through it."""
        for bulky in (self.state_dir / "containerd", self.kubelet_root):
            # By the resolved path, as the kernel lists mounts: a state dir named through a symlink
            # or relatively must not hide a volume still mounted inside it.
            if not mounts_under((str(bulky.resolve()),)):
                shutil.rmtree(bulky, ignore_errors=True)
        for archive in self.state_dir.glob("*.tar"):
            archive.unlink()

    # -- one node per host -------------------------------------------------------------------------

    @staticmethod
    def _claim() -> dict[str, str] | None:
        try:
            claim = json.loads(HOST_CLAIM.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return {"state_dir": str(claim.get("state_dir", ""))}

    def _claim_host(self) -> None:
        """Takes the host for this node and records it as it is, first putting back what a node
        killed without `down` (a killed session, a killed CI job) left: otherwise its chains, ipsets
        and bridge would be recorded as the host's own and this node's `down` could not restore."""
        put_back_abandoned_node(keep=self.state_dir)
        if not self.snapshot_file.exists():  # a second `up` keeps the first, pristine record
            HostSnapshot.capture().save(self.snapshot_file)
        HOST_CLAIM.parent.mkdir(parents=True, exist_ok=True)
        (HOST_CLAIM.parent / "record").mkdir(exist_ok=True)
        shutil.copyfile(self.snapshot_file, HOST_CLAIM.parent / "record" / "host-snapshot.json")
        HOST_CLAIM.write_text(json.dumps({"state_dir": str(self.state_dir)}))

    def is_running(self) -> bool:
        """Whether containerd, the kubelet, kube-proxy or kube-router still runs from this node's
        state directory (each is started with a file from it on its command line)."""
        return bool(_processes_mentioning(str(self.state_dir)))

    def recover(self) -> list[str]:
        """Puts the host back from the record kept beside the claim (the node's own state
        directory may be gone: a pytest tmp dir is rotated away)."""
        record = HOST_CLAIM.parent / "record" / "host-snapshot.json"
        if not record.exists():
            shutil.rmtree(HOST_CLAIM.parent)
            return []
        snapshot = HostSnapshot.load(record)
        for pid in _processes_mentioning(str(CONTAINERD_SOCKET)):  # shims that outlived containerd
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        problems = snapshot.restore(self.mount_prefixes)
        shutil.rmtree(CONTAINERD_RUN, ignore_errors=True)
        problems += snapshot.leftovers(self.mount_prefixes)
        if not problems:
            shutil.rmtree(HOST_CLAIM.parent)
            self.release_disk()
            self.snapshot_file.unlink(missing_ok=True)  # its own `down` has nothing left to undo
        return problems


def put_back_abandoned_node(keep: Path | None = None) -> None:
    """Puts the host back from what a real node killed without `down` left (a killed session or CI
    job), so that whoever records the host next records it clean. A node still running is never
    taken over: that raises. ``keep`` is the caller's own node, which is not abandoned."""
    claim = RealNode._claim()
    if claim is None or (keep is not None and claim["state_dir"] == str(keep)):
        return
    other = RealNode(Path(claim["state_dir"]))
    if other.is_running():
        raise NodeError(
            f"another real node runs on this host from {other.state_dir}; stop it first "
            f"(eao-dev cluster down --state-dir {other.state_dir.parent})"
        )
    problems = other.recover()
    if problems:
        raise NodeError("cannot put back what a killed real node left: " + "; ".join(problems))
