"""A batch job's process keeps the memory Arrow's allocator frees: the setting reaches
mimalloc (which reads it when pyarrow loads) in `modelplane score batch`, and no other
command's process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from modelplane.kernel import arrow_memory


def _purge_delay_seen_by_mimalloc(*command: str) -> str:
    """The purge delay mimalloc reports at its start (MIMALLOC_VERBOSE) in a
    `modelplane COMMAND --help` process."""
    env = {k: v for k, v in os.environ.items() if k != arrow_memory.PURGE_DELAY}
    env["MIMALLOC_VERBOSE"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "modelplane.cli.main", *command, "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    found = re.search(r"option 'purge_delay': (-?\d+)", done.stderr)
    assert found, done.stderr[-2000:]
    return found.group(1)


def test_score_batch_keeps_freed_memory_and_other_commands_do_not() -> None:
    assert _purge_delay_seen_by_mimalloc("score", "batch") == arrow_memory.KEEP
    assert _purge_delay_seen_by_mimalloc("score", "stream") != arrow_memory.KEEP
    assert _purge_delay_seen_by_mimalloc("registry") != arrow_memory.KEEP


def test_a_value_in_the_environment_wins_and_nothing_changes_once_pyarrow_is_loaded() -> None:
    probe = (
        "import os, sys; from modelplane.kernel import arrow_memory as m; "
        "print(m.keep_freed_memory(), os.environ[m.PURGE_DELAY]); "
        "import pyarrow; del os.environ[m.PURGE_DELAY]; "
        "print(m.keep_freed_memory(), m.PURGE_DELAY in os.environ)"
    )
    env = {**os.environ, arrow_memory.PURGE_DELAY: "250"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "250", "False", "False"]
