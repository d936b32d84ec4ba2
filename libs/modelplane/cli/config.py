"""`modelplane config`: every setting of every service, with its environment variable."""

from __future__ import annotations

import argparse
from typing import Any

from modelplane.cli.services import SERVICES, service_main


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "config", help="list the settings of each service as a Markdown table"
    )
    parser.add_argument("service", nargs="?", choices=SERVICES, help="only this service")
    parser.set_defaults(handler=show)


def settings_table(name: str) -> str:
    settings_class = service_main(name).Settings
    prefix = settings_class.model_config.get("env_prefix", "")
    rows = [
        f"| `{prefix}{field.upper()}` | `{info.default}` | {info.description or ''} |"
        for field, info in settings_class.model_fields.items()
    ]
    header = f"### {name}\n\n| variable | default | meaning |\n|---|---|---|"
    return "\n".join([header, *rows])


def show(args: argparse.Namespace) -> int:
    names = [args.service] if args.service else list(SERVICES)
    print("\n\n".join(settings_table(name) for name in names))
    return 0
