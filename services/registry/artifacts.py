"""Artifact bytes, content-addressed by SHA-256 and immutable once stored.

An upload streams into a temporary file in the store's own filesystem while it is
hashed, so memory stays bounded whatever the size. Committing fsyncs the file and
renames it to its digest, which is atomic: a blob path either holds complete,
verified bytes or does not exist. Identical bytes are stored once. Reads hash what
they return and fail with DATA_LOSS if the bytes no longer match their address.
Temporary files left by a crashed process are removed when the store opens.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import grpc

from modelplane.kernel.errors import (
    InvalidArgument,
    ModelplaneError,
    ResourceExhausted,
)
from modelplane.services.registry.domain import validate_sha256

log = logging.getLogger("modelplane.registry.artifacts")

_TEMP_PREFIX = "upload-"
_TEMP_SUFFIX = ".part"


class ArtifactCorrupted(ModelplaneError):
    """Stored bytes no longer match their digest (disk corruption or tampering)."""

    code = grpc.StatusCode.DATA_LOSS


@dataclass(frozen=True)
class PendingArtifact:
    """A completely received upload, not yet stored under its digest."""

    path: Path
    sha256: str
    size_bytes: int


class ArtifactWriter(Protocol):
    @property
    def size_bytes(self) -> int: ...
    def write(self, chunk: bytes) -> None: ...
    def finish(self) -> PendingArtifact: ...
    def abort(self) -> None: ...


class ArtifactReader(Protocol):
    def read(self, size: int) -> bytes: ...
    def close(self) -> None: ...


class ArtifactStore(Protocol):
    """Blocking; the servicer runs it off the event loop."""

    def begin(self) -> ArtifactWriter: ...
    def commit(self, pending: PendingArtifact) -> None: ...
    def discard(self, pending: PendingArtifact) -> None: ...
    def exists(self, sha256: str) -> bool: ...
    def open(self, sha256: str, size_bytes: int) -> ArtifactReader: ...
    def remove_stale_uploads(self) -> int: ...
    def remove_unreferenced(self, referenced: set[str], older_than_s: float) -> int: ...


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        # A file named after our own pid predates this process (pid reuse).
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalUpload:
    """Writes into a temporary file, hashing as it goes."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self._path = path
        self._max_bytes = max_bytes
        self._file: BinaryIO | None = open(path, "xb")  # noqa: SIM115 - closed in finish/abort
        self._hash = hashlib.sha256()
        self._size = 0

    @property
    def size_bytes(self) -> int:
        return self._size

    def write(self, chunk: bytes) -> None:
        if self._file is None:
            raise RuntimeError("upload already finished")
        if self._size + len(chunk) > self._max_bytes:
            raise ResourceExhausted(f"artifact exceeds the limit of {self._max_bytes} bytes")
        try:
            self._file.write(chunk)
        except OSError as exc:
            raise ResourceExhausted(f"registry cannot store the artifact: {exc.strerror}") from exc
        self._hash.update(chunk)
        self._size += len(chunk)

    def finish(self) -> PendingArtifact:
        if self._file is None:
            raise RuntimeError("upload already finished")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise ResourceExhausted(f"registry cannot store the artifact: {exc.strerror}") from exc
        finally:
            self._file.close()
            self._file = None
        return PendingArtifact(self._path, self._hash.hexdigest(), self._size)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._path.unlink(missing_ok=True)


class VerifyingReader:
    """Reads a blob, and at its end checks that the bytes hash to their address."""

    def __init__(self, path: Path, sha256: str) -> None:
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._sha256 = sha256
        self._hash = hashlib.sha256()
        self._verified = False

    def read(self, size: int) -> bytes:
        chunk = self._file.read(size)
        if chunk:
            self._hash.update(chunk)
        elif not self._verified:
            if self._hash.hexdigest() != self._sha256:
                log.error("artifact %s is corrupted on disk", self._sha256)
                raise ArtifactCorrupted(
                    f"stored artifact {self._sha256} no longer matches its digest"
                )
            self._verified = True
        return chunk

    def close(self) -> None:
        self._file.close()


class LocalArtifactStore:
    """Blobs at `<root>/sha256/<first two hex>/<digest>`, uploads in `<root>/tmp`."""

    def __init__(self, root: Path, max_artifact_bytes: int) -> None:
        self.root = root
        self._blobs = root / "sha256"
        self._tmp = root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._max_bytes = max_artifact_bytes

    def blob_path(self, sha256: str) -> Path:
        validate_sha256(sha256)
        return self._blobs / sha256[:2] / sha256

    def begin(self) -> LocalUpload:
        name = f"{_TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}{_TEMP_SUFFIX}"
        return LocalUpload(self._tmp / name, self._max_bytes)

    def commit(self, pending: PendingArtifact) -> None:
        target = self.blob_path(pending.sha256)
        if target.exists() and target.stat().st_size == pending.size_bytes:
            # Identical bytes are stored once; the digest already proved they are equal.
            pending.path.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(pending.path, 0o444)
        os.replace(pending.path, target)
        _fsync_dir(target.parent)

    def discard(self, pending: PendingArtifact) -> None:
        pending.path.unlink(missing_ok=True)

    def exists(self, sha256: str) -> bool:
        return self.blob_path(sha256).exists()

    def open(self, sha256: str, size_bytes: int) -> VerifyingReader:
        path = self.blob_path(sha256)
        try:
            actual = path.stat().st_size
        except FileNotFoundError as exc:
            log.error("artifact %s of a registered version is missing", sha256)
            raise ArtifactCorrupted(
                f"artifact {sha256} is missing from the artifact store"
            ) from exc
        if actual != size_bytes:
            raise ArtifactCorrupted(
                f"stored artifact {sha256} has {actual} bytes, {size_bytes} were registered"
            )
        return VerifyingReader(path, sha256)

    def remove_stale_uploads(self) -> int:
        """Deletes temporary files of processes that no longer run (crashed mid-upload)."""
        removed = 0
        for path in self._tmp.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            pid_text = path.name.removeprefix(_TEMP_PREFIX).split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)):
                continue  # another registry process sharing the directory is uploading
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        if removed:
            log.info("removed %d incomplete upload(s) left by a previous run", removed)
        return removed

    def remove_unreferenced(self, referenced: set[str], older_than_s: float) -> int:
        """Deletes blobs no version refers to. A crash between storing a blob and
        registering its version leaves one; the age bound keeps blobs that another
        process sharing the directory is registering right now."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self._blobs.glob("*/*"):
            if path.name in referenced or not path.is_file():
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        if removed:
            log.info("removed %d artifact(s) no version refers to", removed)
        return removed

    def temporary_files(self) -> list[Path]:
        return sorted(self._tmp.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"))


def check_expected(pending: PendingArtifact, sha256: str, size_bytes: int) -> None:
    """The uploader's claims about the bytes, if it made any, must hold."""
    if pending.size_bytes == 0:
        raise InvalidArgument("the upload carried no bytes")
    if size_bytes and pending.size_bytes != size_bytes:
        raise InvalidArgument(
            f"received {pending.size_bytes} bytes, the metadata announced {size_bytes}"
        )
    if sha256 and pending.sha256 != sha256:
        raise InvalidArgument(
            f"digest mismatch: received bytes hash to {pending.sha256}, expected {sha256}"
        )
