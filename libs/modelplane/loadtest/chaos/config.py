"""The chaos harness's knobs, from MODELPLANE_CHAOS_* environment variables (so a
quick run is `MODELPLANE_CHAOS_SCENARIOS=term MODELPLANE_CHAOS_SERVICES=feature make
chaos`); the defaults keep `make chaos` within about five minutes on 2 cores."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

SCENARIOS = ("overload", "slow", "kill", "term")
SERVICES = ("registry", "feature", "inference", "monitoring")
WRITE_SERVICES = ("registry", "feature", "monitoring")


@dataclass(frozen=True)
class ChaosConfig:
    scenarios: tuple[str, ...] = SCENARIOS
    """MODELPLANE_CHAOS_SCENARIOS: which to run, comma-separated."""
    services: tuple[str, ...] = SERVICES
    """MODELPLANE_CHAOS_SERVICES: services the per-service scenarios cover."""
    capacity_concurrency: int = 64
    """Closed-loop callers that measure the inference service's capacity: as many as a
    full batch (the default max_batch_size), so that capacity is the most it serves (at 16
    the overload MLP served 525 requests a second, 5x "that" only ~4x what it can)."""
    capacity_s: float = 4.0
    overload_factor: float = 5.0
    """The open-loop arrival rate, in multiples of the measured capacity (one run)."""
    overload_factors: str = "2,5"
    """The overload runs, each its own row: 2x, and the issue's 5x, where taking the calls
    alone fills about half of the service's one CPU."""
    overload_s: float = 10.0
    overload_layers: str = "512,8192,8192,16"
    """The MLP served in the overload: 13x the heavy demo's work per row (a 285 MB model
    made at the start), so its capacity (~1,000 requests a second on one CPU) is low
    enough for the harness, on the CPU the service does not use, to offer 5x it without
    falling behind (one Python sender offers ~5,000-8,000 calls/s)."""
    pin: int = 1
    """1: in the overload, the inference service runs on the last CPU and the harness on
    the others, so the load generator does not take the CPU the service is measured on."""
    overload_senders: int = 1
    """Worker processes the overload is sent from (one asyncio loop cannot keep up)."""
    deadline_s: float = 1.0
    """Deadline of every overload call."""
    queue_wait_ms: int = 100
    """The inference service's queue-wait bound in the overload
    (MODELPLANE_INFERENCE_MAX_QUEUE_WAIT_US), as an operator who wants accepted calls to
    keep their latency sets it; 0: the service's default (off)."""
    shed_lag_us: int = 1000
    """The inference service's shed_loop_lag_us in the overload (default 0: off): new calls
    are refused at their headers, in a share, while the event loop runs later than this."""
    gc_threshold: int = 5000
    """The inference service's gc_threshold in the overload (default 20,000). At ~2,500
    calls a second each leaves a few objects in reference cycles inside grpc.aio, so with
    20,000 a young collection freed them every ~1.3 s and held the event loop 5-12 ms
    each time, every call arriving meanwhile waiting; with 5,000 the pauses stayed under
    ~4 ms."""
    runtime_nice: int = 10
    """The inference service's runtime_thread_nice in the overload (default 0), as for a
    service on a CPU of its own: the event loop answers calls before the model computes,
    so rejections stay fast."""
    slow_clients: int = 500
    """Calls that send headers and never a body (and as many idle client streams)."""
    slow_connections: int = 100
    """Connections the slow calls are spread over."""
    slow_hold_s: float = 8.0
    """How long the slow calls are held open while a normal client keeps calling."""
    slow_timeout_s: float = 3.0
    """The services' request_body_timeout_s and stream_idle_timeout_s in the slow-client
    scenario (defaults 10 s and 300 s): shorter than the hold, so the table shows the
    servers ending the slow calls themselves."""
    writers: int = 8
    """Closed-loop writers in the kill and term scenarios."""
    load_s: float = 3.0
    """Seconds of write load before the kill or term, and again after the restart."""
    write_timeout_s: float = 2.0
    grace_s: float = 5.0
    """The services' shutdown grace period in the term scenario."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ChaosConfig:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = env.get(f"MODELPLANE_CHAOS_{field.name.upper()}")
            if raw is None or raw == "":
                continue
            if field.name in ("scenarios", "services"):
                allowed = SCENARIOS if field.name == "scenarios" else SERVICES
                chosen = tuple(part.strip() for part in raw.split(",") if part.strip())
                unknown = [part for part in chosen if part not in allowed]
                if unknown:
                    raise ValueError(
                        f"MODELPLANE_CHAOS_{field.name.upper()}: unknown {unknown}; "
                        f"choose from {', '.join(allowed)}"
                    )
                values[field.name] = chosen
            elif field.type == "int":
                values[field.name] = int(raw)
            elif field.type == "str":
                values[field.name] = raw
            else:
                values[field.name] = float(raw)
        return cls(**values)  # type: ignore[arg-type]
