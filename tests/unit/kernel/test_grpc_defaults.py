"""gRPC's environment settings reach the servers: set before grpc is imported."""

from __future__ import annotations

import os
import subprocess
import sys

from modelplane.kernel import grpc_defaults


def test_defaults_are_added_and_an_explicit_value_wins() -> None:
    assert grpc_defaults.environment({})["GRPC_EXPERIMENTS"] == grpc_defaults.EXPERIMENTS
    assert grpc_defaults.environment({"GRPC_EXPERIMENTS": "x"})["GRPC_EXPERIMENTS"] == "x"
    # An empty value is how an operator keeps grpc's own defaults.
    assert grpc_defaults.environment({"GRPC_EXPERIMENTS": ""})["GRPC_EXPERIMENTS"] == ""


def test_the_command_applies_them_before_grpc_is_imported() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    probe = (
        "import os, sys; import modelplane.cli.main; "
        "print('grpc' in sys.modules, os.environ['GRPC_EXPERIMENTS'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", grpc_defaults.EXPERIMENTS]
