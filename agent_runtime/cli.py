"""The ``agent-runtime`` command: serve, init, users add, audit verify and export-key, check-config."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent_contract.config import RuntimeConfig, SigningAlgorithm

if TYPE_CHECKING:
    from agent_contract.keyfiles import KeyRing

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from agent_runtime.app import create_app
    from agent_runtime.settings import Settings, SettingsError

    try:
        settings = Settings.load(args.config, port=args.port)
        if args.host:
            # Only the host: DATABASE_URL and the rest of what was loaded stay (a new Settings
            # had dropped them, and with them the replicas' shared state).
            settings = dataclasses.replace(settings, host=args.host)
        app = create_app(settings)
    except (SettingsError, KeyError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not args.no_uvloop:
        import uvloop

        uvloop.install()  # a faster event loop; aiohttp runs on it unchanged
    app.on_startup.append(_freeze_startup_heap)  # last: after every start-up hook has made its objects
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_grace_seconds,
        access_log=None,
        print=lambda message: print(message, file=sys.stderr),
    )
    return EXIT_OK


async def _freeze_startup_heap(_app: object) -> None:
    """Moves everything made by imports and start-up out of the cyclic collector's sight: each full
    collection otherwise walks those 72,000 or so objects (pydantic, OpenTelemetry, aiohttp), which
    measured 20 to 30 ms at the p99 with every request traced (about 5 ms frozen). aiohttp runs
    this after the cleanup contexts' start-up halves."""
    import gc

    gc.collect()
    gc.freeze()


def cmd_init(args: argparse.Namespace) -> int:
    """A complete local layout: config.yaml (the ConfigMap's format), fresh keys, an empty users file."""
    from agent_contract.keyfiles import new_key_files, write_key_files

    root = Path(args.directory).resolve()
    if (root / "config.yaml").exists() and not args.force:
        print(
            f"error: {root / 'config.yaml'} exists (use --force to overwrite the config; keys are kept)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    algorithm = SigningAlgorithm(args.algorithm)
    keys_dir = root / "keys"
    if not (keys_dir / "active.json").exists():
        write_key_files(keys_dir, new_key_files(algorithm))
    users = root / "users"
    if not users.exists():
        users.write_text(
            "# name:role[,role]:argon2id-hash   (add lines with: agent-runtime users add NAME --role ROLE --password-stdin)\n"
        )
        users.chmod(0o600)
    config = RuntimeConfig.model_validate(
        {
            "agentName": args.name,
            "namespace": "local",
            "operations": ["ping"],
            "auth": {
                "algorithm": algorithm.value,
                "keysDir": str(keys_dir),
                "usersFile": str(users),
                "issuer": f"{args.name}.local",
                "audience": args.name,
            },
            "dataDir": str(root / "data"),
        }
    )
    (root / "config.yaml").write_text(config.to_yaml())
    print(f"wrote {root / 'config.yaml'}, {keys_dir}/ and {users}")
    print(f"serve it with: agent-runtime serve --config {root / 'config.yaml'} --port 8080")
    return EXIT_OK


def cmd_users_add(args: argparse.Namespace) -> int:
    from agent_runtime.security.users import UsersFileError, hash_line

    if not args.password_stdin:
        print(
            "error: pass the password on standard input with --password-stdin (never on the command line)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    password = sys.stdin.readline().rstrip("\n")
    try:
        print(hash_line(args.name, args.role, password))
    except UsersFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


class _AuditInputError(Exception):
    pass


def _audit_ring(directory: str) -> KeyRing:
    """The key directory's ring, or an error naming what is wrong with it (never a traceback)."""
    from cryptography.exceptions import UnsupportedAlgorithm

    from agent_contract.keyfiles import AUDIT_PREFIX, KeyRing

    try:
        ring = KeyRing.load(directory)
    except (OSError, KeyError, ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise _AuditInputError(f"{directory}: not a readable key directory: {error}") from None
    if not ring.audit:
        raise _AuditInputError(
            f"{directory} has no audit key ({AUDIT_PREFIX}<kid>): it was made before audit keys; the runtime "
            "signs with an ephemeral key then, which only the checkpoint copy on stdout vouches for"
        )
    return ring


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 verified, 1 failed, 2 unusable input, 3 unsigned records at the end or after an unclean shutdown."""
    from agent_runtime.audit import AuditKeyError, load_public_keys, verify_trail

    try:
        if args.public_keys:
            try:
                keys = load_public_keys(Path(args.public_keys).read_bytes())
            except AuditKeyError as error:
                raise _AuditInputError(f"{args.public_keys}: {error}") from None
        elif args.keys:
            keys = _audit_ring(args.keys).audit_public_keys
        elif args.checkpoints:
            keys = {}  # only ephemeral keys that the checkpoint copy announces (an agent without audit keys)
        else:
            raise _AuditInputError(
                "give the audit public keys (--public-keys FILE, from: agent-runtime audit export-key), or --keys DIR"
            )
        data = Path(args.file).read_bytes()
        checkpoints = Path(args.checkpoints).read_bytes() if args.checkpoints else None
    except (OSError, _AuditInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = verify_trail(data, keys, checkpoints)
    except Exception as error:  # an input verify does not foresee must still get an answer, not a traceback
        print(f"error: {args.file}: cannot be verified: {error!r}", file=sys.stderr)
        return EXIT_FAILED
    print(result.describe())
    return int(result.status)


def cmd_audit_export_key(args: argparse.Namespace) -> int:
    """Prints the audit public keys as a JWK set: what an auditor needs to run verify."""
    import json

    try:
        ring = _audit_ring(args.keys)
    except _AuditInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(ring.audit_jwks(), indent=2))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = RuntimeConfig.from_yaml(Path(args.config).read_text())
    except (OSError, ValueError) as error:
        print(f"error: {args.config}: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"ok: agent {config.agent_name}, {len(config.operations)} operations, level {config.security_level.value}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-runtime", description="The Enterprise Agent runtime.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the agent's API, health and metrics")
    serve.add_argument("--config", help="config file (default: $AGENT_CONFIG or /etc/agent/config.yaml)")
    serve.add_argument("--port", type=int, default=None, help="port (default: $AGENT_PORT or 8080)")
    serve.add_argument("--host", default=None, help="address (default: $AGENT_HOST or 0.0.0.0)")
    serve.add_argument("--no-uvloop", action="store_true", help="run on the standard asyncio event loop")
    serve.set_defaults(func=cmd_serve)

    init = commands.add_parser("init", help="write a complete local configuration into DIR")
    init.add_argument("directory")
    init.add_argument("--name", default="local-agent")
    init.add_argument("--algorithm", choices=[a.value for a in SigningAlgorithm], default="EdDSA")
    init.add_argument("--force", action="store_true")
    init.set_defaults(func=cmd_init)

    users = commands.add_parser("users", help="manage the users file")
    users_commands = users.add_subparsers(dest="users_command", required=True)
    add = users_commands.add_parser("add", help="print a users-file line for NAME")
    add.add_argument("name")
    add.add_argument("--role", action="append", required=True, help="a role (repeatable)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.set_defaults(func=cmd_users_add)

    audit = commands.add_parser("audit", help="audit trail tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify",
        help="check a trail's chain, signed checkpoints and unsigned spans",
        description="Exit status: 0 verified; 1 failed (tampered, damaged, or not signed by the given keys); "
        "2 unusable input; 3 intact but records at the end (or before an unclean restart) are not signed.",
    )
    verify.add_argument("file")
    keys = verify.add_mutually_exclusive_group()
    keys.add_argument("--public-keys", help="the audit public keys, a JWK set (from: audit export-key)")
    keys.add_argument("--keys", help="the key directory (only the audit keys' public halves are used)")
    verify.add_argument(
        "--checkpoints", help="the log collector's copy of the runtime's stdout, holding its audit_checkpoint lines"
    )
    verify.set_defaults(func=cmd_audit_verify)
    export = audit_commands.add_parser("export-key", help="print the audit public keys (a JWK set) for auditors")
    export.add_argument("--keys", required=True, help="the key directory")
    export.set_defaults(func=cmd_audit_export_key)

    check = commands.add_parser("check-config", help="validate a runtime config file")
    check.add_argument("config")
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
