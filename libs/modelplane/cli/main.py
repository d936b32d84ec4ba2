"""Entry point of the `modelplane` command."""

from __future__ import annotations

import argparse
import importlib
import sys

from modelplane import __version__
from modelplane.kernel import grpc_defaults

# Before any command module imports grpc, which reads these settings only then.
grpc_defaults.apply()

# Each module adds its commands with `register(subparsers)`.
COMMAND_MODULES = (
    "modelplane.cli.serve",
    "modelplane.cli.up",
    "modelplane.cli.config",
    "modelplane.cli.registry",
    "modelplane.cli.features",
    "modelplane.cli.loadtest",
    "modelplane.cli.predict",
    "modelplane.cli.models",
    "modelplane.cli.monitor",
    "modelplane.cli.auth",
    "modelplane.cli.health",
    "modelplane.cli.score",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelplane",
        description="Production serving for ONNX models: registry, features, "
        "KServe v2 inference with dynamic batching, monitoring.",
    )
    parser.add_argument("--version", action="version", version=f"modelplane {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
