"""Server CPU time read from a Prometheus /metrics endpoint.

`process_cpu_seconds_total` (user + system time of the serving process) read before
and after a level, divided by the requests answered, is steadier than throughput on
a shared machine and is what a fleet pays per request.
"""

from __future__ import annotations

import asyncio
import http.client
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

CPU_SAMPLE = "process_cpu_seconds_total"


class MetricsError(RuntimeError):
    """The endpoint could not be read or has no CPU counter."""


def parse_cpu_seconds(text: str) -> float:
    """The CPU counter in a Prometheus text exposition (summed if labelled, e.g. when
    several processes export it under one endpoint)."""
    try:
        values = [
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == CPU_SAMPLE
        ]
    except ValueError as exc:
        raise MetricsError(f"not a Prometheus text exposition: {exc}") from exc
    if not values:
        raise MetricsError(f"no {CPU_SAMPLE} in the metrics")
    return float(sum(values))


def read_cpu_seconds(url: str, timeout_s: float = 5.0) -> float:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        detail = str(exc) if isinstance(exc, OSError) else "not an HTTP /metrics endpoint?"
        raise MetricsError(f"cannot read {url}: {type(exc).__name__} ({detail})") from exc
    return parse_cpu_seconds(text)


def metrics_url(value: str) -> str:
    """Accepts host:port, http://host:port or a full URL; defaults the path to /metrics."""
    url = value if "://" in value else f"http://{value}"
    scheme_end = url.index("://") + 3
    if "/" not in url[scheme_end:]:
        url += "/metrics"
    return url


class ServerCpuProbe:
    """Reads the server's CPU counter off the event loop (urllib blocks)."""

    def __init__(self, url: str) -> None:
        self.url = metrics_url(url)

    async def read(self) -> float:
        return await asyncio.to_thread(read_cpu_seconds, self.url)
