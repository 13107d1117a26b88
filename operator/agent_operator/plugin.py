"""`kubectl ea`: a kubectl plugin for EnterpriseAgents.

    kubectl ea get [-n NS | -A]
    kubectl ea status NAME [-n NS] [--watch]

Exit codes: 0 success; 1 the agent is Stalled or Degraded (status); 2 usage or not found;
3 the API could not be reached.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from agent_operator.spec import GROUP, PLURAL, VERSION

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class PluginError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _api(args: argparse.Namespace) -> tuple[client.CustomObjectsApi, str]:
    try:
        config.load_kube_config(config_file=args.kubeconfig, context=args.context)  # type: ignore[no-untyped-call]
        _, active = config.list_kube_config_contexts(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
        namespace = args.namespace or (active.get("context", {}).get("namespace") if active else None) or "default"
    except (ConfigException, OSError) as error:
        raise PluginError(f"cannot load a kubeconfig: {error}", EXIT_UNREACHABLE) from None
    return client.CustomObjectsApi(), namespace


def _call(function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except ApiException as error:
        if error.status == 404:
            raise PluginError("not found", EXIT_USAGE) from None
        raise PluginError(f"API error {error.status}: {error.reason}", EXIT_UNREACHABLE) from None
    except (OSError, urllib3.exceptions.HTTPError) as error:  # connection refused, DNS, TLS, retries exhausted
        raise PluginError(f"cannot reach the API server: {error}", EXIT_UNREACHABLE) from None


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "-"
    created = time.mktime(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    seconds = int(time.time() - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cmd_get(args: argparse.Namespace) -> int:
    api, namespace = _api(args)
    if args.all_namespaces:
        items = _call(api.list_cluster_custom_object, GROUP, VERSION, PLURAL)["items"]
    else:
        items = _call(api.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)["items"]
    rows = [["NAMESPACE", "NAME", "PHASE", "ACTIVE", "READY", "REVISION", "IMAGE", "AGE"]]
    for item in items:
        status = item.get("status") or {}
        ready = f"{status.get('readyReplicas', 0)}/{item['spec'].get('replicas', 1)}"
        rows.append(
            [
                item["metadata"]["namespace"],
                item["metadata"]["name"],
                status.get("phase", "-"),
                status.get("activeColor", "-"),
                ready,
                status.get("activeRevision", "-"),
                item["spec"]["image"],
                _age(item["metadata"].get("creationTimestamp")),
            ]
        )
    if not args.all_namespaces:
        rows = [row[1:] for row in rows]
    if len(rows) == 1:
        print(f"No EnterpriseAgents found in {'any namespace' if args.all_namespaces else namespace}.", file=sys.stderr)
        return EXIT_OK
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("   ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def render_status(agent: dict[str, Any]) -> str:
    status = agent.get("status") or {}
    spec = agent["spec"]
    lines = [
        f"Name:        {agent['metadata']['namespace']}/{agent['metadata']['name']}",
        f"Phase:       {status.get('phase', 'Unknown')}  {status.get('message', '')}".rstrip(),
        f"Image:       {spec['image']}",
        f"Active:      {status.get('activeColor', '-')} at revision {status.get('activeRevision', '-')}"
        f"  ({status.get('readyReplicas', 0)}/{spec.get('replicas', 1)} ready)",
    ]
    rollout = status.get("rollout") or {}
    if status.get("previewRevision"):
        lines.append(f"Preview:     {rollout.get('previewColor', '-')} at revision {status['previewRevision']}")
    if rollout.get("step"):
        lines.append(f"Rollout:     {rollout['step']}  {rollout.get('message', '')}".rstrip())
    for check in rollout.get("analysis") or []:
        lines.append(f"  {check['result']:<8} {check['name']:<12} {check.get('message', '')}")
    generation = agent["metadata"].get("generation")
    observed = status.get("observedGeneration")
    lines.append(f"Generation:  {generation} (observed {observed if observed is not None else '-'})")
    lines.append("Conditions:")
    for condition in status.get("conditions") or []:
        lines.append(
            f"  {condition['type']:<12} {condition['status']:<6} {condition['reason']:<24} {condition.get('message', '')}".rstrip()
        )
    return "\n".join(lines)


def _unhealthy(agent: dict[str, Any]) -> bool:
    return (agent.get("status") or {}).get("phase") in ("Stalled", "Degraded")


def cmd_status(args: argparse.Namespace) -> int:
    api, namespace = _api(args)

    def fetch() -> dict[str, Any]:
        try:
            agent: dict[str, Any] = _call(
                api.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, args.name
            )
        except PluginError as error:
            if error.code == EXIT_USAGE:
                raise PluginError(
                    f'EnterpriseAgent "{args.name}" not found in namespace "{namespace}"', EXIT_USAGE
                ) from None
            raise
        return agent

    agent = fetch()
    print(render_status(agent))
    last = agent["metadata"].get("resourceVersion")
    while args.watch and (agent.get("status") or {}).get("phase") not in ("Ready", "Stalled", "Degraded"):
        time.sleep(args.interval)
        agent = fetch()
        if agent["metadata"].get("resourceVersion") != last:
            last = agent["metadata"].get("resourceVersion")
            print("\n" + render_status(agent), flush=True)
    return EXIT_UNHEALTHY if _unhealthy(agent) else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl ea", description="Inspect EnterpriseAgents.")
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--context", default=None)
    parser.add_argument("-n", "--namespace", default=None)
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("get", help="list agents with phase, colour, readiness and revision")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.set_defaults(func=cmd_get)
    status = commands.add_parser("status", help="one agent in detail; exit 1 when Stalled or Degraded")
    status.add_argument("name")
    status.add_argument("-w", "--watch", action="store_true", help="print each change until Ready, Stalled or Degraded")
    status.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    status.set_defaults(func=cmd_status)
    for sub in (get, status):  # kubectl users put -n after the verb
        sub.add_argument("-n", "--namespace", default=argparse.SUPPRESS)
        sub.add_argument("--kubeconfig", default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except PluginError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code
    return result


if __name__ == "__main__":
    sys.exit(main())
