"""The manifest of a batch scoring job: which chunks of its input are committed, and
the job's identity (input, model digest, options), in a SQLite file inside the output
directory.

The commit protocol, per chunk:
  1. the chunk's predictions are written to temporary files (`.tmp-*`) in the output
     directory, fsynced;
  2. each is renamed to its final name (`part-<chunk id>.parquet`, under its partition
     folder), and the folders are fsynced;
  3. the chunk's row is inserted in the manifest, in one SQLite transaction.
A chunk is done if and only if its row exists. A crash before 3 leaves part files
that no row names (orphans) or temporary files: `open` deletes both, and the re-run
scores the chunk again under the same file names. A crash after 3 loses nothing. So
every input row is in exactly one committed part file, whatever the crash.

SQLite (not a JSON file rewritten per chunk) because a commit is then one small
atomic transaction, however many chunks the job has, and several writers (Ray actors,
processes) may commit to it at the same time.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "_manifest.sqlite"
LOCK_NAME = "_manifest.lock"
SUCCESS_NAME = "_SUCCESS"
PART_PREFIX = "part-"
TEMP_PREFIX = ".tmp-"


class ManifestMismatch(ValueError):
    """The output directory holds another job (another input, model or options)."""


class JobRunning(RuntimeError):
    """Another process is running a job in this output directory."""


@dataclass(frozen=True)
class CommittedChunk:
    chunk_id: str
    rows: int
    files: tuple[str, ...]  # relative to the output directory


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_identity(stored_json: str, wanted: Mapping[str, Any], where: str, flag: str) -> None:
    """Refuses to resume, naming what differs, when the job recorded at `where` (its
    identity as stored JSON) is not the one asked for; `flag` names the option that
    gives a job a fresh output."""
    stored = json.loads(stored_json)
    if stored != wanted:
        raise ManifestMismatch(
            f"{where} holds a job with another identity, so it cannot be resumed with "
            f"these arguments (use a new {flag}, or the same input, model version and "
            "options):\n  " + "\n  ".join(_differences(stored, wanted))
        )


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [
        f"{key}: {json.dumps(stored.get(key))[:120]} -> {json.dumps(wanted.get(key))[:120]}"
        for key in keys
        if stored.get(key) != wanted.get(key)
    ]


class ChunkManifest:
    """One job's manifest in `directory`. `open` checks (or records) the job's identity
    and removes orphan files; `commit` records a chunk whose files are in place."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / MANIFEST_NAME
        # Held for the manifest's life: two runs of one job at once would delete each
        # other's files in flight as orphans.
        self._lock = open(directory / LOCK_NAME, "a")  # noqa: SIM115 - closed in close()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise JobRunning(f"another job is running in {directory}") from None
        # Autocommit mode: each statement is its own transaction, unless BEGIN is used.
        # Opened here, used by the local engine's writer thread (one thread at a time).
        self._db = sqlite3.connect(
            self.path, timeout=60.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS job (identity TEXT NOT NULL, created REAL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS chunks (chunk_id TEXT PRIMARY KEY, rows INTEGER NOT"
            " NULL, files TEXT NOT NULL, committed_at REAL NOT NULL)"
        )

    @classmethod
    def open(cls, directory: Path, identity: Mapping[str, Any]) -> ChunkManifest:
        """The manifest of the job `identity` in `directory` (created if the directory is
        new or empty). Refuses a directory that holds another job, or files but no
        manifest; deletes orphan part files and temporary files."""
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / MANIFEST_NAME).exists() and any(directory.iterdir()):
            raise ManifestMismatch(
                f"{directory} is not empty and holds no batch manifest ({MANIFEST_NAME}); "
                "give a new or empty output directory"
            )
        manifest = cls(directory)
        try:
            manifest._claim(identity)
            manifest.remove_orphans()
        except BaseException:
            manifest.close()
            raise
        return manifest

    def _claim(self, identity: Mapping[str, Any]) -> None:
        wanted = json.loads(json.dumps(identity, sort_keys=True))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT identity FROM job").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO job VALUES (?, ?)",
                    (json.dumps(wanted, sort_keys=True), time.time()),
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        if row is not None:
            check_identity(row[0], wanted, str(self.directory), "--output")

    def identity(self) -> dict[str, Any]:
        row = self._db.execute("SELECT identity FROM job").fetchone()
        return dict(json.loads(row[0])) if row else {}

    def committed(self) -> dict[str, CommittedChunk]:
        return {
            chunk_id: CommittedChunk(chunk_id, rows, tuple(json.loads(files)))
            for chunk_id, rows, files in self._db.execute(
                "SELECT chunk_id, rows, files FROM chunks"
            )
        }

    def commit(self, chunk_id: str, rows: int, files: Iterable[str]) -> None:
        """Records a chunk whose files are already renamed into place and fsynced."""
        self._db.execute(
            "INSERT INTO chunks VALUES (?, ?, ?, ?)",
            (chunk_id, rows, json.dumps(sorted(files)), time.time()),
        )

    def remove_orphans(self) -> list[Path]:
        """Deletes temporary files, and part files no committed chunk names (a crash
        between their rename and the chunk's commit). Other files are left alone."""
        named = {f for chunk in self.committed().values() for f in chunk.files}
        removed = []
        for path in sorted(self.directory.rglob("*")):
            if not path.is_file():
                continue
            relative = path.relative_to(self.directory).as_posix()
            if path.name.startswith(TEMP_PREFIX) or (
                path.name.startswith(PART_PREFIX) and relative not in named
            ):
                path.unlink()
                removed.append(path)
        return removed

    def close(self) -> None:
        self._db.close()
        self._lock.close()
