"""`modelplane models`: what an inference service serves, version by version, with the
state the repository reports and, for ready versions, the artifact digest, the routes
(aliases) that reach it and where it came from."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

import grpc

from modelplane.cli.predict import add_connection_flags, run_with_client
from modelplane.client.inference import InferenceClient, config_parameter

DIGEST_CHARS = 12


@dataclass
class ServedVersion:
    """One row of the repository index; the configuration fields are None when the
    server does not report them (or the version is not ready)."""

    model: str
    version: str
    state: str
    reason: str
    sha256: str | None = None
    aliases: list[str] | None = None
    source: str | None = None


def served_versions(client: InferenceClient) -> list[ServedVersion]:
    rows = []
    for entry in client.index():
        row = ServedVersion(entry.name, entry.version, entry.state, entry.reason)
        if entry.state == "READY":
            try:
                config = client.config(entry.name, entry.version)
            except grpc.RpcError as exc:
                # Unloaded between the index and this call: the index row still stands.
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                    raise
            else:
                row.sha256 = config_parameter(config, "sha256")
                aliases = config_parameter(config, "aliases")
                if aliases is not None:
                    row.aliases = [a.strip() for a in aliases.split(",") if a.strip()]
                row.source = config_parameter(config, "source")
        rows.append(row)
    return rows


def as_json(rows: list[ServedVersion]) -> list[dict[str, Any]]:
    """One object per model, its index rows (ready versions and failures) inside."""
    models: dict[str, dict[str, Any]] = {}
    for row in rows:
        model = models.setdefault(row.model, {"name": row.model, "versions": []})
        version = asdict(row)
        del version["model"]
        model["versions"].append(version)
    return list(models.values())


def as_table(rows: list[ServedVersion]) -> list[str]:
    header: tuple[str, ...] = ("MODEL", "VERSION", "STATE", "DIGEST", "ROUTES", "SOURCE")
    if any(row.reason for row in rows):
        header = (*header, "REASON")
    table: list[tuple[str, ...]] = [header]
    for row in rows:
        table.append(
            (
                row.model,
                row.version or "-",
                row.state or "-",
                row.sha256[:DIGEST_CHARS] if row.sha256 else "-",
                ",".join(row.aliases) if row.aliases else "-",
                row.source or "-",
                row.reason or "",
            )
        )
    # The reason, free text, goes last and unpadded.
    widths = [max(len(line[i]) for line in table) for i in range(6)]
    lines = []
    for line in table:
        text = "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        reason = line[6] if len(line) > 6 and len(header) > 6 else ""
        lines.append(f"{text}  {reason}" if reason else text.rstrip())
    return lines


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "models",
        help="list the models an inference service serves, with versions, states and routes",
        description="List what an inference service serves (its repository index): each "
        "model version with its state (and the reason when not READY) and, as the server "
        "reports them in the model's configuration, the artifact digest, the routes "
        "(aliases) it answers and where it came from; '-' where the server reports nothing.",
    )
    add_connection_flags(parser)
    parser.add_argument("--json", action="store_true", help="print JSON (full digests)")
    parser.set_defaults(handler=run_models)


def run_models(args: argparse.Namespace) -> int:
    def show(client: InferenceClient) -> int:
        rows = served_versions(client)
        if args.json:
            print(json.dumps(as_json(rows), indent=2))
        elif not rows:
            print(f"{args.address} serves no models")
        else:
            for line in as_table(rows):
                print(line)
        return 0

    return run_with_client(args, show)
