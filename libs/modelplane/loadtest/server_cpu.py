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


def metrics_urls(value: str) -> list[str]:
    """A comma-separated list of endpoints (one per server process: workers that each
    expose their own), each in any form `metrics_url` takes."""
    urls = [metrics_url(part.strip()) for part in value.split(",") if part.strip()]
    if not urls:
        raise MetricsError(f"no metrics endpoint in {value!r}")
    return urls


class ServerCpuProbe:
    """Reads the server's CPU counter off the event loop (urllib blocks): the sum over
    every endpoint given, so a server of several processes counts all of them."""

    def __init__(self, url: str) -> None:
        self.urls = metrics_urls(url)

    async def read(self) -> float:
        values = await asyncio.gather(
            *(asyncio.to_thread(read_cpu_seconds, url) for url in self.urls)
        )
        return float(sum(values))
