"""One process at a time per piece of embedded state.

A service that keeps a copy of its embedded state in memory (the feature service
caches its definition catalog) goes silently stale when a second process changes the
same files: each serves its own catalog, and two applies race on the same version
numbers. So such a service holds an exclusive lock on a file beside its state for as
long as it runs, and a second one refuses to start, saying which process holds it.
The lock is the kernel's (flock): it is released when the holder exits, however it
exits, so a crash leaves nothing to clean up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class StateInUse(RuntimeError):
    """Another live process holds the lock."""


class StateLock:
    def __init__(self, path: Path, what: str) -> None:
        """Takes the lock on `path` (created if missing) or raises StateInUse;
        `what` names the state in the message."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] | None = open(path, "a+")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise StateInUse(
                f"{what} is in use by {holder} (lock {path}); give each process its own "
                "data directory"
            ) from None
        self._file.truncate(0)
        self._file.write(f"pid {os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the last descriptor drops the lock
            self._file = None
