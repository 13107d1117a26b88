"""The ``agent-operator`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from agent_operator.crd import build_crd
from agent_operator.manifest import ManifestError, load_agents
from agent_operator.render import RenderPlan, build_children

EXIT_INVALID = 2


class _ReadableDumper(yaml.SafeDumper):
    """Writes multi-line strings (the runtime config inside the ConfigMap) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ReadableDumper.add_representer(str, _represent_str)


def _dump(objects: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2) + "\n"
    return yaml.dump_all(objects, Dumper=_ReadableDumper, sort_keys=False, default_flow_style=False)


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
    sys.stdout.write(
        yaml.dump(crd, Dumper=_ReadableDumper, sort_keys=False)
        if args.output == "yaml"
        else json.dumps(crd, indent=2) + "\n"
    )
    return 0


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
        default="enterprise-agent-system",
        help="namespace the NetworkPolicy admits the operator from",
    )
    render.set_defaults(func=cmd_render)

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
