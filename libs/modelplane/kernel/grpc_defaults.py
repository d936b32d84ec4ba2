"""gRPC core settings that come from the environment. grpc reads them once, when it is
first imported, so they must be in place before that: the `modelplane` command applies
them first thing, and a benchmark passes `environment()` to the servers it starts.
This module must not import grpc.
"""

from __future__ import annotations

import os

# Measured with `modelplane loadtest` at 64 concurrent clients, alternating runs on one
# machine: without the EventEngine listener, accepted connections are read by the
# completion queue's own poller rather than by EventEngine threads that hand every read
# over, and server CPU per request fell ~17% for a ModelInfer that does no work and ~7%
# for the inference service (light MLP); latency at one client was unchanged. It is an
# experiment flag: a grpc release without the experiment logs "Unknown experiment" once
# and goes on.
SERVER_EXPERIMENTS = "-event_engine_listener"


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the defaults added. A
    GRPC_EXPERIMENTS already there wins; an empty one keeps grpc's own defaults."""
    env = dict(os.environ if base is None else base)
    env.setdefault("GRPC_EXPERIMENTS", SERVER_EXPERIMENTS)
    return env


def apply() -> None:
    """Adds the defaults to this process's environment: they take effect if grpc is not
    imported yet, and in every process started from this one."""
    os.environ.update(environment())
