"""Which CPUs a serving process may use, how worker processes share them, and how one
process lays its threads out on its share.

`os.cpu_count()` counts the machine's CPUs, not the ones this process may run on (its
affinity mask: `taskset`, `--cpus`, a container's cpuset) nor the CPU time it may take
(a cgroup quota: `docker --cpus`, a Kubernetes CPU limit). Threads sized from it
oversubscribe whatever the process really has. The share is therefore read from
`os.sched_getaffinity` and the cgroup's quota (`cpu.max` in cgroup v2,
`cpu.cfs_quota_us`/`cpu.cfs_period_us` in v1), the smaller of the two deciding.

The layout inside a process (`thread_layout`) follows what the inference service
measured on a 2-CPU VM (heavy MLP, default settings, 64 closed-loop clients, the
generator on the same machine; old and new code started in alternation): with ONNX
Runtime's intra-op pool as large as the machine (2 threads) and every thread free to run
anywhere, the pool's threads, the event loop and the generator took CPUs from each other
(the loop thread was preempted 3,300-6,700 times a second and spent 25-46% of the time
waiting to run), batches stayed small (mean 4.8-8.5 rows, 20-53% of them single rows)
and each start's figures followed where its threads landed and what else ran: 2,480-
3,330 req/s at 370-460 µs of server CPU per request with other processes taking 0.2 CPU,
1,170-2,030 at 470-670 µs beside 0.8-0.9 CPU of other work. With the event loop and
gRPC's threads on one CPU and the batch thread (one intra-op thread) on the other:
4,210-4,460 req/s at 295-310 µs (2,070-2,410 at 290-385 µs beside 0.85 CPU of other
work), batches of ~18-21 rows. A process whose share is one CPU runs everything there.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modelplane.kernel.cpu_affinity import format_cpu_list


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("max 100000" or "150000 100000") as CPUs; None: no limit."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        raise ValueError(f"cpu.max {text.strip()!r} is not '<quota> <period>'") from None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us` as CPUs; None: no limit (-1)."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        raise ValueError(
            f"cfs quota {quota_text.strip()!r} / period {period_text.strip()!r} are not integers"
        ) from None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _mounts(root: Path) -> dict[str, tuple[str, str]]:
    """cgroup filesystems from /proc/self/mountinfo: controller ("" for v2) -> (mount
    point, the cgroup path at that mount's root)."""
    found: dict[str, tuple[str, str]] = {}
    for line in (_read(root / "proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) < 3:
            continue
        fstype, options = after[0], after[2].split(",")
        if fstype == "cgroup2":
            found.setdefault("", (fields[4], fields[3]))
        elif fstype == "cgroup":
            for option in options:
                found.setdefault(option, (fields[4], fields[3]))
    return found


def _ancestors(mount_point: str, mount_root: str, cgroup_path: str) -> list[str]:
    """The directories of a cgroup and its parents, as far as the mount shows them."""
    relative = cgroup_path
    if mount_root not in ("", "/") and relative.startswith(mount_root):
        relative = relative[len(mount_root) :]
    parts = [part for part in relative.split("/") if part]
    return [os.path.join(mount_point, *parts[:depth]) for depth in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: Path = Path("/")) -> float | None:
    """The CPU time this process's cgroup (or any ancestor it can see) may use, in CPUs;
    None when no quota applies or none can be read. `root` is for tests."""
    mounts = _mounts(root)
    limits: list[float] = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "" and "" in mounts:
            mount_point, mount_root = mounts[""]
            for directory in _ancestors(mount_point, mount_root, path):
                text = _read(root / directory.lstrip("/") / "cpu.max")
                if text is not None and (limit := parse_cpu_max(text)) is not None:
                    limits.append(limit)
        elif "cpu" in controllers.split(","):
            for controller in controllers.split(","):
                if controller in mounts:
                    mount_point, mount_root = mounts[controller]
                    break
            else:
                continue
            for directory in _ancestors(mount_point, mount_root, path):
                base = root / directory.lstrip("/")
                quota, period = _read(base / "cpu.cfs_quota_us"), _read(base / "cpu.cfs_period_us")
                if quota is None or period is None:
                    continue
                if (limit := parse_cfs_quota(quota, period)) is not None:
                    limits.append(limit)
    return min(limits) if limits else None


@dataclass(frozen=True, slots=True)
class CpuShare:
    """The CPUs one process may run on and how many CPUs' worth of time it may use."""

    cpus: frozenset[int]
    capacity: int
    pinned: bool = False
    """True when the process is to be pinned to `cpus` (a worker's own CPUs)."""

    def describe(self) -> str:
        text = _cpus(self.cpus)
        if self.capacity < len(self.cpus):
            text += f" (CPU quota: {self.capacity})"
        return text


def _cpus(cpus: frozenset[int]) -> str:
    return f"CPU{'s' if len(cpus) > 1 else ''} {format_cpu_list(cpus)}"


def capacity_of(cpus: frozenset[int], limit: float | None) -> int:
    """Whole CPUs of time: the CPUs available, fewer under a quota (rounded up: a 1.5-CPU
    quota keeps two threads busy part of the time), at least one."""
    count = len(cpus)
    if limit is not None:
        count = min(count, math.ceil(limit - 1e-9))
    return max(1, count)


def process_share(root: Path = Path("/")) -> CpuShare:
    """This process's share: its affinity mask under its cgroup's quota."""
    cpus = frozenset(os.sched_getaffinity(0))
    return CpuShare(cpus, capacity_of(cpus, cgroup_cpu_limit(root)))


def worker_shares(workers: int, cpus: frozenset[int], limit: float | None) -> list[CpuShare]:
    """Splits `cpus` between `workers` processes so they do not fight over cores.

    With no more workers than CPUs each worker gets its own CPUs (consecutive ones, the
    first workers one more when they do not divide evenly) and is pinned there; its
    capacity is that many CPUs, fewer under a quota, which is divided evenly. With more
    workers than CPUs they cannot have CPUs of their own: none is pinned and each sizes
    its threads from its part of the capacity (at least one thread).
    """
    if workers < 1:
        raise ValueError("at least one worker")
    if not cpus:
        raise ValueError("no CPU to share")
    total = capacity_of(cpus, limit)
    per_worker = limit / workers if limit is not None else None
    ordered = sorted(cpus)
    if workers > len(ordered):
        return [CpuShare(cpus, max(1, total // workers), pinned=False) for _ in range(workers)]
    size, extra = divmod(len(ordered), workers)
    shares = []
    start = 0
    for index in range(workers):
        end = start + size + (1 if index < extra else 0)
        own = frozenset(ordered[start:end])
        shares.append(CpuShare(own, capacity_of(own, per_worker), pinned=workers > 1))
        start = end
    return shares


@dataclass(frozen=True, slots=True)
class ThreadLayout:
    """Where one serving process runs its threads.

    `serving`: the event loop and gRPC's threads (they hand requests to each other under
    the GIL, so they share a CPU); `compute`: the threads that run batches and ONNX
    Runtime's intra-op threads, which release the GIL; `intra_op_threads`: the intra-op
    threads per model that fill `compute` without oversubscribing the share."""

    serving: frozenset[int]
    compute: frozenset[int]
    intra_op_threads: int

    @property
    def split(self) -> bool:
        return self.serving != self.compute

    def describe(self) -> str:
        threads = (
            f"{self.intra_op_threads} intra-op thread{'s' if self.intra_op_threads > 1 else ''}"
        )
        if not self.split:
            return f"all threads on {_cpus(self.serving)}, {threads}"
        return (
            f"event loop and gRPC on {_cpus(self.serving)}, batches on {_cpus(self.compute)} "
            f"with {threads}"
        )


def thread_layout(share: CpuShare) -> ThreadLayout:
    """One CPU of the share for the event loop and gRPC, the others for the model. A
    share of one CPU (or one CPU's worth of time) keeps every thread together; so does a
    quota smaller than the CPUs, which the process then shares with others (tied to one
    of them, the loop could not move off it when another process wanted it too); the
    intra-op threads are then what the quota leaves beside the loop."""
    ordered = sorted(share.cpus)
    if share.capacity < 2 or len(ordered) < 2:
        return ThreadLayout(share.cpus, share.cpus, 1)
    if share.capacity < len(ordered):
        return ThreadLayout(share.cpus, share.cpus, share.capacity - 1)
    serving = frozenset(ordered[:1])
    compute = frozenset(ordered[1:])
    return ThreadLayout(serving, compute, len(compute))


def pin_thread(cpus: frozenset[int] | set[int]) -> None:
    """Runs the calling thread (only it) on `cpus`; threads it starts later inherit them."""
    if cpus:
        os.sched_setaffinity(0, cpus)


@contextlib.contextmanager
def thread_affinity(cpus: frozenset[int] | set[int]) -> Iterator[None]:
    """The calling thread runs on `cpus` inside the block, so the threads a library
    starts there (ONNX Runtime's intra-op pool) inherit them; restored afterwards."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
