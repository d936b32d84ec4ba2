"""Pinning a service process to chosen CPUs (the `cpus` setting).

A Python gRPC server runs its Python work one thread at a time (the GIL), yet by
default its threads (the synchronous server's poller and handler threads, the aio
server's event loop and gRPC core's threads) are spread over every CPU. Each hand-off
between two of them then wakes another CPU and moves the GIL across. On the 2-vCPU
VMs this project is measured on, the feature service pinned to one CPU answered a
1-entity read in p50 0.43 ms instead of 0.58-0.61 and, with 16 callers, served ~5,000
requests/s at ~200 µs of CPU each instead of ~2,000 at ~510 (`make bench` prints both).
Scale such a service out with more processes, one per CPU, rather than more CPUs per
process. A service whose heavy work runs outside the GIL (the inference service's ONNX
Runtime threads) may still want several CPUs: measure before pinning it to one.
"""

from __future__ import annotations

import os


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPUs in Linux's list syntax ("1", "0-3", "0,2,4-5"); "" is the empty set."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{part!r} is not a CPU number or range such as 0-3")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"CPU range {part!r} runs backwards")
        cpus.update(range(low, high + 1))
    if text.strip() and not cpus:
        raise ValueError(f"{text!r} names no CPU")
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int] | set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def pin_process(cpus: frozenset[int]) -> None:
    """Runs every thread of this process, and every thread it starts later, on `cpus`.

    Call it at startup, before the server starts its threads; threads that already
    exist are pinned too, as they would otherwise keep running anywhere. An empty set
    changes nothing. A CPU this process may not use (not present, or outside its
    cgroup's cpuset) is an error rather than silently dropped.
    """
    if not cpus:
        return
    available = os.sched_getaffinity(0)
    missing = cpus - available
    if missing:
        raise ValueError(
            f"CPU {format_cpu_list(missing)} is not available to this process "
            f"(available: {format_cpu_list(available)})"
        )
    for thread_id in _thread_ids():
        try:
            os.sched_setaffinity(thread_id, cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            continue


def _thread_ids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except FileNotFoundError:  # no /proc: only the calling thread is known
        return [0]
