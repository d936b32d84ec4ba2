"""gRPC core settings that come from the environment. grpc reads them once, when it is
first imported, so they must be in place before that: the `modelplane` command applies
them first thing (its servers and its clients), and a benchmark applies them to itself
and passes `environment()` to the servers it starts.
This module must not import grpc.
"""

from __future__ import annotations

import os

# Without the EventEngine listener (servers) and client (channels), a connection is read
# by the completion queue's own poller, in the thread that waits on the call, rather than
# by EventEngine threads that hand every read over to it. Measured, alternating runs on
# one machine:
# - listener, with `modelplane loadtest` at 64 concurrent clients: server CPU per request
#   fell ~17% for a ModelInfer that does no work and ~7% for the inference service
#   (light MLP); latency at one client was unchanged;
# - client, sequential calls from one synchronous stub: a health Check took p50 0.35
#   instead of 0.46 ms and p99 0.62 instead of 0.85, and client CPU per call fell by a
#   third (a thread hop less per read).
# They are experiment flags: a grpc release without one logs "Unknown experiment" once
# and goes on.
EXPERIMENTS = "-event_engine_listener,-event_engine_client"


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the defaults added. A
    GRPC_EXPERIMENTS already there wins; an empty one keeps grpc's own defaults."""
    env = dict(os.environ if base is None else base)
    env.setdefault("GRPC_EXPERIMENTS", EXPERIMENTS)
    return env


def apply() -> None:
    """Adds the defaults to this process's environment: they take effect if grpc is not
    imported yet, and in every process started from this one."""
    os.environ.update(environment())
