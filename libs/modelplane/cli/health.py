"""`modelplane health ADDRESS`: exit 0 when the gRPC server there reports SERVING.

It asks the standard grpc.health.v1 service (open even when auth is on) over the same
channel every client builds, `ClientCredentials.from_env()`: plaintext with nothing set,
TLS with MODELPLANE_TLS_CA (and a client certificate for mutual TLS). This is what the
container probes run (deploy/healthcheck.py): Kubernetes' own `grpc:` probes speak
plaintext only, so they cannot check a TLS port.

It imports only grpc and the credentials (about 0.15 s of CPU, where the whole
`modelplane` command costs seconds): run it as `python -m modelplane.cli.health` where
that matters, as a probe every few seconds does.

Exit codes: 0 SERVING, 1 anything else (refused, not serving, TLS failure), 2 bad usage
or unreadable credentials.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.client.credentials import ClientCredentials

DEFAULT_TIMEOUT_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="HOST:PORT of the server")
    parser.add_argument(
        "service", nargs="?", default="", help="service name to ask about (default: the server)"
    )
    parser.add_argument(
        "--server-name",
        help="name to verify in the server's TLS certificate instead of the address's host "
        "(a probe reaches 127.0.0.1; the certificate names the Service)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g})",
    )


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "health",
        help="exit 0 when a service reports SERVING (TLS and token from the environment)",
        description="Ask a server's grpc.health.v1 service; exit 0 when SERVING, 1 otherwise.",
    )
    add_arguments(parser)
    parser.set_defaults(handler=check)


def check(args: argparse.Namespace) -> int:
    try:
        credentials = ClientCredentials.from_env()
        if args.server_name:
            credentials = dataclasses.replace(credentials, server_name=args.server_name)
        channel = credentials.channel(args.address)
    except ValueError as exc:
        print(f"{args.address}: {exc}", file=sys.stderr)
        return 2
    try:
        with channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        print(f"{args.address}: {status}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelplane.cli.health",
        description="Exit 0 when the gRPC server at ADDRESS reports SERVING.",
    )
    add_arguments(parser)
    return check(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
