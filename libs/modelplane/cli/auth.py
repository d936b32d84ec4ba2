"""`modelplane auth`: bearer tokens for the services (add, list, remove), and client
certificate names (mutual TLS) with their roles.

The file holds salted hashes only; `add-token` prints the new token once, on stdout, and
it cannot be shown again. `add-cert` stores no secret: it gives roles to the callers whose
client certificate (verified against the server's tls_client_ca_file) has that subject
common name. Point a service at the file with MODELPLANE_<SERVICE>_AUTH_TOKENS_FILE; it
picks up changes within a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from modelplane.cli import auth_bootstrap
from modelplane.kernel.auth import ROLES, add_certificate, add_token, read_entries, remove_token

DEFAULT_TOKENS_FILE = Path(".modelplane/auth_tokens.jsonl")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "auth",
        help="create, list and remove bearer tokens",
        description="Manage the bearer-token file the services read "
        "(MODELPLANE_<SERVICE>_AUTH_TOKENS_FILE).",
    )
    sub = parser.add_subparsers(dest="auth_command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument(
            "--file",
            type=Path,
            default=DEFAULT_TOKENS_FILE,
            help=f"token file (default {DEFAULT_TOKENS_FILE})",
        )
        return command

    create = add("add-token", "create a token for NAME and print it (once)")
    create.add_argument("name", help="the principal's name, as audit logs will show it")
    create.add_argument(
        "--role",
        action="append",
        required=True,
        choices=ROLES,
        help="a role the token grants (repeatable)",
    )
    create.set_defaults(handler=cmd_add)

    cert = add(
        "add-cert",
        "give roles to callers whose client certificate's common name is NAME (mutual TLS)",
    )
    cert.add_argument("name", help="the certificate subject's common name (CN)")
    cert.add_argument(
        "--role",
        action="append",
        required=True,
        choices=ROLES,
        help="a role the certificate grants (repeatable)",
    )
    cert.set_defaults(handler=cmd_add_cert)

    listing = add("list", "list the principals (tokens and certificates), with their roles")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=cmd_list)

    boot = sub.add_parser(
        "bootstrap",
        help="make a CA, a server certificate and tokens for a single-host deployment",
        description=auth_bootstrap.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    boot.add_argument("directory", type=Path, help="where to write them (must hold none yet)")
    boot.add_argument(
        "--host",
        action="append",
        default=[],
        help="another name or address the services are reached by (repeatable)",
    )
    boot.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    boot.set_defaults(handler=cmd_bootstrap)

    remove = add(
        "remove",
        "remove NAME's token or certificate entry (services stop accepting it within a second)",
    )
    remove.add_argument("name", help="the principal's name")
    remove.set_defaults(handler=cmd_remove)


def cmd_add(args: argparse.Namespace) -> int:
    try:
        token = add_token(args.file, args.name, args.role)
    except ValueError as exc:
        print(f"modelplane auth: {exc}", file=sys.stderr)
        return 2
    print(token)
    print(
        f"token for {args.name!r} ({', '.join(dict.fromkeys(args.role))}) added to {args.file}; "
        "it is shown only this once",
        file=sys.stderr,
    )
    return 0


def cmd_add_cert(args: argparse.Namespace) -> int:
    try:
        add_certificate(args.file, args.name, args.role)
    except ValueError as exc:
        print(f"modelplane auth: {exc}", file=sys.stderr)
        return 2
    print(
        f"client certificates with CN {args.name!r} get {', '.join(dict.fromkeys(args.role))} "
        f"(file {args.file}); the services must require client certificates "
        "(MODELPLANE_<SERVICE>_TLS_CLIENT_CA_FILE)",
        file=sys.stderr,
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    try:
        entries = read_entries(args.file)
    except ValueError as exc:
        print(f"modelplane auth: {exc}", file=sys.stderr)
        return 2
    for entry in entries:
        if args.json:
            row = {
                "name": entry.name,
                "kind": entry.kind,
                "roles": list(entry.roles),
                "created_at": entry.created_at,
            }
            print(json.dumps(row))
        else:
            print(f"{entry.name}\t{entry.kind}\t{','.join(entry.roles)}\t{entry.created_at}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    try:
        removed = remove_token(args.file, args.name)
    except ValueError as exc:
        print(f"modelplane auth: {exc}", file=sys.stderr)
        return 2
    if not removed:
        print(f"modelplane auth: no entry named {args.name!r} in {args.file}", file=sys.stderr)
        return 1
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    try:
        written = auth_bootstrap.bootstrap(args.directory, args.host, args.days)
    except auth_bootstrap.AlreadyBootstrapped as exc:
        # Not an error: compose runs this before every start.
        print(f"modelplane auth: {exc}; nothing changed", file=sys.stderr)
        return 0
    except (OSError, ValueError) as exc:
        print(f"modelplane auth: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
