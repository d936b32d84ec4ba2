"""A process's CPU share (affinity mask, cgroup quota), how workers split the CPUs, and
how one process lays its threads out on its share."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from modelplane.kernel.cpu_share import (
    CpuShare,
    capacity_of,
    cgroup_cpu_limit,
    parse_cfs_quota,
    parse_cpu_max,
    process_share,
    thread_affinity,
    thread_layout,
    worker_shares,
)

V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n"
V1_CPU_MOUNT = (
    "32 31 0:29 {root} /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
)


def fake_cgroup(root: Path, cgroup: str, mountinfo: str, files: dict[str, str]) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5), ("50000", 0.5)],
)
def test_cpu_max_reads_as_cpus(text, cpus):
    assert parse_cpu_max(text) == cpus


def test_a_malformed_cpu_max_is_an_error():
    with pytest.raises(ValueError, match=r"cpu\.max"):
        parse_cpu_max("lots 100000")


def test_cfs_quota_reads_as_cpus():
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_cfs_quota("50000\n", "100000\n") == 0.5
    assert parse_cfs_quota("300000", "100000") == 3.0


def test_cgroup_v2_quota_of_the_process_or_an_ancestor(tmp_path):
    root = fake_cgroup(
        tmp_path,
        "0::/kubepods/pod1/c1\n",
        V2_MOUNT,
        {
            "sys/fs/cgroup/kubepods/pod1/c1/cpu.max": "max 100000\n",
            "sys/fs/cgroup/kubepods/pod1/cpu.max": "250000 100000\n",
            "sys/fs/cgroup/kubepods/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_cpu_limit(root) == 2.5


def test_cgroup_v2_in_a_container_sees_its_own_cgroup_at_the_mount(tmp_path):
    root = fake_cgroup(tmp_path, "0::/\n", V2_MOUNT, {"sys/fs/cgroup/cpu.max": "150000 100000\n"})
    assert cgroup_cpu_limit(root) == 1.5


def test_cgroup_v1_cfs_quota(tmp_path):
    base = "sys/fs/cgroup/cpu,cpuacct/docker/abc"
    root = fake_cgroup(
        tmp_path,
        "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
        V1_CPU_MOUNT.format(root="/"),
        {f"{base}/cpu.cfs_quota_us": "100000\n", f"{base}/cpu.cfs_period_us": "100000\n"},
    )
    assert cgroup_cpu_limit(root) == 1.0


def test_cgroup_v1_mounted_at_the_containers_own_cgroup(tmp_path):
    base = "sys/fs/cgroup/cpu,cpuacct"
    root = fake_cgroup(
        tmp_path,
        "4:cpu,cpuacct:/docker/abc\n",
        V1_CPU_MOUNT.format(root="/docker/abc"),
        {f"{base}/cpu.cfs_quota_us": "200000\n", f"{base}/cpu.cfs_period_us": "100000\n"},
    )
    assert cgroup_cpu_limit(root) == 2.0


def test_no_quota_or_nothing_readable_means_no_limit(tmp_path):
    unlimited = fake_cgroup(
        tmp_path / "a", "0::/\n", V2_MOUNT, {"sys/fs/cgroup/cpu.max": "max 100000\n"}
    )
    assert cgroup_cpu_limit(unlimited) is None
    assert cgroup_cpu_limit(tmp_path / "nothing-here") is None


def test_this_process_has_a_share():
    share = process_share()
    assert share.cpus == frozenset(os.sched_getaffinity(0))
    assert 1 <= share.capacity <= len(share.cpus)
    assert not share.pinned


@pytest.mark.parametrize(
    ("cpus", "limit", "capacity"),
    [({0, 1, 2, 3}, None, 4), ({0, 1, 2, 3}, 1.5, 2), ({0, 1}, 2.0, 2), ({0}, 0.2, 1)],
)
def test_capacity_is_cpus_under_the_quota_rounded_up(cpus, limit, capacity):
    assert capacity_of(frozenset(cpus), limit) == capacity


def test_one_worker_keeps_every_cpu_unpinned():
    assert worker_shares(1, frozenset({0, 1}), None) == [CpuShare(frozenset({0, 1}), 2, False)]


def test_workers_no_more_than_cpus_each_get_their_own():
    assert worker_shares(2, frozenset({0, 1}), None) == [
        CpuShare(frozenset({0}), 1, True),
        CpuShare(frozenset({1}), 1, True),
    ]
    shares = worker_shares(3, frozenset(range(8)), None)
    assert [sorted(share.cpus) for share in shares] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [share.capacity for share in shares] == [3, 3, 2]
    assert all(share.pinned for share in shares)


def test_workers_divide_a_quota():
    shares = worker_shares(2, frozenset(range(8)), 2.0)
    assert [sorted(share.cpus) for share in shares] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [share.capacity for share in shares] == [1, 1]


def test_more_workers_than_cpus_share_them_unpinned_with_one_thread_each():
    shares = worker_shares(4, frozenset({2, 3}), None)
    assert shares == [CpuShare(frozenset({2, 3}), 1, False)] * 4


def test_the_shares_of_a_sparse_cpu_set_are_its_cpus():
    shares = worker_shares(2, frozenset({1, 5, 9, 13}), None)
    assert [sorted(share.cpus) for share in shares] == [[1, 5], [9, 13]]


def test_worker_shares_refuse_nonsense():
    with pytest.raises(ValueError):
        worker_shares(0, frozenset({0}), None)
    with pytest.raises(ValueError):
        worker_shares(1, frozenset(), None)


def test_one_cpu_keeps_every_thread_together():
    layout = thread_layout(CpuShare(frozenset({3}), 1))
    assert (layout.serving, layout.compute, layout.intra_op_threads) == ({3}, {3}, 1)
    assert not layout.split


def test_two_cpus_split_the_event_loop_from_the_model():
    layout = thread_layout(CpuShare(frozenset({0, 1}), 2))
    assert (layout.serving, layout.compute, layout.intra_op_threads) == ({0}, {1}, 1)
    assert layout.split


def test_the_model_gets_every_cpu_but_the_loops():
    layout = thread_layout(CpuShare(frozenset({4, 5, 6, 7}), 4))
    assert (layout.serving, layout.compute, layout.intra_op_threads) == ({4}, {5, 6, 7}, 3)


def test_a_quota_sizes_the_intra_op_threads_and_ties_no_thread_to_a_cpu():
    layout = thread_layout(CpuShare(frozenset(range(8)), 4))
    assert not layout.split and layout.intra_op_threads == 3
    assert layout.serving == layout.compute == frozenset(range(8))
    two = thread_layout(CpuShare(frozenset(range(8)), 2))
    assert not two.split and two.intra_op_threads == 1
    one = thread_layout(CpuShare(frozenset({0, 1}), 1))
    assert not one.split and one.intra_op_threads == 1


def test_thread_affinity_applies_to_the_block_and_is_restored():
    seen: dict[str, object] = {}

    def probe() -> None:  # in a thread of its own: the test runner is never pinned
        before = os.sched_getaffinity(0)
        one = {min(before)}
        with thread_affinity(one):
            seen["inside"] = os.sched_getaffinity(0)
        seen["after"] = os.sched_getaffinity(0) == before
        seen["one"] = one

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert seen["inside"] == seen["one"]
    assert seen["after"] is True
