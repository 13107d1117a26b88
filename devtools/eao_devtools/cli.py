"""The ``eao-dev`` command: development tasks of a checkout (``make run``, the local control plane,
the packaging tools, the benchmarks). The product's own command is ``agent-operator``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from eao_devtools.checkout import repo_root
from eao_devtools.cluster import (
    NODE_COUNT,
    Cluster,
    ClusterError,
    cache_root,
    default_state_dir,
    ensure_binaries,
    ensure_node_binaries,
    ensure_tools,
    release_go_caches,
)
from eao_devtools.imagebuild import ImageBuildError, build_images, build_postgres_image

BENCHMARKS = ("operations", "operator", "request_work", "rollout", "runtime", "watch_memory", "write_cost")


def cmd_cluster(args: argparse.Namespace) -> int:
    cluster = Cluster(Path(args.state_dir))
    try:
        if args.action == "up":
            timings = cluster.up(nodes=args.nodes, real_node=args.real_node)
            if timings:
                print(
                    f"local control plane ready: build {timings['build_seconds']:.1f}s,"
                    f" start {timings['start_seconds']:.1f}s, total {timings['total_seconds']:.1f}s"
                )
            print(f"export KUBECONFIG={cluster.kubeconfig}")
        elif args.action == "down":
            stopped = cluster.down()
            print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
        elif args.action == "status":
            running = cluster.running()
            for name, alive in running.items():
                print(f"{name:<24} {'running' if alive else 'stopped'}")
            healthy = cluster.healthy()
            print(f"{'api':<24} {'ready' if healthy else 'not ready'}")
            return 0 if healthy else 1
        else:
            print(f"export KUBECONFIG={cluster.kubeconfig}")
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_run(_: argparse.Namespace) -> int:
    # Imported here: it loads the whole operator (kopf and its clients), which the other commands never need.
    from eao_devtools.dev import main as run_main

    return run_main()


def cmd_tools(args: argparse.Namespace) -> int:
    # Both cold builds take minutes: done here, before pytest, so no test's timeout pays for them.
    try:
        print(ensure_binaries())
        node = ensure_node_binaries()
        print("\n".join(str(folder) for folder in (node.kube, node.pause, node.coredns, node.kube_router)))
        print(ensure_tools())
        if args.images:
            for image in [*build_images(cache_root() / "images"), build_postgres_image(cache_root() / "images")]:
                print(f"{image.reference} {image.archive}")
        if args.release_go_caches:
            release_go_caches()
    except (ClusterError, ImageBuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # bench/ is a folder of the checkout, not an installed package: run it from the checkout's root.
    command = [sys.executable, "-m", f"bench.{args.benchmark}", *args.bench_args]
    return subprocess.run(command, cwd=repo_root(), check=False).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eao-dev", description="Development tools for a checkout of the Enterprise Agent Operator."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    cluster = commands.add_parser(
        "cluster",
        help="the local control plane (etcd, kube-apiserver, controller manager, scheduler, kwok) on 127.0.0.1",
    )
    cluster.add_argument("action", choices=["up", "down", "status", "env"])
    cluster.add_argument(
        "--state-dir", default=str(default_state_dir()), help="where certificates, logs and etcd data live"
    )
    cluster.add_argument("--nodes", type=int, default=NODE_COUNT, help="simulated kwok nodes to register")
    cluster.add_argument(
        "--real-node",
        action="store_true",
        help="one real node (kubelet, containerd, CNI bridge, kube-proxy, kube-router, CoreDNS; the two"
        " images built from images/Dockerfile and imported; as root) instead of kwok's",
    )
    cluster.set_defaults(func=cmd_cluster)

    run = commands.add_parser(
        "run", help="what `make run` does: a cluster (current context or local), the CRD, an example, the operator"
    )
    run.set_defaults(func=cmd_run)

    tools = commands.add_parser(
        "tools",
        help="build the control plane, the real node's kubelet, kube-proxy, pause, CoreDNS and kube-router"
        " (hack/) and helm, promtool and kstatus (hack/tools) once; print their folders",
    )
    tools.add_argument(
        "--images",
        action="store_true",
        help="also build the operator and runtime images from images/Dockerfile with buildah (as root)",
    )
    tools.add_argument(
        "--release-go-caches",
        action="store_true",
        help="then delete Go's build and module caches (about 15 GB after these builds; CI does this: the"
        " built programs are kept, and a disk that fills up fails every later test)",
    )
    tools.set_defaults(func=cmd_tools)

    bench = commands.add_parser("bench", help="run a benchmark of bench/ from the checkout's root")
    bench.add_argument("benchmark", choices=BENCHMARKS)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
