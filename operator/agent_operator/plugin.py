"""`kubectl ea`: a kubectl plugin for EnterpriseAgents.

    kubectl ea get [-n NS | -A]
    kubectl ea status NAME [-n NS] [--watch]
    kubectl ea promote NAME     approve the preview (sets spec.rollout.promote, as a Git commit would)
    kubectl ea abort NAME       traffic stays on, or returns to, the stable colour
    kubectl ea retry NAME       try an aborted rollout again
    kubectl ea undo NAME        ask the operator to put the previous revision's spec back (drifts from Git)

Exit codes: 0 success; 1 the agent is Stalled or Degraded (status), or it is in no state for the
command (nothing to promote, abort, retry or undo); 2 usage or not found; 3 the API could not be
reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from agent_operator import timefmt, undo
from agent_operator.render.common import ANNOTATION_ABORT, ANNOTATION_RETRY, ANNOTATION_UNDO
from agent_operator.rollout import BEFORE_PROMOTION, PROMOTABLE, SEQUENCE
from agent_operator.spec import (
    GROUP,
    PLURAL,
    VERSION,
    AbortReason,
    EnterpriseAgentStatus,
    Phase,
    PromotionMode,
    RolloutStatus,
    Step,
    UndoResult,
    read_status,
)

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


FIELD_MANAGER = "kubectl-ea"


def _call(function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except ApiException as error:
        if error.status == 404:
            raise PluginError("not found", EXIT_USAGE) from None
        if error.status in (400, 409, 422):  # the API refused the change: its message names the field
            raise PluginError(f"the API server refused the change: {_api_message(error)}", EXIT_USAGE) from None
        raise PluginError(f"API error {error.status}: {error.reason}", EXIT_UNREACHABLE) from None
    except (OSError, urllib3.exceptions.HTTPError) as error:  # connection refused, DNS, TLS, retries exhausted
        raise PluginError(f"cannot reach the API server: {error}", EXIT_UNREACHABLE) from None


def _api_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "")["message"])
    except (TypeError, ValueError, KeyError):
        return str(error.reason)


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
        status = read_status(item.get("status"))
        ready = f"{status.ready_replicas or 0}/{item['spec'].get('replicas', 1)}"
        rows.append(
            [
                item["metadata"]["namespace"],
                item["metadata"]["name"],
                status.phase or "-",
                status.active_color or "-",
                ready,
                status.active_revision or "-",
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
    status = read_status(agent.get("status"))
    spec = agent["spec"]
    lines = [
        f"Name:        {agent['metadata']['namespace']}/{agent['metadata']['name']}",
        f"Phase:       {status.phase or 'Unknown'}  {status.message or ''}".rstrip(),
        f"Image:       {spec['image']}",
        f"Active:      {status.active_color or '-'} at revision {status.active_revision or '-'}"
        f"  ({status.ready_replicas or 0}/{spec.get('replicas', 1)} ready)",
    ]
    rollout = status.rollout or RolloutStatus()
    if status.preview_revision:
        lines.append(f"Preview:     {rollout.preview_color or '-'} at revision {status.preview_revision}")
    if rollout.step is not None:
        lines.append(f"Rollout:     {rollout.step}  {rollout.message or ''}".rstrip())
        lines.append(f"Progress:    {progress_line(rollout)}")
    for check in rollout.analysis:
        lines.append(f"  {check.result:<8} {check.name:<12} {check.message}")
    generation = agent["metadata"].get("generation")
    observed = status.observed_generation
    lines.append(f"Generation:  {generation} (observed {observed if observed is not None else '-'})")
    lines.append("Conditions:")
    for condition in status.conditions:
        lines.append(
            f"  {condition.type:<18} {condition.status:<6} {condition.reason:<24} {condition.message}".rstrip()
        )
    return "\n".join(lines)


def progress_line(rollout: RolloutStatus) -> str:
    """A bar over the blue-green steps, e.g. ``[##----] 2/6 Analysis``."""
    steps = SEQUENCE
    if rollout.step == Step.ABORTED:
        reason = rollout.abort_reason or AbortReason.ABORTED
        return f"[{'x' * len(steps)}] aborted ({reason}); `kubectl ea retry` starts it again"
    done = steps.index(rollout.step) + 1 if rollout.step in steps else 0
    return f"[{'#' * done}{'-' * (len(steps) - done)}] {done}/{len(steps)} {rollout.step or ''}".rstrip()


# Phases that end `status --watch`, and those that make `status` exit 1.
SETTLED = (Phase.READY, Phase.STALLED, Phase.DEGRADED, Phase.PAUSED)
UNHEALTHY = (Phase.STALLED, Phase.DEGRADED)


def _phase(agent: dict[str, Any]) -> Phase | None:
    return read_status(agent.get("status")).phase


def cmd_status(args: argparse.Namespace) -> int:
    api, namespace = _api(args)

    def fetch() -> dict[str, Any]:
        return _fetch(api, namespace, args.name)

    agent = fetch()
    print(render_status(agent))
    last = agent["metadata"].get("resourceVersion")
    while args.watch and _phase(agent) not in SETTLED:
        time.sleep(args.interval)
        agent = fetch()
        if agent["metadata"].get("resourceVersion") != last:
            last = agent["metadata"].get("resourceVersion")
            print("\n" + render_status(agent), flush=True)
    return EXIT_UNHEALTHY if _phase(agent) in UNHEALTHY else EXIT_OK


def _fetch(api: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any]:
    try:
        agent: dict[str, Any] = _call(api.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
    except PluginError as error:
        if error.code == EXIT_USAGE:
            raise PluginError(f'EnterpriseAgent "{name}" not found in namespace "{namespace}"', EXIT_USAGE) from None
        raise
    return agent


def _patch(api: client.CustomObjectsApi, namespace: str, name: str, body: Any) -> None:
    """A merge patch (a dict) or a JSON patch (a list), recorded under our field manager."""
    content_type = "application/json-patch+json" if isinstance(body, list) else "application/merge-patch+json"
    _call(
        lambda: api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body, field_manager=FIELD_MANAGER, _content_type=content_type
        )
    )


def _target(
    args: argparse.Namespace,
) -> tuple[client.CustomObjectsApi, str, dict[str, Any], EnterpriseAgentStatus]:
    """(api, namespace, agent, status) of the agent a command names."""
    api, namespace = _api(args)
    agent = _fetch(api, namespace, args.name)
    return api, namespace, agent, read_status(agent.get("status"))


def promote_patch(agent: dict[str, Any]) -> dict[str, Any]:
    """The merge patch `kubectl ea promote` sends for ``agent`` (pure; the Argo CD ``promote`` action
    makes the same change). PluginError (exit 1) when there is nothing to approve."""
    name, status = agent["metadata"]["name"], read_status(agent.get("status"))
    step = status.rollout.step if status.rollout else None
    revision = status.preview_revision
    if not revision or step not in PROMOTABLE:
        raise PluginError(f"{name} has no rollout waiting for promotion (step: {step or 'none'})", 1)
    if (agent["spec"].get("rollout") or {}).get("promotion", PromotionMode.AUTO) != PromotionMode.MANUAL:
        raise PluginError(f"{name} promotes automatically (spec.rollout.promotion: Auto); nothing to approve", 1)
    return {"spec": {"rollout": {"promote": revision}}}


def abort_patch(agent: dict[str, Any]) -> dict[str, Any]:
    """The merge patch `kubectl ea abort` sends for ``agent`` (pure; as the Argo CD ``abort`` action).
    PluginError (exit 1) when no rollout is in progress."""
    name, status = agent["metadata"]["name"], read_status(agent.get("status"))
    step = status.rollout.step if status.rollout else None
    if step in BEFORE_PROMOTION:
        revision = status.preview_revision
    elif step == Step.POST_PROMOTION:
        revision = status.active_revision
    else:
        raise PluginError(
            f"{name} has no rollout in progress (step: {step or 'none'}); `kubectl ea undo` restores the previous revision",
            1,
        )
    return {"metadata": {"annotations": {ANNOTATION_ABORT: revision}}}


def retry_patch(agent: dict[str, Any], token: str) -> dict[str, Any]:
    """The merge patch `kubectl ea retry` sends for ``agent`` with this retry token (pure; as the Argo
    CD ``retry`` action). PluginError (exit 1) when no rollout was aborted."""
    status = read_status(agent.get("status"))
    if status.rollout is None or status.rollout.step != Step.ABORTED:
        raise PluginError(f"{agent['metadata']['name']} has no aborted rollout to retry", 1)
    return {"metadata": {"annotations": {ANNOTATION_ABORT: None, ANNOTATION_RETRY: token}}}


def cmd_promote(args: argparse.Namespace) -> int:
    api, namespace, agent, _ = _target(args)
    body = promote_patch(agent)
    revision = body["spec"]["rollout"]["promote"]
    _patch(api, namespace, args.name, body)
    print(f"approved revision {revision} of {namespace}/{args.name} (spec.rollout.promote: {revision!r})")
    print("  to keep the approval in Git, commit the same field", file=sys.stderr)
    return EXIT_OK


def cmd_abort(args: argparse.Namespace) -> int:
    api, namespace, agent, _ = _target(args)
    body = abort_patch(agent)
    revision = body["metadata"]["annotations"][ANNOTATION_ABORT]
    _patch(api, namespace, args.name, body)
    print(f"aborting the rollout of revision {revision} of {namespace}/{args.name}; traffic stays on the stable colour")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    api, namespace, agent, status = _target(args)
    body = retry_patch(agent, timefmt.compact(timefmt.now()))
    _patch(api, namespace, args.name, body)
    print(f"retrying the rollout of revision {status.preview_revision} of {namespace}/{args.name}")
    return EXIT_OK


def undo_patch(agent: dict[str, Any], token: str) -> dict[str, Any]:
    """The merge patch `kubectl ea undo` sends for ``agent`` with this request token (pure; as the
    Argo CD ``undo`` action): a request the operator answers (undo.py), since the previous spec is
    in a ControllerRevision. PluginError (exit 1) when the status shows nothing to go back to."""
    name, status = agent["metadata"]["name"], read_status(agent.get("status"))
    if status.active_color is None:
        raise PluginError(f"{name} has not served any revision yet", 1)
    if not undo.status_revision(status):
        raise PluginError(f"{name} has no previous revision to go back to", 1)
    return {"metadata": {"annotations": {ANNOTATION_UNDO: token}}}


def cmd_undo(args: argparse.Namespace) -> int:
    api, namespace, agent, _ = _target(args)
    token = timefmt.compact(timefmt.now())
    body = undo_patch(agent, token)
    # Only over the agent read: a request placed on a newer state (another undo, say) is refused.
    body["metadata"]["resourceVersion"] = agent["metadata"]["resourceVersion"]
    _patch(api, namespace, args.name, body)
    deadline = time.monotonic() + args.timeout
    while (answer := read_status(_fetch(api, namespace, args.name).get("status")).last_undo) is None or (
        answer.request != undo.request_id(token)
    ):
        if time.monotonic() > deadline:
            raise PluginError(
                f"asked the operator to undo {namespace}/{args.name} ({ANNOTATION_UNDO}: {token}); no answer in "
                f"status.lastUndo within {args.timeout:g} s: is the operator running?",
                EXIT_UNREACHABLE,
            )
        time.sleep(0.5)
    if answer.result == UndoResult.REFUSED:
        raise PluginError(answer.message or "the operator refused the undo", 1)
    print(f"{namespace}/{args.name}: spec set back to revision {answer.revision}")
    print(
        "warning: the spec in the cluster now differs from Git; commit the same change, or Argo CD / Flux "
        "will put the newer spec back",
        file=sys.stderr,
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl ea", description="Inspect and roll out EnterpriseAgents.")
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
    actions = []
    for verb, func, text in (
        ("promote", cmd_promote, "approve the preview revision (sets spec.rollout.promote)"),
        ("abort", cmd_abort, "abort the rollout: traffic stays on, or returns to, the stable colour"),
        ("retry", cmd_retry, "start an aborted rollout again"),
        ("undo", cmd_undo, "set the spec back to the previous revision (drifts from Git)"),
    ):
        action = commands.add_parser(verb, help=text)
        action.add_argument("name")
        action.set_defaults(func=func)
        if verb == "undo":
            action.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the operator's answer")
        actions.append(action)
    for sub in (get, status, *actions):  # kubectl users put -n after the verb
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
