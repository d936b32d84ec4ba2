"""`modelplane serve <service>`: run one service in the foreground."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from modelplane.cli.services import SERVICES, service_main
from modelplane.kernel.cpu_affinity import pin_process
from modelplane.kernel.startup import StartupError
from modelplane.kernel.state_lock import StateInUse


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "serve",
        help="run one service in the foreground",
        description="Run one service until SIGTERM or Ctrl-C. Every flag can also be set by "
        "environment (MODELPLANE_<SERVICE>_<FIELD>); `modelplane config` lists them.",
    )
    services = parser.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for name in SERVICES:
        module = service_main(name)
        sub = services.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        sub.add_argument("--host", help="address to bind (default 127.0.0.1)")
        sub.add_argument("--port", type=int, help="gRPC port; 0 picks a free one and prints it")
        sub.add_argument("--metrics-port", type=int, help="Prometheus /metrics port")
        sub.add_argument("--data-dir", type=Path, help="directory for embedded state")
        sub.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
        sub.add_argument(
            "--cpus", help="CPUs to run on, as a Linux CPU list such as 1 or 0-3 (default: any)"
        )
        sub.add_argument(
            "--tls-cert", dest="tls_cert_file", type=Path, help="PEM server certificate (TLS)"
        )
        sub.add_argument("--tls-key", dest="tls_key_file", type=Path, help="PEM key of --tls-cert")
        sub.add_argument(
            "--tls-client-ca",
            dest="tls_client_ca_file",
            type=Path,
            help="PEM CA: clients must present a certificate it signed (mutual TLS)",
        )
        if hasattr(module, "add_arguments"):
            module.add_arguments(sub)
        sub.set_defaults(handler=run_service, service_module=module)


def settings_from_args(module: Any, args: argparse.Namespace) -> Any:
    """Flags given on the command line override the environment and defaults."""
    fields = module.Settings.model_fields
    overrides = {
        key: value for key, value in vars(args).items() if key in fields and value is not None
    }
    return module.Settings(**overrides)


def run_service(args: argparse.Namespace) -> int:
    module = args.service_module
    try:  # pydantic's ValidationError is a ValueError: it names the bad setting
        settings = settings_from_args(module, args)
        # Before the service builds anything: the threads it starts inherit the CPUs.
        pin_process(settings.cpu_set)
    except ValueError as exc:
        print(f"modelplane serve {args.service}: {exc}", file=sys.stderr)
        return 2
    try:
        module.run(settings)
    except (StateInUse, StartupError) as exc:
        print(f"modelplane serve {args.service}: {exc}", file=sys.stderr)
        return 2
    return 0
