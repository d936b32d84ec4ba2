"""StateLock: one holder at a time, named in the refusal; freed by release or by the
holder's death, however it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from modelplane.kernel.state_lock import StateInUse, StateLock


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    first = StateLock(tmp_path / "state.lock", "the state")
    try:
        with pytest.raises(StateInUse, match=rf"the state is in use by pid {os.getpid()}"):
            StateLock(tmp_path / "state.lock", "the state")
    finally:
        first.release()
    StateLock(tmp_path / "state.lock", "the state").release()  # free again once released


def test_the_lock_dies_with_its_holder(tmp_path):
    path = tmp_path / "sub" / "state.lock"
    script = (
        "import time; from pathlib import Path; from modelplane.kernel.state_lock import "
        f"StateLock; lock = StateLock(Path({str(path)!r}), 'x'); print('held', flush=True); "
        "time.sleep(60)  # ok-sleep: the holder keeps the lock until the test kills it"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(StateInUse, match=f"pid {holder.pid}"):
            StateLock(path, "x")
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to release anything
        holder.wait(timeout=30)
    StateLock(path, "x").release()
