"""A batch job's process gets Arrow's memory in small pages: the setting reaches mimalloc
(which reads it when pyarrow loads) in `modelplane score batch`, and no other command's
process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from modelplane.kernel import arrow_memory

OPTION = "allow_thp"
"""The option MIMALLOC_ALLOW_THP sets, as mimalloc names it in its report."""


def _option_seen_by_mimalloc(*command: str) -> str:
    """The value of OPTION that mimalloc reports at its start (MIMALLOC_VERBOSE) in a
    `modelplane COMMAND --help` process."""
    env = {k: v for k, v in os.environ.items() if k not in arrow_memory.BATCH_JOB}
    env["MIMALLOC_VERBOSE"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "modelplane.cli.main", *command, "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    found = re.search(rf"option '{OPTION}': (-?\d+)", done.stderr)
    assert found, done.stderr[-2000:]
    return found.group(1)


def test_score_batch_gets_small_pages_and_other_commands_do_not() -> None:
    batch = arrow_memory.BATCH_JOB[arrow_memory.ALLOW_THP]
    assert _option_seen_by_mimalloc("score", "batch") == batch
    assert _option_seen_by_mimalloc("score", "stream") != batch
    assert _option_seen_by_mimalloc("registry") != batch


def test_a_value_in_the_environment_wins_and_nothing_changes_once_pyarrow_is_loaded() -> None:
    probe = (
        "import os, sys; from modelplane.kernel import arrow_memory as m; "
        "print(m.for_batch_job(), os.environ[m.ALLOW_THP]); "
        "import pyarrow; del os.environ[m.ALLOW_THP]; "
        "print(m.for_batch_job(), m.ALLOW_THP in os.environ)"
    )
    env = {**os.environ, arrow_memory.ALLOW_THP: "1"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "1", "False", "False"]
