"""What a real node changes on the host, recorded before and put back after.

A kubelet, containerd, kube-proxy and the CNI plugins change the host: iptables chains and rules,
ipsets, sysctls (kubelet sets vm.overcommit_memory and kernel.panic*, kube-proxy route_localnet and
conntrack limits), mounts (pod volumes, network namespaces under /run/netns, the kubelet's root),
a bridge, and directories of their own. ``HostSnapshot.capture`` records the host before the node
starts; ``restore`` undoes each of those, and ``leftovers`` says what differs afterwards (a test
asserts it is empty).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Every sysctl the node's components are known to write, read before and written back after.
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
# Paths outside the cluster's state directory that the components create on their own.
OWN_PATHS = (
    "/var/lib/kubelet",  # the device-plugin socket directory is hard-coded there
    "/run/netns",
    "/var/lib/cni",
    "/etc/cni",
    "/opt/cni",
)
# The kubelet's pod cgroups (cgroupfs driver), one tree per cgroup v1 controller or one in v2.
CGROUP_ROOT = Path("/sys/fs/cgroup")
POD_CGROUP = "kubepods"


def _run(*command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, input=stdin, capture_output=True, text=True, check=False, timeout=60)


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    values = {}
    for name in SYSCTLS:
        path = _sysctl_path(name)
        if path.exists():
            values[name] = path.read_text().strip()
    return values


def firewall_ruleset() -> str:
    """The whole netfilter ruleset. Debian's iptables is the nf_tables variant, so every rule
    kube-proxy, the CNI plugins and the policy controller add is in here, even the tables
    iptables creates empty (which iptables-save cannot tell from absent ones)."""
    result = _run("nft", "list", "ruleset")
    if result.returncode != 0:
        raise RuntimeError(f"nft list ruleset failed: {result.stderr.strip()}")
    return result.stdout.strip()


def ipsets() -> list[str]:
    result = _run("ipset", "list", "-n")
    return sorted(result.stdout.split()) if result.returncode == 0 else []


def mounts_under(prefixes: tuple[str, ...]) -> list[str]:
    """Mount points at or below any of ``prefixes``, deepest first (the order to unmount them)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def pod_cgroups() -> list[str]:
    """Every pod cgroup tree the kubelet made, whichever hierarchy it is in."""
    trees = [CGROUP_ROOT / POD_CGROUP] + [c / POD_CGROUP for c in CGROUP_ROOT.iterdir() if c.is_dir()]
    return sorted(str(tree) for tree in trees if tree.is_dir())


def _kill_pod_processes(tree: Path) -> None:
    """Kills what still runs in the pod cgroups: containers whose shim died with a killed session."""
    for procs in tree.rglob("cgroup.procs"):
        for pid in procs.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)


def _remove_cgroup_tree(tree: Path) -> str | None:
    """Removes the tree's cgroups deepest first; returns a problem, or None."""
    groups = sorted((d for d in [tree, *tree.rglob("*")] if d.is_dir()), key=lambda d: -len(d.parts))
    deadline = time.monotonic() + 10
    for group in groups:
        while True:
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as error:  # EBUSY until the killed processes are reaped
                if time.monotonic() > deadline:
                    return f"cannot remove cgroup {group}: {error}"
                time.sleep(0.1)
    return None


def links() -> list[str]:
    result = _run("ip", "-o", "link", "show")
    return sorted(line.split(":")[1].strip().split("@")[0] for line in result.stdout.splitlines() if ":" in line)


@dataclass
class HostSnapshot:
    sysctls: dict[str, str]
    firewall: str
    ipsets: list[str]
    links: list[str]
    paths: list[str] = field(default_factory=list)  # which of OWN_PATHS existed before
    cgroups: list[str] = field(default_factory=list)  # pod cgroup trees that existed before

    @classmethod
    def capture(cls) -> HostSnapshot:
        return cls(
            sysctls=read_sysctls(),
            firewall=firewall_ruleset(),
            ipsets=ipsets(),
            links=links(),
            paths=[p for p in OWN_PATHS if os.path.lexists(p)],
            cgroups=pod_cgroups(),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> HostSnapshot:
        return cls(**json.loads(path.read_text()))

    def restore(self, mount_prefixes: tuple[str, ...]) -> list[str]:
        """Puts the host back; returns what could not be undone (empty when all went well)."""
        problems = []
        for tree in pod_cgroups():  # the pods were this node's, even in a tree that was here before
            _kill_pod_processes(Path(tree))
        for tree in sorted(set(pod_cgroups()) - set(self.cgroups)):
            problem = _remove_cgroup_tree(Path(tree))
            if problem:
                problems.append(problem)
        for point in mounts_under(mount_prefixes):
            if _run("umount", point).returncode != 0 and _run("umount", "-l", point).returncode != 0:
                problems.append(f"cannot unmount {point}")
        for link in sorted(set(links()) - set(self.links)):
            # A pod's veth also goes by itself once its network namespace is unmounted and freed.
            if _run("ip", "link", "delete", link).returncode != 0 and link in links():
                problems.append(f"cannot delete link {link}")
        if firewall_ruleset() != self.firewall:
            # Back to the recorded ruleset as a whole, in one transaction.
            script = "flush ruleset\n" + (self.firewall + "\n" if self.firewall else "")
            restored = _run("nft", "-f", "-", stdin=script)
            if restored.returncode != 0:
                problems.append(f"restoring the firewall ruleset failed: {restored.stderr.strip()}")
        for name in sorted(set(ipsets()) - set(self.ipsets)):
            if _run("ipset", "destroy", name).returncode != 0:
                problems.append(f"cannot destroy ipset {name}")
        for name, value in self.sysctls.items():
            path = _sysctl_path(name)
            if path.exists() and path.read_text().strip() != value:
                try:
                    path.write_text(value)
                except OSError as error:
                    problems.append(f"cannot restore {name}: {error}")
        for own in OWN_PATHS:
            if own not in self.paths and os.path.lexists(own):
                _run("rm", "-rf", "--one-file-system", own)
        return problems

    def leftovers(self, mount_prefixes: tuple[str, ...]) -> list[str]:
        """Everything that differs from the snapshot."""
        now = HostSnapshot.capture()
        found = [f"mount {point}" for point in mounts_under(mount_prefixes)]
        found += [f"link {link}" for link in sorted(set(now.links) - set(self.links))]
        if now.firewall != self.firewall:
            found.append("firewall ruleset changed")
        found += [f"ipset {name}" for name in sorted(set(now.ipsets) - set(self.ipsets))]
        found += [
            f"sysctl {name}={now.sysctls.get(name)} (was {value})"
            for name, value in self.sysctls.items()
            if now.sysctls.get(name) != value
        ]
        found += [f"path {p}" for p in OWN_PATHS if p not in self.paths and os.path.lexists(p)]
        found += [f"cgroup {tree}" for tree in sorted(set(now.cgroups) - set(self.cgroups))]
        return found
