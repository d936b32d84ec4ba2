"""The local artifact store: content addressing, atomic commit, verified reads."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelplane.kernel.errors import InvalidArgument, ResourceExhausted
from modelplane.services.registry.artifacts import (
    ArtifactCorrupted,
    LocalArtifactStore,
    check_expected,
)


def _store(tmp_path: Path, limit: int = 1 << 30) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts", limit)


def _read_all(store: LocalArtifactStore, sha256: str, size: int) -> bytes:
    reader = store.open(sha256, size)
    try:
        parts = []
        while chunk := reader.read(7):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        reader.close()


def test_upload_is_hashed_committed_read_only_and_verified(tmp_path: Path) -> None:
    store = _store(tmp_path)
    writer = store.begin()
    for part in (b"hello ", b"world"):
        writer.write(part)
    pending = writer.finish()
    assert pending.sha256 == hashlib.sha256(b"hello world").hexdigest()
    assert not store.exists(pending.sha256)
    store.commit(pending)
    blob = store.blob_path(pending.sha256)
    assert blob.read_bytes() == b"hello world"
    assert not os.access(blob, os.W_OK) or os.geteuid() == 0
    assert not pending.path.exists()
    assert _read_all(store, pending.sha256, 11) == b"hello world"


def test_identical_bytes_are_stored_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for _ in range(2):
        writer = store.begin()
        writer.write(b"same")
        store.commit(writer.finish())
    assert len([p for p in (tmp_path / "artifacts" / "sha256").rglob("*") if p.is_file()]) == 1
    assert store.temporary_files() == []


def test_corruption_is_detected(tmp_path: Path) -> None:
    store = _store(tmp_path)
    writer = store.begin()
    writer.write(b"original")
    pending = writer.finish()
    store.commit(pending)
    blob = store.blob_path(pending.sha256)
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")
    with pytest.raises(ArtifactCorrupted):
        _read_all(store, pending.sha256, 8)
    with pytest.raises(ArtifactCorrupted, match="has 8 bytes"):
        store.open(pending.sha256, 9)


def test_size_limit_and_abort(tmp_path: Path) -> None:
    store = _store(tmp_path, limit=10)
    writer = store.begin()
    writer.write(b"0123456789")
    with pytest.raises(ResourceExhausted):
        writer.write(b"x")
    writer.abort()
    assert store.temporary_files() == []


def test_expectations(tmp_path: Path) -> None:
    store = _store(tmp_path)
    writer = store.begin()
    writer.write(b"abc")
    pending = writer.finish()
    check_expected(pending, hashlib.sha256(b"abc").hexdigest(), 3)
    check_expected(pending, "", 0)
    with pytest.raises(InvalidArgument, match="digest mismatch"):
        check_expected(pending, "0" * 64, 0)
    with pytest.raises(InvalidArgument, match="announced 4"):
        check_expected(pending, "", 4)
    empty = store.begin().finish()
    with pytest.raises(InvalidArgument, match="no bytes"):
        check_expected(empty, "", 0)


def test_stale_uploads_of_dead_processes_are_removed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    tmp = tmp_path / "artifacts" / "tmp"
    (tmp / f"upload-{dead_pid}-abc.part").write_bytes(b"partial")
    (tmp / f"upload-{os.getppid()}-def.part").write_bytes(b"live")  # a running process
    (tmp / f"upload-{os.getpid()}-ghi.part").write_bytes(b"ours, from before a restart")
    assert store.remove_stale_uploads() == 2
    assert [p.name for p in store.temporary_files()] == [f"upload-{os.getppid()}-def.part"]


def test_old_unreferenced_blobs_are_removed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    digests = []
    for data in (b"kept", b"orphan", b"young orphan"):
        writer = store.begin()
        writer.write(data)
        pending = writer.finish()
        store.commit(pending)
        digests.append(pending.sha256)
    old = time.time() - 7200
    for digest in digests[:2]:
        os.utime(store.blob_path(digest), (old, old))
    assert store.remove_unreferenced({digests[0]}, older_than_s=3600) == 1
    assert [store.exists(d) for d in digests] == [True, False, True]


def test_a_missing_blob_is_data_loss(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(ArtifactCorrupted, match="missing"):
        store.open("a" * 64, 10)
