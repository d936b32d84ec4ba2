"""The `cpus` setting: Linux CPU lists, and pinning every thread of a process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from modelplane.kernel.cpu_affinity import format_cpu_list, parse_cpu_list, pin_process
from modelplane.kernel.settings import ServiceSettings


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("", set()),
        ("1", {1}),
        ("0-3", {0, 1, 2, 3}),
        ("0,2,4-5", {0, 2, 4, 5}),
        (" 3 , 1 ", {1, 3}),
        ("2-2", {2}),
    ],
)
def test_a_cpu_list_names_these_cpus(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["x", "1-", "-1", "3-1", "1.5", "0-a", ",", "1;2"])
def test_a_malformed_cpu_list_is_refused(text):
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_a_cpu_list_prints_sorted():
    assert format_cpu_list({3, 0, 1}) == "0,1,3"


def test_the_setting_is_checked_when_read():
    assert ServiceSettings(cpus="0-1").cpu_set == {0, 1}
    assert ServiceSettings().cpu_set == frozenset()
    with pytest.raises(ValidationError, match="cpus"):
        ServiceSettings(cpus="3-1")


def test_an_empty_set_leaves_placement_alone():
    before = os.sched_getaffinity(0)
    pin_process(frozenset())
    assert os.sched_getaffinity(0) == before


def test_a_cpu_the_process_may_not_use_is_an_error_naming_it():
    absent = max(os.sched_getaffinity(0)) + 1000
    with pytest.raises(ValueError, match=f"CPU {absent} is not available"):
        pin_process(frozenset({absent}))


# In a child process, so the test runner itself is never pinned.
_PIN_THREADS = """
import os, sys, threading
from modelplane.kernel.cpu_affinity import pin_process
cpu = int(sys.argv[1])
started, done = threading.Event(), threading.Event()
seen = {}
def early():
    started.set()
    done.wait()
def late():
    seen["late"] = os.sched_getaffinity(0)
before = threading.Thread(target=early)
before.start()
started.wait()
pin_process(frozenset({cpu}))
seen["main"] = os.sched_getaffinity(0)
seen["early"] = os.sched_getaffinity(before.native_id)
after = threading.Thread(target=late)
after.start()
after.join()
done.set()
before.join()
print(sorted(seen.items()))
"""


def test_every_thread_runs_on_the_cpus_given_those_started_before_too():
    cpu = min(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", _PIN_THREADS, str(cpu)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.strip() == str(sorted({"early": {cpu}, "late": {cpu}, "main": {cpu}}.items()))
