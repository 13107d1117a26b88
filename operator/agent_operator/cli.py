"""The ``agent-operator`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent_contract.layout import OPERATOR_METRICS_PORT
from agent_operator import defaults
from agent_operator.crd import build_crd
from agent_operator.manifest import ManifestError, dump_yaml_all, load_agents
from agent_operator.namespaces import WatchedNamespaces, namespace_pattern
from agent_operator.render import RenderPlan, build_children

EXIT_INVALID = 2


def _dump(objects: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2) + "\n"
    return dump_yaml_all(objects)


def _read(path: str) -> tuple[str, str]:
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    return Path(path).read_text(encoding="utf-8"), path


def cmd_render(args: argparse.Namespace) -> int:
    try:
        text, source = _read(args.file)
    except (OSError, UnicodeDecodeError) as error:
        print(f"error: cannot read {args.file}: {error}", file=sys.stderr)
        return EXIT_INVALID
    try:
        agents = load_agents(text, source)
    except ManifestError as error:
        print(f"error: invalid EnterpriseAgent manifest\n{error}", file=sys.stderr)
        return EXIT_INVALID
    objects = []
    for agent in agents:
        objects += build_children(agent, RenderPlan.initial(agent, operator_namespace=args.operator_namespace))
    sys.stdout.write(_dump(objects, args.output))
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    crd = build_crd()
    sys.stdout.write(dump_yaml_all([crd]) if args.output == "yaml" else json.dumps(crd, indent=2) + "\n")
    return 0


# kopf imports the generated Kubernetes clients when they are installed (the `kubectl ea` plugin
# needs the sync one), only to recognise their model objects, which the operator never hands it.
# Their models are about 50 MiB of the operator's memory at rest; kept out of the operator's process.
GENERATED_CLIENTS = ("kubernetes", "kubernetes_asyncio")


def keep_generated_clients_out() -> None:
    for name in GENERATED_CLIENTS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: "import fails", by design


def cmd_run(args: argparse.Namespace) -> int:
    keep_generated_clients_out()
    from agent_operator.main import RunOptions, run

    return run(
        RunOptions(
            namespaces=WatchedNamespaces(tuple(args.namespace)),
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            log_format=args.log_format,
            log_level=args.log_level,
            lease_namespace=args.lease_namespace,
            lease_name=args.lease_name,
            lease_seconds=args.lease_seconds,
            workers=args.workers,
            resync_seconds=args.resync_seconds,
            operator_namespace=args.operator_namespace,
            analysis_base_url=args.analysis_base_url,
        )
    )


def _namespace_option(value: str) -> str:
    try:
        return namespace_pattern(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-operator", description="The Enterprise Agent Operator.")
    commands = parser.add_subparsers(dest="command", required=True)

    render = commands.add_parser(
        "render",
        help="print every child of an EnterpriseAgent manifest, offline",
        description="Render the children an EnterpriseAgent would get, without a cluster. The key Secret"
        " is shown without data: keys are generated in the cluster, never rendered.",
    )
    render.add_argument("-f", "--file", required=True, help="manifest file, or - for standard input")
    render.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    render.add_argument(
        "--operator-namespace",
        default=defaults.OPERATOR_NAMESPACE,
        help="namespace the NetworkPolicy admits the operator from",
    )
    render.set_defaults(func=cmd_render)

    run = commands.add_parser("run", help="run the operator against the current KUBECONFIG (or in-cluster credentials)")
    run.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        type=_namespace_option,
        help="watch only this namespace, or those a glob matches (team-*); repeatable; default: all",
    )
    run.add_argument("--metrics-port", type=int, default=OPERATOR_METRICS_PORT, help="port of /metrics and /healthz")
    run.add_argument("--metrics-host", default="0.0.0.0", help="address /metrics and /healthz listen on")  # noqa: S104
    run.add_argument("--log-format", choices=["text", "json"], default="text")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the leader-election Lease",
    )
    run.add_argument("--lease-name", default=defaults.LEASE_NAME, help="name of the leader-election Lease")
    run.add_argument(
        "--lease-seconds",
        type=int,
        default=defaults.LEASE_SECONDS,
        help="lease duration; a standby takes over this long after the leader dies",
    )
    run.add_argument("--workers", type=int, default=defaults.WORKERS, help="agents reconciled concurrently")
    run.add_argument(
        "--resync-seconds",
        type=float,
        default=defaults.RESYNC_SECONDS,
        help="period of the level-based resync of every agent",
    )
    run.add_argument(
        "--operator-namespace",
        default=os.environ.get("POD_NAMESPACE", defaults.OPERATOR_NAMESPACE),
        help="namespace agents' NetworkPolicies admit the operator from",
    )
    run.add_argument(
        "--analysis-base-url",
        default=None,
        help="send every rollout analysis request to this URL instead of the Services and pods "
        "(for a runtime on loopback; outside a cluster the HTTP checks are otherwise Skipped)",
    )
    run.set_defaults(func=cmd_run)

    crd = commands.add_parser("crd", help="print the EnterpriseAgent CustomResourceDefinition")
    crd.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    crd.set_defaults(func=cmd_crd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
