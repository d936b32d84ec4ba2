"""Load generator for any KServe v2 gRPC endpoint (`modelplane loadtest`, `make bench`).

Closed-loop concurrency sweeps and open-loop fixed-rate runs; latency percentiles,
errors by status code, and server and client CPU per request.
"""

from modelplane.loadtest.payload import Payload, build_payload
from modelplane.loadtest.report import Report, load_report, write_report
from modelplane.loadtest.stats import LevelResult, percentile
from modelplane.loadtest.sweep import LevelPlan, SweepConfig, run_sweep

__all__ = [
    "LevelPlan",
    "LevelResult",
    "Payload",
    "Report",
    "SweepConfig",
    "build_payload",
    "load_report",
    "percentile",
    "run_sweep",
    "write_report",
]
