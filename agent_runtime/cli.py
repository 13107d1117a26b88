"""The ``agent-runtime`` command. Its serve, init, users and audit commands come with the runtime."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent_runtime.config import RuntimeConfig


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        with open(args.config, encoding="utf-8") as handle:
            config = RuntimeConfig.from_yaml(handle.read())
    except (OSError, ValueError) as error:
        print(f"error: {args.config}: {error}", file=sys.stderr)
        return 2
    print(f"ok: agent {config.agent_name}, {len(config.operations)} operations, level {config.security_level.value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agent-runtime", description="The Enterprise Agent runtime.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a runtime config file")
    check.add_argument("config")
    check.set_defaults(func=cmd_check_config)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
